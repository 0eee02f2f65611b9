"""Builder of the built-in instruction-following dataset `ifprefs` (datasets/ifprefs, see its README).

    python -m align.ifprefs --out datasets/ifprefs --seed 0          # build (generates what is not cached)
    # the default model's own replies to the eval prompts, greedy and sampled, scored by the verifier:
    python -m align.ifprefs --skip_build true --baseline_out datasets/ifprefs/meta/baseline.json

How it works:

1. Base prompts are everyday tasks, `TRAIN_TEMPLATES` x `TRAIN_TOPICS` (a seeded sample). The default
   model answers each once (temperature 0.7, left-padded batches); the raw replies are cached outside git
   (`--cache`), so a rebuild only regenerates what is missing.
2. Each base reply is cleaned (a reply cut by the token limit loses its unfinished sentence) and reused
   for several constraint variants: constraints are drawn so that the reply can meet them by minimal
   edits (drop sentences, lowercase, drop commas, add an end phrase, a P.S., a title, quotes, re-flow the
   sentences into bullets or paragraphs, ...). The edited reply is the SFT target and the chosen reply.
3. The rejected reply is either the raw reply (kind "raw": what the model wrote, ignoring the
   constraints) or the chosen reply with one constraint's edit left out (kind "leave_one_out"). Every pair
   is kept only if the verifier scores chosen strictly above rejected.
4. Eval prompts come from `EVAL_TEMPLATES` x `EVAL_TOPICS`, disjoint from the training ones, with
   constraints drawn without a reply.

Everything is seeded; the files are a function of the seed and the cached generations.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from align.config import arg, parse_config
from align.errors import DataError, cli_main
from align.io import atomic_write_json, atomic_write_text
from align.text_counts import count_words, split_sentences
from align.verifier import TYPES, phrasings, verify

# ------------------------------------------------------------------------------------------------
# Tasks and topics. Eval templates and topics never occur in the training splits.

TRAIN_TEMPLATES: dict[str, str] = {
    "email_friend": "Write a short email to a friend about {topic}.",
    "story": "Write a short story about {topic}.",
    "explain_beginner": "Explain {topic} to a beginner.",
    "advice": "Give some practical advice about {topic}.",
    "poem": "Write a short poem about {topic}.",
    "blog_intro": "Write the opening of a blog post about {topic}.",
    "facts": "Tell me a few interesting facts about {topic}.",
    "product": "Write a product description for a beginner's guide to {topic}.",
    "assembly_speech": "Write a short speech for a school assembly about {topic}.",
    "social_post": "Write a social media post about {topic}.",
    "diary": "Write a diary entry by someone who just got interested in {topic}.",
    "summary": "Summarize the main ideas behind {topic}.",
    "newsletter": "Write a short newsletter update about {topic} for a local community group.",
    "pros_cons": "Describe the pros and cons of {topic}.",
    "letter_grandparent": "Write a letter to a grandparent about {topic}.",
    "faq": "Answer the question a beginner most often asks about {topic}.",
    "motivation": "Write a motivational message about {topic}.",
    "workshop_review": "Write a short review of a workshop on {topic}.",
    "club_invite": "Write an invitation to a club meeting about {topic}.",
    "getting_started": "Give tips for someone getting started with {topic}.",
    "dialogue": "Write a short dialogue between two friends about {topic}.",
    "thank_teacher": "Write a thank-you note to a teacher who taught you about {topic}.",
    "why_matters": "Explain why {topic} matters.",
    "kids_explain": "Explain {topic} to a ten-year-old.",
}

EVAL_TEMPLATES: dict[str, str] = {
    "cover_letter": "Write a short cover letter for a volunteer job related to {topic}.",
    "fairy_tale": "Write a fairy tale that involves {topic}.",
    "persuasive": "Write a persuasive paragraph about {topic}.",
    "news_report": "Write a short news report about {topic}.",
    "text_coworker": "Write a message to a coworker about {topic}.",
    "lesson_plan": "Outline a lesson plan for teaching {topic}.",
    "museum_plaque": "Write the text of a museum plaque about {topic}.",
    "radio_ad": "Write a radio advertisement for an event about {topic}.",
}

TRAIN_TOPICS: tuple[str, ...] = (
    "urban gardening", "baking bread", "learning a new language", "saving money", "running a marathon",
    "birdwatching", "composting", "chess", "photography", "meditation", "recycling", "home workouts",
    "camping", "beekeeping", "budget travel", "journaling", "electric cars", "solar power", "volunteering",
    "public speaking", "time management", "remote work", "cooking with kids", "houseplants", "stargazing",
    "knitting", "cycling to work", "healthy sleep", "drinking enough water", "reading more books",
    "learning to code", "woodworking", "first aid", "fishing", "hiking", "pottery", "playing the guitar",
    "swimming", "yoga", "watercolor painting", "rock climbing", "board games", "podcasting", "minimalism",
    "meal prepping", "vegetarian cooking", "brewing coffee", "caring for a puppy", "adopting a cat",
    "keeping an aquarium", "sustainable fashion", "thrift shopping", "car maintenance", "bike repair",
    "dance classes", "singing in a choir", "volcanoes", "the water cycle", "black holes", "honeybees",
    "the human heart", "rainforests", "the moon", "climate change", "ocean tides", "earthquakes",
    "dinosaurs", "the printing press", "vaccines", "photosynthesis", "the internet", "wind energy",
    "ancient Egypt", "the Olympic Games", "coral reefs", "bird migration", "the Roman Empire",
    "electricity", "glaciers", "tornadoes", "the solar system", "mushrooms", "penguins", "whales",
    "the stock market", "credit scores", "city parks", "public libraries", "farmers markets", "jazz music",
    "street art", "3D printing", "robots", "space travel", "smartphones", "video games", "online privacy",
    "strong passwords", "job interviews", "moving to a new city", "making friends as an adult", "kindness",
    "gratitude", "patience", "teamwork", "curiosity", "family traditions", "birthday parties",
    "winter holidays", "rainy days", "autumn leaves", "spring cleaning", "the first day of school",
    "retirement", "good neighbors", "small businesses", "organic farming", "trains", "lighthouses",
    "bridges", "tea", "chocolate", "the ocean", "mountains", "deserts", "rivers", "snow", "sunflowers",
    "owls", "butterflies", "the piano", "handwriting", "board game nights", "museums", "recycled art",
)

EVAL_TOPICS: tuple[str, ...] = (
    "scuba diving", "origami", "calligraphy", "sailing", "juggling", "skateboarding", "gardening on balconies",
    "ice skating", "community theater", "kite flying", "the Great Wall of China", "hurricanes", "octopuses",
    "the Amazon river", "comets", "the periodic table", "bamboo", "electric scooters", "public transport",
    "food waste", "wildfires", "tidal power", "honey", "cheese making", "pizza", "the violin", "poetry slams",
    "marathon volunteers", "lunar eclipses", "sea turtles", "wolves", "cactus care", "snowboarding",
    "recycling electronics", "water filters", "lost pets", "road trips", "farm animals", "hot air balloons",
    "puzzle games",
)

# ------------------------------------------------------------------------------------------------
# Generation with the default model, cached


@dataclass
class BuildArgs:
    out: str = arg("datasets/ifprefs", "output folder for the JSON-lines splits")
    seed: int = arg(0, "seed of every random choice (prompts, constraints, phrasings, sampling)")
    cache: str = arg(str(Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align")) / "ifprefs_generations.jsonl"),
                     "file of raw model generations (outside git); missing ones are generated and appended")
    model: str = arg("SmolLM2-135M-Instruct", "the model that writes the replies (ModelArgs.model_name_or_path)")
    n_bases: int = arg(512, "number of training base prompts (template x topic) the model answers")
    test_bases: int = arg(64, "of those, base prompts held out for prefs_test and sft_test")
    n_eval: int = arg(320, "number of eval prompts (eval templates x eval topics)")
    sft_per_base: int = arg(6, "SFT examples (constraint variants) per training base reply")
    pairs_per_base: int = arg(8, "preference pairs (constraint variants) per base reply")
    temperature: float = arg(0.7, "sampling temperature of the base replies")
    max_new_tokens: int = arg(96, "token limit of a base reply (replies cut there lose their last sentence)")
    batch_size: int = arg(64, "generation batch size (left-padded)")
    threads: int = arg(1, "torch CPU threads for generation; 1 is fastest on a shared, oversubscribed CPU")
    baseline_out: str | None = arg(None, "also generate the default model's replies to the eval prompts "
                                         "(greedy and sampled) and write their verifier scores here; none = skip")
    baseline_max_new_tokens: int = arg(128, "token limit of the baseline replies")
    skip_build: bool = arg(False, "only generate (and score the baseline); do not write the splits")
    refilter: bool = arg(False, "no generation: drop degenerate target replies from the splits already in `out` and "
                                "renumber them (what a full build now does; cheap, for data built before the check)")


def _cache_key(model: str, prompt: list[dict], temperature: float, max_new_tokens: int, seed: int) -> str:
    blob = json.dumps([model, prompt, temperature, max_new_tokens, seed], ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


def _read_cache(path: Path) -> dict[str, dict]:
    cache: dict[str, dict] = {}
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill mid-write: regenerate that one
                    continue
                cache[row["key"]] = row
    return cache


def load_generator(model_name: str, threads: int):
    """The model and tokenizer, fp32, eval mode, tokenizer left-padded for batched generation."""
    import torch

    from align.models import ModelArgs, load_model

    # On a CPU shared by several jobs, OpenMP threads wait on each other at every small op (measured:
    # a 32x1 forward of the 135M model took 8.5 s with 2 threads on a loaded 2-core box, 0.66 s with 1).
    torch.set_num_threads(threads)
    model, tokenizer = load_model(ModelArgs(model_name_or_path=model_name, dtype="fp32", quantization="none"), lora=False)
    model.eval()
    tokenizer.padding_side = "left"
    return model, tokenizer


def generate_replies(
    prompts: Sequence[list[dict]],
    *,
    model_name: str,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
    cache_path: str | os.PathLike,
    threads: int = 1,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Replies of the model to chat `prompts`, as {"reply", "n_tokens", "eos"}, cached in `cache_path`.

    temperature 0 means greedy. Batch i (prompts[i*batch_size:(i+1)*batch_size]) is sampled with torch
    seed `seed + i`, so a batch regenerates identically when the cache lost it. A batch whose every prompt
    is cached is skipped; new rows are appended one batch at a time, so a kill loses at most one batch.
    """
    cache_path = Path(cache_path)
    cache = _read_cache(cache_path)
    out: list[dict | None] = [None] * len(prompts)
    model = tokenizer = None
    started = time.time()
    new_tokens = 0
    for b, lo in enumerate(range(0, len(prompts), batch_size)):
        batch = list(prompts[lo:lo + batch_size])
        keys = [_cache_key(model_name, p, temperature, max_new_tokens, seed + b) for p in batch]
        if all(k in cache for k in keys):
            for i, k in enumerate(keys):
                out[lo + i] = cache[k]
            continue
        import torch

        if model is None:
            model, tokenizer = load_generator(model_name, threads)
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(seed + b)
        sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else dict(do_sample=False)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
        rows = []
        for i, seq in enumerate(ids[:, enc["input_ids"].shape[1]:].tolist()):
            eos = tokenizer.eos_token_id in seq
            if eos:
                seq = seq[: seq.index(tokenizer.eos_token_id)]
            reply = tokenizer.decode(seq, skip_special_tokens=True)
            rows.append({"key": keys[i], "prompt": batch[i], "reply": reply, "n_tokens": len(seq), "eos": eos,
                         "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed + b, "model": model_name})
            new_tokens += len(seq)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with open(cache_path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        for i, r in enumerate(rows):
            out[lo + i] = cache[r["key"]] = r
        elapsed = time.time() - started
        log(f"generated batch {b + 1}/{-(-len(prompts) // batch_size)}: {new_tokens} new tokens in {elapsed:.0f} s "
            f"({new_tokens / max(elapsed, 1e-9):.1f} tokens/s)")
    return out  # type: ignore[return-value]


def base_prompts(seed: int, n_bases: int) -> list[dict]:
    """The training base prompts: the first `n_bases` of a seeded shuffle of all (template, topic) pairs.

    A prefix, so a smaller `n_bases` reuses the cached generations of a larger one.
    """
    combos = [(t, topic) for t in TRAIN_TEMPLATES for topic in TRAIN_TOPICS]
    if n_bases > len(combos):
        raise DataError(f"n_bases: at most {len(combos)} distinct template x topic pairs, got {n_bases}")
    random.Random(f"ifprefs-bases-{seed}").shuffle(combos)
    chosen = combos[:n_bases]
    return [{"template": t, "topic": topic, "task": TRAIN_TEMPLATES[t].format(topic=topic)} for t, topic in chosen]


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
        extra = rng.choice(("community", "future", "simple", "history", "friends", "morning", "careful", "bright"))
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
# Splits


LAYOUTS = ("{task} {instructions}", "{task}\n\n{instructions}", "{instructions} {task}")


def user_message(task: str, constraints: list[dict], rng: random.Random) -> tuple[str, int]:
    instructions = " ".join(rng.choice(phrasings(c)) for c in constraints)
    layout = rng.randrange(len(LAYOUTS))
    return LAYOUTS[layout].format(task=task, instructions=instructions), layout


def _variant(base: dict, raw: str, rng: random.Random, tries: int = 30) -> tuple[list[dict], Draft, str] | None:
    for _ in range(tries):
        used: set[str] = set()
        constraints = []
        for name in draw_types(rng):
            c = sample_for_reply(name, rng, raw, used)
            if c is not None:
                constraints.append(c)
        if not constraints:
            continue
        made = comply(raw, constraints, base["topic"], rng)
        if made is not None:
            return constraints, made[0], made[1]
    return None


KIND_WEIGHTS = {"raw": 2.0, "drop_edit": 1.0, "untrimmed": 1.0, "truncated": 1.0}


def build_splits(bases: list[dict], replies: list[dict], cfg: BuildArgs) -> dict[str, list[dict]]:
    """The splits: drafted, degenerate target replies dropped (drop_degenerate), numbered."""
    splits = draft_splits(bases, replies, cfg)
    drop_degenerate(splits)
    number_rows(splits)
    return splits


def draft_splits(bases: list[dict], replies: list[dict], cfg: BuildArgs) -> dict[str, list[dict]]:
    """Every SFT row and preference pair the base replies give, in order, without ids."""
    rng = random.Random(f"ifprefs-build-{cfg.seed}")
    n_train = len(bases) - cfg.test_bases
    splits: dict[str, list[dict]] = {"sft": [], "sft_test": [], "prefs_train": [], "prefs_test": []}
    for b, (base, gen) in enumerate(zip(bases, replies)):
        raw = clean_reply(gen["reply"], gen["eos"])
        if raw is None:
            continue
        test = b >= n_train
        meta = {"template": base["template"], "topic": base["topic"], "base": b}
        n_sft = cfg.sft_per_base if not test else max(1, cfg.sft_per_base // 2)
        for _ in range(n_sft):
            made = _variant(base, raw, rng)
            if made is None:
                continue
            constraints, _, chosen = made
            content, layout = user_message(base["task"], constraints, rng)
            splits["sft_test" if test else "sft"].append({
                "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": chosen}],
                "constraints": constraints, "meta": {**meta, "layout": layout}})
        for _ in range(cfg.pairs_per_base):
            made = _variant(base, raw, rng)
            if made is None:
                continue
            constraints, draft, chosen = made
            chosen_score = verify(chosen, constraints).score
            options = []
            for kind, reply in rejected_candidates(raw, draft, constraints, base["topic"]):
                score = verify(reply, constraints).score
                if score < chosen_score and reply.strip() != chosen.strip() and reply.strip():
                    options.append((kind, reply, score))
            if not options:
                continue
            kind, rejected, rejected_score = rng.choices(options, weights=[KIND_WEIGHTS[o[0]] for o in options])[0]
            content, layout = user_message(base["task"], constraints, rng)
            splits["prefs_test" if test else "prefs_train"].append({
                "prompt": [{"role": "user", "content": content}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "constraints": constraints,
                "meta": {**meta, "layout": layout, "kind": kind, "chosen_score": chosen_score, "rejected_score": rejected_score}})
    return splits


def number_rows(splits: dict[str, list[dict]]) -> None:
    """Give every row its id, ifprefs-SPLIT-NNNNN in file order, as the first key."""
    for name, rows in splits.items():
        for i, row in enumerate(rows):
            row.pop("id", None)
            rows[i] = {"id": f"ifprefs-{name}-{i:05d}", **row}


def target_reply(row: dict) -> tuple[list[dict], str]:
    """(prompt messages, the reply a model is trained towards): an SFT row's last assistant message, a
    preference row's chosen reply."""
    if "messages" in row:
        last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
        return row["messages"][:last], row["messages"][last]["content"]
    return row["prompt"], row["chosen"][-1]["content"]


def drop_degenerate(splits: dict[str, list[dict]]) -> dict[str, int]:
    """Drop, in place, every training row whose target reply (SFT reply, chosen reply) is degenerate text
    (align.degeneration: a loop, a line three times, an instruction copied back): a policy imitates its
    SFT replies and DPO moves towards its chosen ones. Returns the rows dropped per split. Rejected replies
    may be degenerate; that is what they are for."""
    from align.degeneration import check_reply

    dropped = {}
    for name in ("sft", "sft_test", "prefs_train", "prefs_test"):
        rows = splits.get(name, [])
        kept = [r for r in rows if not check_reply(target_reply(r)[1], target_reply(r)[0], r["constraints"]).degenerate]
        dropped[name] = len(rows) - len(kept)
        rows[:] = kept
    return dropped


def eval_prompts(seed: int, n_eval: int) -> list[dict]:
    """Held-out prompts from eval templates and topics only, each with 1 to 3 constraints."""
    rng = random.Random(f"ifprefs-eval-{seed}")
    combos = [(t, topic) for t in EVAL_TEMPLATES for topic in EVAL_TOPICS]
    rng.shuffle(combos)
    rows = []
    for i in range(n_eval):
        template, topic = combos[i % len(combos)]
        task = EVAL_TEMPLATES[template].format(topic=topic)
        constraints = [sample_for_eval(name, rng, topic) for name in draw_types(rng)]
        content, layout = user_message(task, constraints, rng)
        rows.append({"id": f"ifprefs-eval-{i:05d}", "prompt": [{"role": "user", "content": content}],
                     "constraints": constraints, "meta": {"template": template, "topic": topic, "layout": layout}})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def dataset_stats(splits: dict[str, list[dict]]) -> dict[str, Any]:
    from collections import Counter

    stats: dict[str, Any] = {"sizes": {k: len(v) for k, v in splits.items()}}
    for name in ("prefs_train", "prefs_test"):
        kinds = Counter(r["meta"]["kind"] for r in splits[name])
        stats[f"{name}_kinds"] = {k: round(v / max(1, len(splits[name])), 3) for k, v in sorted(kinds.items())}
        stats[f"{name}_mean_rejected_score"] = round(
            sum(r["meta"]["rejected_score"] for r in splits[name]) / max(1, len(splits[name])), 3)
    types = Counter(c["type"] for rows in splits.values() for r in rows for c in r["constraints"])
    stats["constraint_types"] = dict(sorted(types.items()))
    n_constraints = Counter(len(r["constraints"]) for rows in splits.values() for r in rows)
    stats["constraints_per_prompt"] = dict(sorted(n_constraints.items()))
    replies = [r["messages"][-1]["content"] for r in splits["sft"]]
    stats["sft_reply_words_mean"] = round(sum(count_words(t) for t in replies) / max(1, len(replies)), 1)
    return stats


# ------------------------------------------------------------------------------------------------
# Baseline: the default model's own replies to the eval prompts


def baseline_scores(rows: list[dict], cfg: BuildArgs, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Verifier score (mean) and strict accuracy of the default model on `rows`, greedy and sampled."""
    prompts = [r["prompt"] for r in rows]
    out: dict[str, Any] = {"model": cfg.model, "n_prompts": len(rows), "max_new_tokens": cfg.baseline_max_new_tokens}
    for mode, temperature in (("greedy", 0.0), ("sampled_t0.7", 0.7)):
        gens = generate_replies(prompts, model_name=cfg.model, temperature=temperature,
                                max_new_tokens=cfg.baseline_max_new_tokens, seed=cfg.seed, batch_size=cfg.batch_size,
                                cache_path=cfg.cache, threads=cfg.threads, log=log)
        verdicts = [verify(g["reply"], r["constraints"]) for g, r in zip(gens, rows)]
        per_type: dict[str, list[bool]] = {}
        for r, v in zip(rows, verdicts):
            for c, ok in zip(r["constraints"], v.passed):
                per_type.setdefault(c["type"], []).append(ok)
        out[mode] = {
            "temperature": temperature,
            "mean_score": round(sum(v.score for v in verdicts) / len(verdicts), 4),
            "strict_accuracy": round(sum(v.strict for v in verdicts) / len(verdicts), 4),
            "instruction_accuracy": round(sum(sum(v.passed) for v in verdicts) / sum(len(v.passed) for v in verdicts), 4),
            "eos_rate": round(sum(g["eos"] for g in gens) / len(gens), 4),
            "mean_tokens": round(sum(g["n_tokens"] for g in gens) / len(gens), 1),
            "per_type_pass_rate": {k: round(sum(v) / len(v), 3) for k, v in sorted(per_type.items())},
        }
    return out


@cli_main
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(BuildArgs, sys.argv[1:] if argv is None else argv)
    log = lambda msg: print(f"[ifprefs] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if cfg.test_bases >= cfg.n_bases:
        raise DataError(f"test_bases: must be below n_bases ({cfg.n_bases}), got {cfg.test_bases}")
    out = Path(cfg.out)
    if cfg.refilter:
        splits = {name: [json.loads(line) for line in open(out / f"{name}.jsonl", encoding="utf-8")]
                  for name in ("sft", "sft_test", "prefs_train", "prefs_test", "eval")}
        dropped = drop_degenerate(splits)
        number_rows(splits)
        for name, rows in splits.items():
            _write_jsonl(out / f"{name}.jsonl", rows)
        old_stats = json.loads((out / "meta" / "stats.json").read_text(encoding="utf-8"))
        stats = {**dataset_stats(splits), **{k: old_stats[k] for k in ("usable_base_replies", "base_prompts") if k in old_stats}}
        # totals since the build: a refilter after the check gains a rule adds to what earlier passes dropped
        earlier = old_stats.get("dropped_degenerate", {})
        stats["dropped_degenerate"] = {k: earlier.get(k, 0) + n for k, n in dropped.items()}
        atomic_write_json(out / "meta" / "stats.json", stats)
        log(f"dropped degenerate target replies: {json.dumps(dropped)} (since the build: {json.dumps(stats['dropped_degenerate'])}); "
            f"now {json.dumps(stats['sizes'])}")
        return
    if not cfg.skip_build:
        bases = base_prompts(cfg.seed, cfg.n_bases)
        log(f"{len(bases)} base prompts; replies cached in {cfg.cache}")
        replies = generate_replies([[{"role": "user", "content": b["task"]}] for b in bases], model_name=cfg.model,
                                   temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                                   batch_size=cfg.batch_size, cache_path=cfg.cache, threads=cfg.threads, log=log)
        splits = draft_splits(bases, replies, cfg)
        dropped = drop_degenerate(splits)
        number_rows(splits)
        splits["eval"] = eval_prompts(cfg.seed, cfg.n_eval)
        for name, rows in splits.items():
            _write_jsonl(out / f"{name}.jsonl", rows)
        stats = dataset_stats(splits)
        stats["usable_base_replies"] = sum(clean_reply(g["reply"], g["eos"]) is not None for g in replies)
        stats["base_prompts"] = len(bases)
        stats["dropped_degenerate"] = dropped
        atomic_write_json(out / "meta" / "stats.json", stats)  # a subfolder: not a split to the data loader
        log(f"wrote {', '.join(f'{k} {v}' for k, v in stats['sizes'].items())} to {out}")
    if cfg.baseline_out:
        rows = [json.loads(line) for line in open(out / "eval.jsonl", encoding="utf-8")]
        result = baseline_scores(rows, cfg, log)
        atomic_write_json(cfg.baseline_out, result)
        log(f"baseline: {json.dumps({k: v for k, v in result.items() if k.startswith(('greedy', 'sampled'))})}")


if __name__ == "__main__":
    main()
