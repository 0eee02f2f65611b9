"""The edits of the ifprefs builder (tools/build_ifprefs.py): a model's reply cleaned, constraints drawn so that
the reply can meet them by minimal edits, the edits that make it comply, and the natural alternatives that do not
(the rejected replies). Pure functions of their arguments and a seeded `random.Random`."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any, Sequence

from align.errors import DataError
from align.evaluation.text_counts import count_words, split_sentences
from align.evaluation.verifier import TYPES, verify

# ------------------------------------------------------------------------------------------------
# Cleaning a raw reply

_LAST_END_RE = re.compile(r"[.!?\u2026][\"'\u201d\u2019)\]*]*(?=\s|$)")
_LIST_MARKER_RE = re.compile(r"^\s*(?:[-*+\u2022]|\d{1,2}[.)]|#{1,6})\s+")


def clean_reply(reply: str, eos: bool) -> str | None:
    """The reply without a sentence cut by the token limit; None when too short or repetitive to use."""
    text = reply.strip()
    if not eos:  # cut at the end of the last complete sentence or line
        ends = [m.end() for m in _LAST_END_RE.finditer(text)]
        cut = max(ends[-1] if ends else 0, text.rfind("\n"))
        text = text[:cut].strip()
    if "<|" in text or "<<" in text or ">>" in text:
        return None
    sentences = split_sentences(text)
    if count_words(text) < 20 or len(sentences) < 2:
        return None
    if len(set(sentences)) < 0.75 * len(sentences):  # the small model sometimes loops
        return None
    return text


# ------------------------------------------------------------------------------------------------
# A reply as an editable draft. Edits that make a reply comply are flags rendered in a fixed order:
# body (re-flowed into paragraphs, bullets or sections if asked; some sentences highlighted), an extra
# line with placeholders, a title on top, a P.S., the end phrase, then case, commas, quotes, JSON.


@dataclass
class Draft:
    lines: list[list[str]]  # the body's lines, each a list of sentences; [] is a blank line
    title: str | None = None
    structure: tuple[str, int] | None = None  # ("paragraphs" | "bullets" | "sections", n)
    highlights: int = 0
    placeholder_line: str | None = None
    postscript: str | None = None
    end_phrase: str | None = None
    case: str | None = None  # "lower" | "upper"
    no_comma: bool = False
    quotation: bool = False
    json: bool = False

    @classmethod
    def from_text(cls, text: str) -> "Draft":
        return cls([split_sentences(line) if line.strip() else [] for line in text.split("\n")])

    def sentences(self) -> list[str]:
        return [s for line in self.lines for s in line]

    def copy(self, **changes: Any) -> "Draft":
        values = {**self.__dict__, "lines": [list(line) for line in self.lines], **changes}
        return Draft(**values)

    def drop_sentence(self, index: int) -> None:
        """Remove the sentence at flat position `index`; a line left empty goes too."""
        for li, line in enumerate(self.lines):
            if index < len(line):
                del line[index]
                if not line:
                    del self.lines[li]
                    # two blank lines in a row become one
                    if 0 < li < len(self.lines) and not self.lines[li - 1] and not self.lines[li]:
                        del self.lines[li]
                break
            index -= len(line)
        while self.lines and not self.lines[-1]:
            self.lines.pop()


def _groups(items: list[str], n: int) -> list[list[str]]:
    """Split items into n consecutive, nearly equal, non-empty groups."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def _highlight(blocks: list[list[str]], k: int) -> None:
    """Wrap k sentences in *...*, preferring ones that do not start a line (a line starting with * is a
    bullet to IFEval)."""
    def eligible(s: str) -> bool:
        return "*" not in s and s[:1].isalnum()

    spots = [(b, i) for b, block in enumerate(blocks) for i, s in enumerate(block) if i > 0 and eligible(s)]
    spots += [(b, 0) for b, block in enumerate(blocks) if block and eligible(block[0])]
    for b, i in spots[:k]:
        blocks[b][i] = f"*{blocks[b][i]}*"


