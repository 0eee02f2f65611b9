"""The gold reward: machine-checkable instructions in the spirit of IFEval.

A prompt of the built-in data carries its constraints as data, `{"type": name, **args}`, so any reply to
it can be scored later:

    verify("hello world.", [{"type": "lowercase"}, {"type": "num_words", "relation": "less than", "num_words": 5}])
    -> Verdict(passed=[True, True], score=1.0, strict=True)

`score` is the fraction of constraints satisfied (IFEval's "instruction-level" view, per prompt) and
`strict` says whether all are (IFEval's "prompt-level strict" accuracy). `verifier_reward` maps a batch of
prompts with `.constraints` and their replies to `score`s, so it can be a PPO reward function as is.

Where a type matches an IFEval instruction (Zhou et al. 2023, "Instruction-Following Evaluation for Large
Language Models", arXiv:2311.07911; code google-research/instruction_following_eval, `instructions.py`),
its check copies IFEval's published counting rules, quirks included; each type names its IFEval id in
`ConstraintType.ifeval_id`. The rules, in short:

- words: runs of `\\w` characters (IFEval's `RegexpTokenizer(r"\\w+")`), so "don't" is two words and
  "naïve" or "東京" are one; Markdown symbols are not words.
- sentences: see `align.evaluation.text_counts.split_sentences`. IFEval uses a regex splitter; ours is written here (no nltk) and
  follows the same idea: a sentence ends at `.`, `!`, `?` or `…` unless the dot belongs to an
  abbreviation, an initial, a decimal number or a web address; line breaks are plain spaces.
- paragraphs: pieces of the text split on `***` (with one optional space or newline either side); an
  empty piece at the very start or end is ignored, an empty piece in the middle fails the check.
- bullets: lines starting (after spaces) with `*` not followed by another `*`, plus lines starting with
  `-`; IFEval counts both kinds.
- highlighted sections: `*text*` or `**text**` on one line with non-blank text; "at least N".
- sections: the number of `SECTION 1`, `SECTION 2`, ... markers (case sensitive; IFEval lets a prompt
  pick "Section" or "SECTION", here it is always "SECTION"); "at least N".
- case: `str.islower()` / `str.isupper()`: every cased character in that case and at least one cased
  character (so an empty reply or "123" fails both).
- JSON: the whole reply parses with `json.loads` (any JSON value) after stripping an opening ```json
  (or ```) fence and a closing ``` fence.
- title: some `<<...>>` on one line with non-blank text inside.
- placeholders: `[...]` on one line (including `[]`); "at least N".
- keywords: `include_keywords` and `keyword_frequency` match case-insensitive substrings (IFEval uses
  `re.search(keyword)`), `forbidden_words` matches case-insensitive whole words (IFEval's `\\b...\\b`).
- relations: "less than" is strict (`count < N`), "at least" is `count >= N`.
- the comma check looks for the ASCII comma only, as IFEval does (a full-width `，` is not a comma).
- the language check IFEval adds to the case rules (langdetect) is left out: no downloaded resources.

Every type also carries its instruction in several natural phrasings (`phrasings`), which the dataset
builder (`tools/build_ifprefs.py`) draws from; `describe` gives the first.
"""

from __future__ import annotations

import collections
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from align.errors import DataError
from align.evaluation.text_counts import (count_bullets, count_highlights, count_paragraphs, count_placeholders, count_sentences, count_words,
                               has_title)

RELATIONS = ("less than", "at least")

def _compare(count: int, relation: str, n: int) -> bool:
    return count < n if relation == "less than" else count >= n


# --------------------------------------------------------------------------------------------------
# Argument kinds: each validates one argument and tells the tests how to draw valid values.


@dataclass(frozen=True)
class IntArg:
    low: int
    high: int

    def check(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected an integer, got {value!r}"
        if not self.low <= value <= self.high:
            return f"expected an integer in [{self.low}, {self.high}], got {value}"
        return None


@dataclass(frozen=True)
class ChoiceArg:
    choices: tuple[str, ...]

    def check(self, value: Any) -> str | None:
        if value not in self.choices:
            return f"expected one of {', '.join(repr(c) for c in self.choices)}, got {value!r}"
        return None


_WORD_ARG_RE = re.compile(r"^\w+(?:[ '-]\w+)*$")


@dataclass(frozen=True)
class WordArg:
    """A word or short phrase of word characters, e.g. "solar" or "ice cream"."""

    def check(self, value: Any) -> str | None:
        if not isinstance(value, str) or not _WORD_ARG_RE.match(value):
            return f"expected a word (letters, digits, inner spaces, ' or -), got {value!r}"
        return None


@dataclass(frozen=True)
class WordListArg:
    max_len: int = 5

    def check(self, value: Any) -> str | None:
        if not isinstance(value, list) or not 1 <= len(value) <= self.max_len:
            return f"expected a list of 1 to {self.max_len} words, got {value!r}"
        for item in value:
            problem = WordArg().check(item)
            if problem:
                return problem
        return None


@dataclass(frozen=True)
class LetterArg:
    def check(self, value: Any) -> str | None:
        if not isinstance(value, str) or len(value) != 1 or not value.isalpha() or not value.islower():
            return f"expected one lowercase letter, got {value!r}"
        return None


@dataclass(frozen=True)
class PhraseArg:
    """A non-empty phrase on one line (an end phrase)."""

    max_chars: int = 200

    def check(self, value: Any) -> str | None:
        if not isinstance(value, str) or not value.strip() or "\n" in value or len(value) > self.max_chars:
            return f"expected a non-empty one-line phrase of at most {self.max_chars} characters, got {value!r}"
        return None


ArgKind = IntArg | ChoiceArg | WordArg | WordListArg | LetterArg | PhraseArg
REL = ChoiceArg(RELATIONS)

# --------------------------------------------------------------------------------------------------
# The constraint types


@dataclass(frozen=True)
class ConstraintType:
    name: str
    family: str
    ifeval_id: str | None  # the IFEval instruction whose meaning this copies, None if it has none
    args: dict[str, ArgKind]
    check: Callable[..., bool]  # check(response, **args) -> bool
    phrasings: Callable[..., list[str]]  # phrasings(**args) -> instruction texts, first is canonical


def _rel_words(relation: str, n: int, unit: str) -> tuple[str, str]:
    """('fewer than 50 words', 'at least 50 words')-style fragments."""
    counted = _n(n, unit)
    return (f"fewer than {counted}", f"less than {counted}") if relation == "less than" else (
        f"at least {counted}", f"no fewer than {counted}")


def _quoted_list(words: Sequence[str]) -> str:
    quoted = [f'"{w}"' for w in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _times(n: int) -> str:
    return {0: "zero times", 1: "once", 2: "twice"}.get(n, f"{n} times")


def _n(n: int, noun: str, plural: str | None = None) -> str:
    """'1 section', '2 sections'."""
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"


def _phrase_words(relation: str, num_words: int) -> list[str]:
    a, b = _rel_words(relation, num_words, "word")
    if relation == "less than":
        return [f"Answer in {a}.", f"Keep your response under {_n(num_words, 'word')}.",
                f"Your reply must be {b} long.", f"Please use {a} in total."]
    return [f"Answer in {a}.", f"Your response should be {b} long.",
            f"Write {a}.", f"Make sure the reply contains {a}."]


def _phrase_sentences(relation: str, num_sentences: int) -> list[str]:
    a, b = _rel_words(relation, num_sentences, "sentence")
    if relation == "less than":
        return [f"Your response should contain {a}.", f"Use {b}.",
                f"Keep it to {a}.", f"Answer in {a}."]
    return [f"Your response should contain {a}.", f"Write {b}.",
            f"Use {a}.", f"Make it {a} long."]


def _phrase_paragraphs(num_paragraphs: int) -> list[str]:
    n = num_paragraphs
    return [f"There should be exactly {_n(n, 'paragraph')}, separated by the markdown divider ***.",
            f"Write exactly {_n(n, 'paragraph')} and put *** on its own line between paragraphs.",
            f"Split your answer into {_n(n, 'paragraph')} separated by ***.",
            f"Your reply must have {_n(n, 'paragraph')}; separate them with ***."]


def _phrase_bullets(num_bullets: int) -> list[str]:
    n = num_bullets
    return [f"Your answer must contain exactly {_n(n, 'bullet point')} in markdown, like:\n* This is a point.",
            f"Format your reply as exactly {_n(n, 'markdown bullet point')} starting with \"* \".",
            f"Use exactly {_n(n, 'bullet point')} (lines beginning with \"* \").",
            f"Give your answer as a list of exactly {_n(n, 'bullet')}, with an asterisk at the start of each."]


def _phrase_sections(num_sections: int) -> list[str]:
    n = num_sections
    return [f"Your response must have {_n(n, 'section')}. Mark the beginning of each section with SECTION X, such as: SECTION 1.",
            f"Organize the answer into {_n(n, 'part')} labeled SECTION 1, SECTION 2 and so on.",
            f"Divide your reply into {_n(n, 'section')}, each starting with \"SECTION\" and its number.",
            f"Use {_n(n, 'section')}, headed SECTION 1 to SECTION {n}."]


TYPES: dict[str, ConstraintType] = {}


def _register(t: ConstraintType) -> None:
    TYPES[t.name] = t


_register(ConstraintType(
    "lowercase", "case", "change_case:english_lowercase", {},
    lambda r: r.islower(),
    lambda: ["Your entire response should be in English, and in all lowercase letters. No capital letters are allowed.",
             "Write everything in lowercase letters only.",
             "Do not use any capital letters in your reply.",
             "Please respond using only lowercase letters."],
))
_register(ConstraintType(
    "capitals", "case", "change_case:english_capital", {},
    lambda r: r.isupper(),
    lambda: ["Your entire response should be in English, and in all capital letters.",
             "Write your whole answer in CAPITAL LETTERS.",
             "Respond in all caps.",
             "Use only uppercase letters in your reply."],
))
_register(ConstraintType(
    "no_comma", "punctuation", "punctuation:no_comma", {},
    lambda r: "," not in r,
    lambda: ["In your entire response, refrain from the use of any commas.",
             "Do not use any commas.",
             "Avoid commas completely in your answer.",
             "Write the reply without a single comma."],
))
_register(ConstraintType(
    "num_words", "length", "length_constraints:number_words",
    {"relation": REL, "num_words": IntArg(1, 1000)},
    lambda r, relation, num_words: _compare(count_words(r), relation, num_words),
    _phrase_words,
))
_register(ConstraintType(
    "num_sentences", "length", "length_constraints:number_sentences",
    {"relation": REL, "num_sentences": IntArg(1, 100)},
    lambda r, relation, num_sentences: _compare(count_sentences(r), relation, num_sentences),
    _phrase_sentences,
))
_register(ConstraintType(
    "num_paragraphs", "length", "length_constraints:number_paragraphs",
    {"num_paragraphs": IntArg(2, 20)},
    lambda r, num_paragraphs: count_paragraphs(r) == num_paragraphs,
    _phrase_paragraphs,
))
_register(ConstraintType(
    "num_bullets", "format", "detectable_format:number_bullet_lists",
    {"num_bullets": IntArg(1, 20)},
    lambda r, num_bullets: count_bullets(r) == num_bullets,
    _phrase_bullets,
))


def _is_json(response: str) -> bool:
    value = (response.strip().removeprefix("```json").removeprefix("```Json").removeprefix("```JSON")
             .removeprefix("```").removesuffix("```").strip())  # IFEval's exact sequence
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


_register(ConstraintType(
    "json_format", "format", "detectable_format:json_format", {},
    _is_json,
    lambda: ["Entire output should be wrapped in JSON format. You can use markdown ticks such as ```.",
             "Reply with valid JSON only.",
             "Format your whole answer as a JSON object.",
             "Your response must be a single JSON document, optionally inside ``` fences."],
))
_register(ConstraintType(
    "title", "format", "detectable_format:title", {},
    has_title,
    lambda: ["Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
             "Give your reply a title in double angle brackets, like <<my title>>.",
             "Start with a title wrapped in << and >>.",
             "Include a title enclosed in double angular brackets, for example <<a fine day>>."],
))
_register(ConstraintType(
    "num_highlights", "format", "detectable_format:number_highlighted_sections",
    {"num_highlights": IntArg(1, 20)},
    lambda r, num_highlights: count_highlights(r) >= num_highlights,
    lambda num_highlights: [
        f"Highlight at least {_n(num_highlights, 'section')} in your answer with markdown, i.e. *highlighted section*.",
        f"Use markdown to highlight at least {_n(num_highlights, 'part')} of the reply, like *this*.",
        f"Mark at least {_n(num_highlights, 'key phrase')} with single asterisks, e.g. *important*.",
        f"Emphasize at least {_n(num_highlights, 'section')} by wrapping {'it' if num_highlights == 1 else 'them'} in asterisks."],
))
_register(ConstraintType(
    "num_sections", "format", "detectable_format:multiple_sections",
    {"num_sections": IntArg(2, 20)},
    lambda r, num_sections: len(re.split(r"\s?SECTION\s?\d+\s?", r)) - 1 >= num_sections,
    _phrase_sections,
))
_register(ConstraintType(
    "num_placeholders", "format", "detectable_content:number_placeholders",
    {"num_placeholders": IntArg(1, 20)},
    lambda r, num_placeholders: count_placeholders(r) >= num_placeholders,
    lambda num_placeholders: [
        f"The response must contain at least {_n(num_placeholders, 'placeholder')} represented by square brackets, such as [address].",
        f"Include at least {_n(num_placeholders, 'placeholder')} in square brackets, like [name].",
        f"Leave at least {_n(num_placeholders, 'blank')} for the reader to fill in, written as [placeholder].",
        f"Use at least {_n(num_placeholders, 'bracketed placeholder')} such as [date]."],
))
_register(ConstraintType(
    "include_keywords", "keywords", "keywords:existence",
    {"keywords": WordListArg()},
    lambda r, keywords: all(re.search(re.escape(k), r, flags=re.IGNORECASE) for k in keywords),
    lambda keywords: [
        f"Include the keywords {_quoted_list(keywords)} in the response.",
        f"Make sure to use the {'word' if len(keywords) == 1 else 'words'} {_quoted_list(keywords)}.",
        f"Your reply must mention {_quoted_list(keywords)}.",
        f"Work {'this word' if len(keywords) == 1 else 'these words'} into your answer: {_quoted_list(keywords)}."],
))
_register(ConstraintType(
    "forbidden_words", "keywords", "keywords:forbidden_words",
    {"forbidden_words": WordListArg()},
    lambda r, forbidden_words: not any(
        re.search(r"\b" + re.escape(w) + r"\b", r, flags=re.IGNORECASE) for w in forbidden_words),
    lambda forbidden_words: [
        f"Do not include the keywords {_quoted_list(forbidden_words)} in the response.",
        f"Avoid the {'word' if len(forbidden_words) == 1 else 'words'} {_quoted_list(forbidden_words)}.",
        f"Never use {'the word' if len(forbidden_words) == 1 else 'the words'} {_quoted_list(forbidden_words)} in your reply.",
        f"Write your answer without using {_quoted_list(forbidden_words)}."],
))
_register(ConstraintType(
    "keyword_frequency", "keywords", "keywords:frequency",
    {"keyword": WordArg(), "relation": REL, "frequency": IntArg(1, 50)},
    lambda r, keyword, relation, frequency: _compare(
        len(re.findall(re.escape(keyword), r, flags=re.IGNORECASE)), relation, frequency),
    lambda keyword, relation, frequency: (
        [f'In your response, the word "{keyword}" should appear less than {frequency} times.',
         f'Use the word "{keyword}" fewer than {frequency} times.',
         f'Do not overuse "{keyword}": it may appear at most {_times(frequency - 1)}.']
        if relation == "less than" else
        [f'In your response, the word "{keyword}" should appear at least {frequency} times.',
         f'Use the word "{keyword}" at least {_times(frequency)}.',
         f'Mention "{keyword}" {_times(frequency)} or more.',
         f'Make sure "{keyword}" occurs at least {_times(frequency)} in your answer.']),
))
_register(ConstraintType(
    "letter_frequency", "keywords", "keywords:letter_frequency",
    {"letter": LetterArg(), "relation": REL, "frequency": IntArg(1, 200)},
    lambda r, letter, relation, frequency: _compare(
        collections.Counter(r.lower())[letter], relation, frequency),
    lambda letter, relation, frequency: (
        [f'In your response, the letter "{letter}" should appear less than {frequency} times.',
         f'Use the letter "{letter}" fewer than {frequency} times.',
         f'The letter "{letter}" may appear at most {_times(frequency - 1)} in your reply.']
        if relation == "less than" else
        [f'In your response, the letter "{letter}" should appear at least {frequency} times.',
         f'Use the letter "{letter}" at least {_times(frequency)}.',
         f'Make sure the letter "{letter}" shows up {_times(frequency)} or more.']),
))
_register(ConstraintType(
    "end_phrase", "start_end", "startend:end_checker",
    {"end_phrase": PhraseArg()},
    lambda r, end_phrase: r.strip().strip('"').lower().endswith(end_phrase.strip().lower()),
    lambda end_phrase: [
        f'Finish your response with this exact phrase: "{end_phrase}". No other words should follow it.',
        f'End your reply with the exact words "{end_phrase}".',
        f'Your answer must end with "{end_phrase}" and nothing after it.',
        f'Close with the phrase "{end_phrase}".'],
))
_register(ConstraintType(
    "quotation", "start_end", "startend:quotation", {},
    lambda r: len(r.strip()) > 1 and r.strip()[0] == '"' and r.strip()[-1] == '"',
    lambda: ["Wrap your entire response with double quotation marks.",
             "Put your whole answer inside double quotes.",
             "Enclose the entire reply in double quotation marks.",
             "Your response should begin and end with a double quote (\")."],
))


def _has_postscript(response: str, postscript_marker: str) -> bool:
    value = response.lower()
    if postscript_marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    else:
        pattern = r"\s*p\.\s?s\..*$"
    return re.search(pattern, value, flags=re.MULTILINE) is not None


_register(ConstraintType(
    "postscript", "start_end", "detectable_content:postscript",
    {"postscript_marker": ChoiceArg(("P.S.", "P.P.S"))},
    _has_postscript,
    lambda postscript_marker: [
        f"At the end of your response, please explicitly add a postscript starting with {postscript_marker}",
        f"Add a postscript that begins with {postscript_marker} at the end.",
        f"End with a short note starting with {postscript_marker}",
        f"Include a {postscript_marker} line after the main text."],
))


# --------------------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True)
class Verdict:
    passed: list[bool]  # one per constraint, in order
    score: float  # fraction of constraints passed, in [0, 1]
    strict: bool  # all constraints passed (IFEval's prompt-level strict accuracy)


def check_constraint(constraint: Any, where: str = "constraint") -> tuple[ConstraintType, dict[str, Any]]:
    """Validate one constraint; return its type and its arguments. Raises DataError naming type or arg."""
    if not isinstance(constraint, dict):
        raise DataError(f"{where}: expected a {{\"type\": ..., ...}} object, got {type(constraint).__name__}")
    name = constraint.get("type")
    ctype = TYPES.get(name) if isinstance(name, str) else None
    if ctype is None:
        raise DataError(f"{where}: unknown constraint type {name!r}, expected one of {', '.join(sorted(TYPES))}")
    args = {k: v for k, v in constraint.items() if k != "type"}
    extra = sorted(set(args) - set(ctype.args))
    if extra:
        raise DataError(f"{where}: constraint {name!r}: unknown arg {extra[0]!r}, "
                        f"expected {', '.join(ctype.args) or 'no args'}")
    for arg_name, kind in ctype.args.items():
        if arg_name not in args:
            raise DataError(f"{where}: constraint {name!r}: missing arg {arg_name!r}")
        problem = kind.check(args[arg_name])
        if problem:
            raise DataError(f"{where}: constraint {name!r}: arg {arg_name!r}: {problem}")
    return ctype, args


def check_constraints(constraints: Any, where: str = "constraints") -> list[tuple[ConstraintType, dict[str, Any]]]:
    if not isinstance(constraints, list) or not constraints:
        raise DataError(f"{where}: expected a non-empty list of constraints, got {constraints!r}")
    return [check_constraint(c, f"{where}[{i}]") for i, c in enumerate(constraints)]


# The type of each IFEval instruction id that has one; IFEval's argument names where they differ from ours, and the
# IFEval arguments of which one value is checked here.
_BY_IFEVAL_ID = {t.ifeval_id: t for t in TYPES.values() if t.ifeval_id}
_IFEVAL_ARG_NAMES = {"keywords:letter_frequency": {"let_frequency": "frequency", "let_relation": "relation"}}
_IFEVAL_FIXED_ARGS = {"detectable_format:multiple_sections": {"section_spliter": "SECTION"}}


def from_ifeval(instruction_id: Any, kwargs: Any, where: str = "instruction") -> dict[str, Any]:
    """One instruction of an IFEval prompt (its id and kwargs, as in IFEval's input_data.jsonl) as the constraint of
    ours with its meaning, checked: `("punctuation:no_comma", {})` -> `{"type": "no_comma"}`. Null kwargs are IFEval's
    "not set". Raises DataError naming `where` for an instruction with no check here (IFEval's language detection,
    capital-word counts, repeated prompts, two responses, constrained answers, first words of paragraphs; sections
    split by another word than SECTION) and for arguments outside what our check accepts."""
    ctype = _BY_IFEVAL_ID.get(instruction_id) if isinstance(instruction_id, str) else None
    if ctype is None:
        raise DataError(f"{where}: IFEval instruction {instruction_id!r} has no check here (the {len(_BY_IFEVAL_ID)} that have are "
                        "the ifeval_id of the types in align/evaluation/verifier.py)")
    if not isinstance(kwargs, dict):
        raise DataError(f"{where}: IFEval kwargs of {instruction_id!r}: expected an object, got {type(kwargs).__name__}")
    names = _IFEVAL_ARG_NAMES.get(instruction_id, {})
    args = {names.get(k, k): v for k, v in kwargs.items() if v is not None}
    for name, value in _IFEVAL_FIXED_ARGS.get(instruction_id, {}).items():
        if args.pop(name, value) != value:
            raise DataError(f"{where}: IFEval instruction {instruction_id!r}: {name} {kwargs[name]!r} has no check here; "
                            f"only {value!r} is checked")
    constraint = {"type": ctype.name, **args}
    check_constraint(constraint, where)
    return constraint


def verify(response: str, constraints: Sequence[dict], where: str = "constraints") -> Verdict:
    """Check `response` against each constraint; `score` is the fraction passed, `strict` all passed."""
    if not isinstance(response, str):
        raise DataError(f"{where}: the response must be a string, got {type(response).__name__}")
    checked = check_constraints(list(constraints), where)
    passed = [bool(ctype.check(response, **args)) for ctype, args in checked]
    return Verdict(passed=passed, score=sum(passed) / len(passed), strict=all(passed))


def verifier_reward(prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
    """Reward per (prompt, response): the fraction of the prompt's `.constraints` the response meets.

    `prompts` are objects with a `.constraints` list (e.g. `align.records.PromptRecord`), or dicts with a
    "constraints" key; `responses` are the decoded replies, same length. Usable as a PPO reward function.
    """
    if len(prompts) != len(responses):
        raise DataError(f"verifier_reward: {len(prompts)} prompts but {len(responses)} responses")
    rewards = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        constraints = prompt.get("constraints") if isinstance(prompt, dict) else getattr(prompt, "constraints", None)
        where = getattr(prompt, "source", None) or f"prompts[{i}]"
        if not constraints:
            raise DataError(f"{where}: field 'constraints': this prompt has none, so the verifier cannot score it")
        rewards.append(verify(response, constraints, f"{where}: field 'constraints'").score)
    return rewards


# What a degenerate reply earns under the guarded reward: nothing, the score of a reply that meets no
# constraint. Not negative: a penalty below every honest reply would also teach the policy to avoid
# whatever the check catches by accident (a short refrain sung a third time) more than to comply.
GUARD_REWARD = 0.0


def guarded_verifier_reward(prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
    """`verifier_reward`, except that a degenerate reply (align.evaluation.degeneration.check_reply: a repetition
    loop, a repeated tail, line or sentence, a title twice, an empty section, an instruction copied from the prompt, no
    answer) earns GUARD_REWARD.

    The raw verifier pays 1.0 for `*Important*` forty times on "mark at least 2 key phrases"; a policy
    optimised against it learns such text (issue 23). `prompts` as in `verifier_reward`; a prompt's
    `.prompt` messages (or dict "prompt") are what its instructions are read from.
    """
    from align.evaluation.degeneration import check_reply

    rewards = verifier_reward(prompts, responses)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        messages = prompt.get("prompt") if isinstance(prompt, dict) else getattr(prompt, "prompt", None)
        constraints = prompt.get("constraints") if isinstance(prompt, dict) else getattr(prompt, "constraints", None)
        if check_reply(response, messages or "", constraints).degenerate:
            rewards[i] = GUARD_REWARD
    return rewards


def phrasings(constraint: dict) -> list[str]:
    """All natural phrasings of the constraint's instruction; the first is the canonical one."""
    ctype, args = check_constraint(constraint)
    return ctype.phrasings(**args)


def describe(constraint: dict) -> str:
    """The canonical instruction text for one constraint."""
    return phrasings(constraint)[0]