def render(d: Draft) -> str:
    if d.structure:
        kind, n = d.structure
        sentences = [_LIST_MARKER_RE.sub("", s) for s in d.sentences()]
        sentences = [s for s in sentences if s]
        if kind == "bullets" and len(sentences) > n:
            intro, groups = [sentences[0]], _groups(sentences[1:], n)
        else:
            intro, groups = [], _groups(sentences, n)
        if any(not g for g in groups):
            groups = [g for g in groups if g]  # too few sentences: the verifier will reject the result
        blocks = [intro] + groups if intro else groups
        _highlight(blocks, d.highlights)
        texts = [" ".join(g) for g in blocks]
        if kind == "paragraphs":
            body = "\n\n***\n\n".join(texts)
        elif kind == "bullets":
            head = texts[:1] if intro else []
            items = texts[1:] if intro else texts
            body = "\n\n".join(head + ["\n".join(f"* {t}" for t in items)])
        else:
            body = "\n\n".join(f"SECTION {i + 1}\n{t}" for i, t in enumerate(texts))
    else:
        blocks = [list(line) for line in d.lines]
        _highlight(blocks, d.highlights)
        body = "\n".join(" ".join(line) for line in blocks)
    text = body.strip()
    if d.placeholder_line:
        text += "\n\n" + d.placeholder_line
    if d.title:
        text = f"<<{d.title}>>\n\n" + text
    if d.postscript:
        text += "\n\n" + d.postscript
    if d.end_phrase:
        text += "\n\n" + d.end_phrase
    if d.case == "lower":
        text = text.lower()
    elif d.case == "upper":
        text = text.upper()
    if d.no_comma:
        text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 1,000 -> 1000
        text = re.sub(r" *,", "", text)
    if d.quotation:
        text = f'"{text}"'
    if d.json:
        text = "```json\n" + json.dumps({"response": text}, ensure_ascii=False, indent=2) + "\n```"
    return text


# ------------------------------------------------------------------------------------------------
# Drawing constraints

END_PHRASES = (
    "Is there anything else I can help with?", "Let me know if you have additional questions.",
    "Thanks for reading.", "Have a great day!", "Any other questions?", "That is all for now.",
    "Hope this helps!", "Talk soon.",
)
POSTSCRIPTS = (
    "I would love to hear what you think.", "Feel free to share this with a friend.",
    "More on this soon.", "Thanks for taking the time to read this.", "Let me know if you try it.",
)
PLACEHOLDER_LINES = {
    1: ("You can reach me at [email address].", "Best wishes from [your name]", "See you on [date]."),
    2: ("Let's meet at [location] on [date] to talk more.", "Feel free to call [name] at [phone number] for details."),
    3: ("Join us at [location] on [date] at [time].", "Sign up by [date] with [name] at [email address]."),
}
STOPWORDS = frozenset(
    "about above after again against also because been before being below between both could does doing down "
    "during each even every from further have having here into itself just more most much must myself only "
    "other over same should some such than that their them then there these they this those through under "
    "until very what when where which while with would your yours make made like well many really things "
    "thing will dear hello".split()
)
GENERIC_FORBIDDEN = ("very", "really", "thing", "things", "just", "amazing", "important", "great", "basically", "actually")
STRUCTURE_TYPES = ("num_paragraphs", "num_bullets", "num_sections", "json_format")
JSON_COMPATIBLE = frozenset(("lowercase", "no_comma", "num_words", "include_keywords", "forbidden_words",
                             "keyword_frequency", "letter_frequency"))
TRIM_TYPES = frozenset(("num_words", "num_sentences", "forbidden_words", "keyword_frequency", "letter_frequency"))


def compatible(name: str, chosen: Sequence[str]) -> bool:
    """Whether type `name` can join the types already `chosen` for one prompt (no contradictions)."""
    if name in chosen:
        return False
    for other in chosen:
        pair = {name, other}
        if pair == {"lowercase", "capitals"} or pair == {"lowercase", "num_sections"}:
            return False  # SECTION markers are case sensitive
        if pair == {"num_bullets", "num_highlights"}:
            return False  # IFEval counts a line starting with *text* as a bullet
        if name in STRUCTURE_TYPES and other in STRUCTURE_TYPES:
            return False
        if "json_format" in pair and not (pair - {"json_format"}) <= JSON_COMPATIBLE:
            return False
    return True


def _content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 4 and w not in STOPWORDS]


def _occurrences(word: str, text: str) -> int:
    return len(re.findall(re.escape(word), text, flags=re.IGNORECASE))


def sample_for_reply(name: str, rng: random.Random, text: str, used_words: set[str]) -> dict | None:
    """A constraint of type `name` whose arguments suit this reply (so minimal edits can meet it)."""
    n_words = count_words(text)
    n_sent = len(split_sentences(text))
    relation = rng.choice(("less than", "at least"))
    if name in ("lowercase", "capitals", "no_comma", "json_format", "title", "quotation"):
        return {"type": name}
    if name == "num_words":
        if relation == "less than":
            if n_words < 30:
                return None
            return {"type": name, "relation": relation, "num_words": 5 * max(4, round(n_words * rng.uniform(0.45, 0.9) / 5))}
        return {"type": name, "relation": relation, "num_words": 5 * max(2, round(n_words * rng.uniform(0.3, 0.85) / 5))}
    if name == "num_sentences":
        if n_sent < 3:
            return None
        return {"type": name, "relation": relation, "num_sentences": rng.randint(2, min(n_sent, 8))}
    if name in ("num_paragraphs", "num_bullets", "num_sections"):
        top = {"num_paragraphs": 4, "num_bullets": 5, "num_sections": 4}[name]
        if n_sent < 2:
            return None
        return {"type": name, name: rng.randint(2, min(top, n_sent))}
    if name == "num_highlights":
        return {"type": name, "num_highlights": rng.randint(1, min(3, n_sent))}
    if name == "num_placeholders":
        return {"type": name, "num_placeholders": rng.randint(1, 3)}
    if name == "end_phrase":
        return {"type": name, "end_phrase": rng.choice(END_PHRASES)}
    if name == "postscript":
        return {"type": name, "postscript_marker": "P.S." if rng.random() < 0.85 else "P.P.S"}
    words = sorted(set(_content_words(text)) - used_words)
    if name == "include_keywords":
        if not words:
            return None
        picked = rng.sample(words, min(len(words), rng.choice((1, 1, 2))))
        used_words.update(picked)
        return {"type": name, "keywords": picked}
    if name == "forbidden_words":
        pool = words if rng.random() < 0.75 else [w for w in GENERIC_FORBIDDEN if w not in used_words]
        if not pool:
            return None
        picked = rng.sample(pool, 1)
        used_words.update(picked)
        return {"type": name, "forbidden_words": picked}
    if name == "keyword_frequency":
        repeated = [w for w in words if _occurrences(w, text) >= 2]
        if not repeated:
            return None
        word = rng.choice(repeated)
        used_words.add(word)
        count = _occurrences(word, text)
        return {"type": name, "keyword": word, "relation": relation, "frequency": rng.randint(2, min(count, 6))}
    if name == "letter_frequency":
        letter = rng.choice("abcdeghilmnoprstuwy")
        count = text.lower().count(letter)
        if count < 4:
            return None
        factor = rng.uniform(0.4, 0.95) if relation == "at least" else rng.uniform(0.6, 0.9)
        return {"type": name, "letter": letter, "relation": relation, "frequency": max(2, int(count * factor))}
    raise DataError(f"no sampler for constraint type {name!r}")


# Eval's "include the word X" asks for the topic's word, one of these (unrelated to most topics), or both.
EVAL_EXTRA_KEYWORDS = ("community", "future", "simple", "history", "friends", "morning", "careful", "bright")


def sample_for_eval(name: str, rng: random.Random, topic: str) -> dict:
    """A constraint of type `name` with arguments a reply of ~100 words can meet (there is no reply yet)."""
    relation = rng.choice(("less than", "at least"))
    topic_words = [w for w in _content_words(topic)] or [topic.split()[-1].lower()]
    if name == "num_words":
        n = rng.choice((40, 60, 80, 100, 150)) if relation == "less than" else rng.choice((20, 30, 50, 70))
        return {"type": name, "relation": relation, "num_words": n}
    if name == "num_sentences":
        n = rng.randint(3, 6) if relation == "less than" else rng.randint(2, 5)
        return {"type": name, "relation": relation, "num_sentences": n}
    if name in ("num_paragraphs", "num_bullets", "num_sections"):
        top = {"num_paragraphs": 3, "num_bullets": 5, "num_sections": 3}[name]
        return {"type": name, name: rng.randint(2, top)}
    if name == "include_keywords":
        extra = rng.choice(EVAL_EXTRA_KEYWORDS)
        return {"type": name, "keywords": rng.choice(([topic_words[-1]], [extra], [topic_words[-1], extra]))}
    if name == "forbidden_words":
        return {"type": name, "forbidden_words": [rng.choice(GENERIC_FORBIDDEN + (topic_words[-1],))]}
    if name == "keyword_frequency":
        return {"type": name, "keyword": topic_words[-1], "relation": relation, "frequency": rng.randint(2, 4)}
    if name == "letter_frequency":
        if relation == "at least":
            return {"type": name, "letter": rng.choice("aeinorst"), "relation": relation, "frequency": rng.randint(5, 20)}
        return {"type": name, "letter": rng.choice("bcdfgkmpvwy"), "relation": relation, "frequency": rng.randint(5, 15)}
    # The remaining types take no argument from a reply; they draw as for one with five sentences (which
    # only bounds num_highlights to 3).
    return sample_for_reply(name, rng, "One. Two. Three. Four. Five.", set())


def draw_types(rng: random.Random) -> list[str]:
    """1 to 3 mutually compatible constraint types, uniform over the types that still fit."""
    k = rng.choices((1, 2, 3), weights=(3, 4, 3))[0]
    chosen: list[str] = []
    while len(chosen) < k:
        options = [name for name in sorted(TYPES) if compatible(name, chosen)]
        if not options:
            break
        chosen.append(rng.choice(options))
    return chosen


# ------------------------------------------------------------------------------------------------
# Making a reply comply, and the rejected alternatives


def _set_flag(d: Draft, c: dict, topic: str, rng: random.Random) -> None:
    name = c["type"]
    if name == "lowercase":
        d.case = "lower"
    elif name == "capitals":
        d.case = "upper"
    elif name == "no_comma":
        d.no_comma = True
    elif name == "title":
        d.title = topic[:1].upper() + topic[1:]
    elif name == "quotation":
        d.quotation = True
    elif name == "json_format":
        d.json = True
    elif name in ("num_paragraphs", "num_bullets", "num_sections"):
        d.structure = (name.removeprefix("num_"), c[name])
    elif name == "num_highlights":
        d.highlights = c["num_highlights"]
    elif name == "num_placeholders":
        d.placeholder_line = rng.choice(PLACEHOLDER_LINES[c["num_placeholders"]])
    elif name == "postscript":
        d.postscript = f"{c['postscript_marker'].rstrip('.')}. {rng.choice(POSTSCRIPTS)}"
    elif name == "end_phrase":
        d.end_phrase = c["end_phrase"]


def _sentence_to_drop(d: Draft, failing: list[dict]) -> int | None:
    """Which sentence to remove so a failing trim constraint gets closer: the last sentence containing
    a forbidden or over-used word, else the last sentence. None when no failing constraint is a trim."""
    sentences = d.sentences()
    if len(sentences) <= 1:
        return None
    for c in failing:
        if c["type"] == "forbidden_words" or (c["type"] == "keyword_frequency" and c["relation"] == "less than"):
            words = c.get("forbidden_words") or [c["keyword"]]
            hits = [i for i, s in enumerate(sentences) if any(_occurrences(w, s) for w in words)]
            if hits:
                return hits[-1]
    trims = [c for c in failing if c["type"] in TRIM_TYPES and c.get("relation", "less than") == "less than"]
    return len(sentences) - 1 if trims else None


def comply(text: str, constraints: list[dict], topic: str, rng: random.Random) -> tuple[Draft, str] | None:
    """Minimal edits of `text` that meet every constraint, as (draft, rendered); None if there are none."""
    d = Draft.from_text(text)
    for c in constraints:
        _set_flag(d, c, topic, rng)
    for _ in range(200):
        out = render(d)
        verdict = verify(out, constraints)
        if verdict.strict:
            return d, out
        drop = _sentence_to_drop(d, [c for c, ok in zip(constraints, verdict.passed) if not ok])
        if drop is None:
            return None
        d.drop_sentence(drop)
    return None


# The Draft field each formatting constraint sets, and its value with the edit left out.
_EDIT_OFF: dict[str, tuple[str, Any]] = {
    "lowercase": ("case", None), "capitals": ("case", None), "no_comma": ("no_comma", False),
    "title": ("title", None), "quotation": ("quotation", False), "json_format": ("json", False),
    "num_paragraphs": ("structure", None), "num_bullets": ("structure", None), "num_sections": ("structure", None),
    "num_highlights": ("highlights", 0), "num_placeholders": ("placeholder_line", None),
    "postscript": ("postscript", None), "end_phrase": ("end_phrase", None),
}
FLAG_TYPES = frozenset(_EDIT_OFF)


def rejected_candidates(raw: str, chosen: Draft, constraints: list[dict], topic: str) -> list[tuple[str, str]]:
    """(kind, reply) alternatives to the compliant reply, each natural text:
    raw           - the model's reply as written, ignoring the constraints;
    drop_edit     - the compliant reply with one formatting edit left out (no P.S., no quotes, ...);
    untrimmed     - the compliant reply's formatting, but none of the sentences it dropped are removed;
    truncated     - the compliant reply cut short by whole sentences until an "at least" or keyword
                    constraint fails.
    """
    out = [("raw", raw)]
    for c in constraints:
        if c["type"] in FLAG_TYPES:
            d = chosen.copy()
            attr, off = _EDIT_OFF[c["type"]]
            setattr(d, attr, off)
            out.append(("drop_edit", render(d)))
    if any(c["type"] in TRIM_TYPES for c in constraints):
        full = Draft.from_text(raw)
        out.append(("untrimmed", render(chosen.copy(lines=full.lines))))
    grow = [c for c in constraints if c.get("relation") == "at least" or c["type"] == "include_keywords"]
    for c in grow:
        d = chosen.copy()
        while len(d.sentences()) > 1 and verify(render(d), [c]).strict:
            d.drop_sentence(len(d.sentences()) - 1)
        if not verify(render(d), [c]).strict:
            out.append(("truncated", render(d)))
    return out



# ------------------------------------------------------------------------------------------------
# Keywords a reply does not use, worked in. Drawn from the reply, every "include the word X" of the build asks for a
# word the reply already has, so the data never shows a reply that includes a word because it was asked (eval asks
# for unrelated ones: EVAL_EXTRA_KEYWORDS). Each word here comes with one sentence, without commas, that fits a
# reply on most topics; none is an eval word (tests/unit/tools/test_ifprefs.py).

ABSENT_KEYWORDS: dict[str, str] = {
    "patience": "A little patience goes a long way here.",
    "curiosity": "Curiosity is a good place to start.",
    "weekend": "It is a nice way to spend a weekend.",
    "teamwork": "Good teamwork makes all of this easier.",
    "kindness": "A bit of kindness helps here too.",
    "practice": "Like most things it gets easier with practice.",
    "family": "It is something the whole family can take part in.",
    "neighbors": "Your neighbors may even want to join in.",
    "budget": "It does not have to strain your budget.",
    "safety": "Safety should always come first.",
    "balance": "It is all about finding the right balance.",
    "energy": "It is worth the time and energy.",
    "goals": "Keep your goals in mind as you go.",
    "details": "The small details matter more than you might think.",
    "confidence": "Confidence grows with every step.",
    "creativity": "There is plenty of room for creativity.",
    "effort": "A small effort can make a real difference.",
    "habit": "Over time it can become a good habit.",
    "surprise": "The results may surprise you.",
    "adventure": "Think of it as a small adventure.",
    "purpose": "Doing it with purpose makes it more rewarding.",
    "progress": "Progress may be slow but it is real.",
    "inspiration": "Inspiration can come from anywhere.",
    "questions": "Feel free to ask questions along the way.",
    "together": "It is even better when people do it together.",
    "season": "Any season is a good time to begin.",
    "calm": "Stay calm and take it one step at a time.",
    "honest": "It helps to be honest about what works and what does not.",
}

_NOT_PROSE_RE = re.compile(r"^\s*(?:[-*+#{\[<]|\d{1,2}[.)]|SECTION\b|Section\b|P\.P?\.S)")
_FIRST_END_RE = re.compile(r"[.!?](?=\s|$)")


def work_in_keyword(reply: str, sentence: str, constraints: Sequence[dict]) -> str | None:
    """`reply` with `sentence` after the first sentence of its first line of prose (not a list item, heading,
    section marker, title, JSON or P.S.), in the reply's case where a constraint sets it; None when no line has
    a sentence to follow."""
    types = {c["type"] for c in constraints}
    if "json_format" in types:
        return None
    sentence = sentence.lower() if "lowercase" in types else sentence.upper() if "capitals" in types else sentence
    lines = reply.split("\n")
    for i, line in enumerate(lines):
        end = _FIRST_END_RE.search(line)
        if not line.strip() or _NOT_PROSE_RE.match(line) or end is None:
            continue
        lines[i] = line[: end.end()] + " " + sentence + line[end.end():]
        return "\n".join(lines)
    return None


# ------------------------------------------------------------------------------------------------
# Formats nobody asked for, added. Every other rejected reply lacks a format the prompt asked for, so the pairs
# teach "a P.S., a title, `***` dividers are good" and never "only when asked": DPO runs raised the share of replies
# with a format nobody asked for (align.evaluation.degeneration.unasked_formats) from 0.13 to 0.26-0.49 (issue 18).
# A pair whose rejected reply is the chosen one plus such a format is the missing contrast.

_MARKED_RE = re.compile(r"<<|>>|\[|\]|^\s*P\.\s?S\.|^\s*\*\*\*\s*$|\bSECTION\s+\d|^\s*(?:[*-]|\d{1,2}[.)])\s|\A\s*[\"{`]", re.M)


def _in_case(text: str, asked: set[str]) -> str:
    return text.lower() if "lowercase" in asked else text.upper() if "capitals" in asked else text


def _add_line(chosen: str, line: str, constraints: Sequence[dict]) -> str:
    """`chosen` with `line` as its own last paragraph, in the case the constraints ask for, before an asked-for end
    phrase and inside asked-for quotes (so those constraints still hold)."""
    asked = {c["type"] for c in constraints}
    line = _in_case(line, asked)
    quoted = "quotation" in asked and len(chosen) > 1 and chosen[0] == chosen[-1] == '"'
    body = chosen[1:-1] if quoted else chosen
    end = next((c["end_phrase"] for c in constraints if c["type"] == "end_phrase"), None)
    if end and body.rstrip().lower().endswith(end.lower()):  # the verifier reads the end phrase in any case
        head, tail = body.rstrip()[: -len(end)].rstrip(), body.rstrip()[-len(end):]
        body = f"{head}\n\n{line}\n\n{tail}"
    else:
        body = f"{body}\n\n{line}"
    return f'"{body}"' if quoted else body


def unasked_edits(chosen: str, constraints: Sequence[dict], topic: str, rng: random.Random) -> list[tuple[str, str]]:
    """(format, reply) pairs: `chosen` with one format added that no constraint asks for, each named as
    align.evaluation.degeneration.unasked_formats names it, in a seeded order. The caller keeps a reply that still
    meets every constraint (build_ifprefs.add_unasked_pairs); the order favours the formats of UNASKED_WEIGHTS. A
    placeholder line or a P.S. takes the asked-for case and goes before an asked-for end phrase and inside asked-for
    quotes; structure (dividers, sections) is only re-flowed into plain prose (no markers of its own), so no title or
    list ends up inside a paragraph."""
    asked = {c["type"] for c in constraints}
    title = _in_case(topic[:1].upper() + topic[1:], asked)
    plain = not _MARKED_RE.search(chosen)
    json_reply = chosen.lstrip().startswith(("```", "{"))
    out = []
    if "title" not in asked and not json_reply:
        out.append(("<<title>>", f'"<<{title}>>\n\n{chosen[1:]}' if "quotation" in asked else f"<<{title}>>\n\n{chosen}"))
    if "postscript" not in asked and not json_reply:
        out.append(("postscript", _add_line(chosen, f"P.S. {rng.choice(POSTSCRIPTS)}", constraints)))
    if "num_placeholders" not in asked and not json_reply:
        out.append(("placeholders", _add_line(chosen, rng.choice(PLACEHOLDER_LINES[1]), constraints)))
    if "quotation" not in asked and not chosen.lstrip().startswith(("\"", "```")):
        out.append(("quoted reply", f'"{chosen}"'))
    if "json_format" not in asked and not json_reply:
        out.append(("JSON", "```json\n" + json.dumps({"response": chosen}, ensure_ascii=False, indent=2) + "\n```"))
    if "capitals" not in asked and "lowercase" not in asked:
        out.append(("all capitals", chosen.upper()))
    for kind, name in (("paragraphs", "*** dividers"), ("sections", "SECTION markers")):
        if plain and f"num_{kind}" not in asked and len(split_sentences(chosen)) >= 4:
            out.append((name, render(Draft.from_text(chosen).copy(structure=(kind, 2 if kind == "sections" else 3)))))
    # a seeded order that tries the formats trained policies add most often first (placeholders, then quotes: issue 18's
    # DPO and PPO evaluations), a weighted shuffle (Efraimidis-Spirakis keys)
    keys = {id(edit): rng.random() ** (1.0 / UNASKED_WEIGHTS.get(edit[0], 1.0)) for edit in out}
    return sorted(out, key=lambda edit: -keys[id(edit)])


UNASKED_WEIGHTS = {"placeholders": 4.0, "quoted reply": 2.0}
