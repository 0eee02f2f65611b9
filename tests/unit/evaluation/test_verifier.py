"""The verifier, constraint by constraint: hand-written replies that pass and that fail, edge cases
(empty reply, Markdown, Unicode), argument validation, the score arithmetic, and a property test."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from align.errors import DataError
from align.evaluation.text_counts import count_bullets, count_highlights, count_paragraphs, count_placeholders, count_words, split_sentences
from align.evaluation.verifier import (TYPES, ChoiceArg, IntArg, LetterArg, PhraseArg, WordArg, WordListArg, describe, from_ifeval, phrasings,
                                      verifier_reward, verify)
from align.records import PromptRecord


def ok(response: str, constraint: dict) -> bool:
    verdict = verify(response, [constraint])
    assert verdict.passed == [verdict.strict]
    return verdict.strict


# ---------------------------------------------------------------- counting rules


def test_words_are_runs_of_word_characters():
    # "Don't e-mail me" -> Don, t, e, mail, me; "naïve" and "東京" are one run each; "**" and "-" are not words
    assert count_words("Don't e-mail me!") == 5
    assert count_words("**naïve** 東京 - 42") == 3
    assert count_words("") == 0
    assert count_words("  \n *** \n ") == 0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", []),
        ("   ", []),
        ("One. Two! Three?", ["One.", "Two!", "Three?"]),
        ("No terminator at the end", ["No terminator at the end"]),
        ("Dr. Smith arrived at 3.30 p.m. on Monday. He left.", ["Dr. Smith arrived at 3.30 p.m. on Monday.", "He left."]),
        ("Really?! Yes... Fine.", ["Really?!", "Yes...", "Fine."]),
        ("J. K. Rowling wrote it. So did I. Then we left.", ["J. K. Rowling wrote it.", "So did I.", "Then we left."]),
        ('He said "stop." She stopped.', ['He said "stop."', "She stopped."]),
        ("Visit example.com today. Bye.", ["Visit example.com today.", "Bye."]),
        ("First line\nsecond line. Third.", ["First line second line.", "Third."]),
        ("1. Apples\n2. Pears", ["1. Apples 2. Pears"]),
        ("You need flour, eggs, etc. Then bake.", ["You need flour, eggs, etc.", "Then bake."]),
        ("Une phrase. Ünïcödé sentence… 東京に行きました。 End", ["Une phrase.", "Ünïcödé sentence…", "東京に行きました。", "End"]),
        ("* . *", []),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


def test_paragraphs_split_on_three_stars():
    assert count_paragraphs("One.\n***\nTwo.\n***\nThree.") == 3
    assert count_paragraphs("***\nOne.\n***\nTwo.\n***") == 2  # empty first and last pieces are ignored
    assert count_paragraphs("One.\n***\n\n***\nTwo.") is None  # an empty paragraph in the middle fails
    assert count_paragraphs("One paragraph only.\n\nBlank lines do not split.") == 1
    assert count_paragraphs("") == 0


def test_bullets_count_star_and_dash_lines():
    text = "Intro line\n* one\n  * nested two\n- three\n**Bold heading**\n*italic start*"
    # "* one", "  * nested two", "- three" and "*italic start" (a star, then not a star) are bullets;
    # "**Bold heading**" is not
    assert count_bullets(text) == 4
    assert count_bullets("") == 0


def test_highlights_count_single_and_double_stars():
    # "*one*" and "*two*" are single highlights; "**three**" is one double highlight (its single-star
    # matches "**" are empty and not counted); "* *" is blank; a span never crosses a line break
    assert count_highlights("*one* and *two* and **three** and * * and *four\nfive*") == 3
    assert count_highlights("no stars") == 0


def test_placeholders_are_bracketed_spans_on_one_line():
    assert count_placeholders("Dear [name], see you at [place] on []. [broken\nspan]") == 3


# ---------------------------------------------------------------- each type: pass and fail


CASES: list[tuple[dict, list[str], list[str]]] = [
    ({"type": "lowercase"},
     ["all lowercase here.", "naïve café, 東京 too", "* a list\n* of items"],
     ["Capital at the start.", "", "123 ...", "ÉCOLE"]),
    ({"type": "capitals"},
     ["ALL CAPS HERE.", "ÉCOLE 42!", "# TITLE\n* ITEM"],
     ["ALL CAPS but one", "", "42"]),
    ({"type": "no_comma"},
     ["No commas here.", "", "Full-width ， is not an ASCII comma"],
     ["One, two.", "1,000 people"]),
    ({"type": "num_words", "relation": "less than", "num_words": 4},
     ["one two three", "", "**bold** *and* ***"],
     ["one two three four", "don't stop me"]),
    ({"type": "num_words", "relation": "at least", "num_words": 4},
     ["one two three four", "don't stop me"],
     ["one two three", ""]),
    ({"type": "num_sentences", "relation": "less than", "num_sentences": 3},
     ["One. Two.", "Dr. Who met Mr. Smith at 5 p.m. today. Fine.", ""],
     ["One. Two. Three.", "Wait! What? No."]),
    ({"type": "num_sentences", "relation": "at least", "num_sentences": 3},
     ["One. Two. Three.", "Wait! What? No"],
     ["One. Two.", "", "Dr. Who met Mr. Smith. Fine."]),
    ({"type": "num_paragraphs", "num_paragraphs": 2},
     ["First.\n\n***\n\nSecond.", "First *** Second", "***\nFirst\n***\nSecond\n***"],
     ["First.\n\nSecond.", "First\n***\n\n***\nSecond", "", "A\n***\nB\n***\nC"]),
    ({"type": "num_bullets", "num_bullets": 2},
     ["Here:\n* one\n* two", "- one\n- two", "* one\n- two\n**not a bullet**"],
     ["* one", "* one\n* two\n* three", "", "1. one\n2. two"]),
    ({"type": "json_format"},
     # IFEval strips an opening ``` fence and a closing one independently, so an unclosed fence passes
     ['{"a": 1}', '```json\n{"a": [1, 2]}\n```', "  [1, 2]  ", '```\n"just a string"\n```', '```json\n{"a": 1}'],
     ["{a: 1}", "", "Here is JSON: {\"a\": 1}", '```python\n{"a": 1}\n```']),
    ({"type": "title"},
     ["<<My Poem>>\nRoses are red.", "Text then <<a title>> later", "<<  Ünïcode  >>"],
     ["<< >>", "<<>>", "No title", "<<broken\ntitle>>", ""]),
    ({"type": "num_highlights", "num_highlights": 2},
     ["*one* and *two*", "**bold one** and *two*", "*a* *b* *c*"],
     ["*one* only", "* * and ** **", "", "*spans\nlines*"]),
    ({"type": "num_sections", "num_sections": 2},
     ["SECTION 1\nIntro.\nSECTION 2\nBody.", "SECTION 1 a SECTION 2 b SECTION 3 c"],
     ["Section 1\nIntro.\nSection 2\nBody.", "SECTION 1 only", "", "SECTION one SECTION two"]),
    ({"type": "num_placeholders", "num_placeholders": 2},
     ["Dear [name], meet at [place].", "[a][b][c]"],
     ["Dear [name], see you.", "", "[spans\nlines] [x]"]),
    ({"type": "include_keywords", "keywords": ["solar", "ice cream"]},
     ["SOLAR power and Ice Cream.", "solarpanels sell ice creams"],
     ["solar only", "", "ice cream only"]),
    ({"type": "forbidden_words", "forbidden_words": ["cat"]},
     ["A dog.", "category and concatenate are fine", ""],
     ["The CAT sat.", "cat", "my cat's toy"]),
    ({"type": "keyword_frequency", "keyword": "tea", "relation": "at least", "frequency": 2},
     ["Tea and more TEA.", "steam tea"],
     ["tea once", ""]),
    ({"type": "keyword_frequency", "keyword": "tea", "relation": "less than", "frequency": 2},
     ["tea once", "", "coffee"],
     ["Tea and more TEA.", "steam tea"]),
    ({"type": "letter_frequency", "letter": "e", "relation": "at least", "frequency": 3},
     ["Eee", "see me"],
     ["ee", "", "éé é"]),
    ({"type": "letter_frequency", "letter": "e", "relation": "less than", "frequency": 3},
     ["ee", "", "éééé"],
     ["Eee", "see me"]),
    ({"type": "end_phrase", "end_phrase": "Any other questions?"},
     ["Done. Any other questions?", '"Done. any other QUESTIONS?"', "Done. Any other questions?   \n"],
     ["Any other questions? Yes.", "", "Done. Any other questions"]),
    ({"type": "quotation"},
     ['"Quoted."', '  "multi\nline"  ', '""'],
     ['"', "", 'Not "quoted"', '"open only']),
    ({"type": "postscript", "postscript_marker": "P.S."},
     ["Body.\n\nP.S. Call me.", "Body. p.s. lowercase too", "Body.\nP. S. spaced"],
     ["Body.", "", "PS call me", "P.P.S only"]),
    ({"type": "postscript", "postscript_marker": "P.P.S"},
     ["Body.\nP.P.S see you", "Body.\np. p. s. spaced"],
     ["Body.\nP.S. only", ""]),
]


@pytest.mark.parametrize("constraint, passing, failing", CASES, ids=[f"{c['type']}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_constraint_pass_and_fail(constraint, passing, failing):
    for response in passing:
        assert ok(response, constraint), f"should pass: {response!r}"
    for response in failing:
        assert not ok(response, constraint), f"should fail: {response!r}"


def test_every_type_has_cases():
    assert {c["type"] for c, _, _ in CASES} == set(TYPES)
    assert len(TYPES) >= 15


# IFEval's names for our arguments, where they differ (its instructions.py: LetterFrequencyChecker).
IFEVAL_NAMES = {"letter_frequency": {"frequency": "let_frequency", "relation": "let_relation"}}


@pytest.mark.parametrize("constraint", [c for c, _, _ in CASES if TYPES[c["type"]].ifeval_id], ids=lambda c: c["type"])
def test_each_ifeval_instruction_reads_as_the_constraint_with_its_meaning(constraint):
    name = constraint["type"]
    names = IFEVAL_NAMES.get(name, {})
    kwargs = {names.get(k, k): v for k, v in constraint.items() if k != "type"}
    assert from_ifeval(TYPES[name].ifeval_id, kwargs) == constraint
    # IFEval's HF copy writes every argument of every instruction, null where unset.
    unset = {"num_highlights": None, "language": None, "capital_frequency": None}
    assert from_ifeval(TYPES[name].ifeval_id, {**unset, **kwargs}) == constraint


@pytest.mark.parametrize("instruction_id, kwargs, message", [
    ("language:response_language", {"language": "kn"}, "IFEval instruction 'language:response_language' has no check here"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "p"}, "'combination:repeat_prompt' has no check here"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 3},
     "section_spliter 'Section' has no check here; only 'SECTION' is checked"),
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 4, "let_relation": "at least"}, "arg 'letter': expected one lowercase letter"),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 1200}, "arg 'num_words': expected an integer in [1, 1000]"),
    ("punctuation:no_comma", {"num_words": 3}, "unknown arg 'num_words'"),
    ("punctuation:no_comma", [], "expected an object, got list"),
    (None, {}, "IFEval instruction None has no check here"),
])
def test_ifeval_instructions_without_a_check_here_are_data_errors_naming_where(instruction_id, kwargs, message):
    with pytest.raises(DataError, match="^x.jsonl line 4: field 'instruction_id_list\\[1\\]': .*" + re.escape(message)):
        from_ifeval(instruction_id, kwargs, "x.jsonl line 4: field 'instruction_id_list[1]'")


def test_multiple_sections_split_by_section_read_as_num_sections():
    assert from_ifeval("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 4}) == {
        "type": "num_sections", "num_sections": 4}


def test_markdown_reply_against_several_constraints():
    reply = ("<<Garden Notes>>\n\n"
             "Composting is *easy* and **cheap**.\n\n"
             "* Save scraps\n* Turn the pile\n* Wait\n\n"
             "P.S. Start today")
    constraints = [
        {"type": "title"},
        {"type": "num_bullets", "num_bullets": 3},
        {"type": "num_highlights", "num_highlights": 2},
        {"type": "postscript", "postscript_marker": "P.S."},
        {"type": "no_comma"},
        {"type": "lowercase"},
    ]
    verdict = verify(reply, constraints)
    assert verdict.passed == [True, True, True, True, True, False]
    assert verdict.score == pytest.approx(5 / 6)
    assert verdict.strict is False


# ---------------------------------------------------------------- API, errors, phrasings


def test_score_is_fraction_and_strict_is_all():
    constraints = [{"type": "lowercase"}, {"type": "no_comma"}, {"type": "quotation"}, {"type": "title"}]
    # "hello, world": lowercase yes, no_comma no, quotation no, title no -> 1/4
    verdict = verify("hello, world", constraints)
    assert verdict.passed == [True, False, False, False]
    assert verdict.score == 0.25 and verdict.strict is False
    assert verify('"<<t>> hello"', constraints).strict is True


@pytest.mark.parametrize(
    "constraint, message",
    [
        ({"type": "shout"}, "unknown constraint type 'shout'"),
        ({"kind": "lowercase"}, "unknown constraint type None"),
        ("lowercase", "expected a {\"type\": ..., ...} object"),
        ({"type": "lowercase", "extra": 1}, "unknown arg 'extra'"),
        ({"type": "num_words", "relation": "less than"}, "missing arg 'num_words'"),
        ({"type": "num_words", "relation": "fewer", "num_words": 3}, "arg 'relation'"),
        ({"type": "num_words", "relation": "less than", "num_words": "3"}, "arg 'num_words': expected an integer"),
        ({"type": "num_words", "relation": "less than", "num_words": True}, "arg 'num_words'"),
        ({"type": "num_bullets", "num_bullets": 0}, "arg 'num_bullets': expected an integer in [1, 20]"),
        ({"type": "include_keywords", "keywords": []}, "arg 'keywords'"),
        ({"type": "include_keywords", "keywords": ["a.*"]}, "arg 'keywords'"),
        ({"type": "letter_frequency", "letter": "E", "relation": "at least", "frequency": 2}, "arg 'letter'"),
        ({"type": "end_phrase", "end_phrase": "  "}, "arg 'end_phrase'"),
        ({"type": "postscript", "postscript_marker": "PS"}, "arg 'postscript_marker'"),
    ],
)
def test_bad_constraints_raise_data_error_naming_type_or_arg(constraint, message):
    with pytest.raises(DataError, match=None) as err:
        verify("text", [constraint])
    assert message in str(err.value)
    assert "constraints[0]" in str(err.value)


def test_empty_or_non_list_constraints_raise():
    with pytest.raises(DataError, match="non-empty list"):
        verify("text", [])
    with pytest.raises(DataError, match="must be a string"):
        verify(None, [{"type": "lowercase"}])  # type: ignore[arg-type]


def test_verifier_reward_on_prompt_records_and_dicts():
    records = [
        PromptRecord([{"role": "user", "content": "hi"}], "f.jsonl:1", [{"type": "lowercase"}, {"type": "no_comma"}]),
        {"constraints": [{"type": "quotation"}]},
    ]
    assert verifier_reward(records, ["ok, fine", '"quoted"']) == [0.5, 1.0]
    with pytest.raises(DataError, match="2 prompts but 1 responses"):
        verifier_reward(records, ["x"])
    with pytest.raises(DataError, match="f.jsonl:2: field 'constraints': this prompt has none"):
        verifier_reward([PromptRecord([{"role": "user", "content": "hi"}], "f.jsonl:2")], ["x"])


EXAMPLE_ARGS = {
    "num_words": {"relation": "less than", "num_words": 50},
    "num_sentences": {"relation": "at least", "num_sentences": 3},
    "num_paragraphs": {"num_paragraphs": 3},
    "num_bullets": {"num_bullets": 4},
    "num_highlights": {"num_highlights": 2},
    "num_sections": {"num_sections": 3},
    "num_placeholders": {"num_placeholders": 2},
    "include_keywords": {"keywords": ["river", "stone"]},
    "forbidden_words": {"forbidden_words": ["very"]},
    "keyword_frequency": {"keyword": "tea", "relation": "at least", "frequency": 3},
    "letter_frequency": {"letter": "q", "relation": "less than", "frequency": 4},
    "end_phrase": {"end_phrase": "Is there anything else I can help with?"},
    "postscript": {"postscript_marker": "P.S."},
}


@pytest.mark.parametrize("name", sorted(TYPES))
def test_each_type_has_several_distinct_phrasings(name):
    constraint = {"type": name, **EXAMPLE_ARGS.get(name, {})}
    texts = phrasings(constraint)
    assert len(texts) >= 3 and len(set(texts)) == len(texts)
    assert describe(constraint) == texts[0]
    for key, value in EXAMPLE_ARGS.get(name, {}).items():
        if isinstance(value, int) and key != "frequency":
            assert all(str(value) in t for t in texts), (key, texts)


def test_relation_changes_the_wording():
    less = describe({"type": "num_words", "relation": "less than", "num_words": 50})
    least = describe({"type": "num_words", "relation": "at least", "num_words": 50})
    assert "fewer than 50" in less and "at least 50" in least


# ---------------------------------------------------------------- properties and speed


def _strategy(kind) -> st.SearchStrategy:
    word = st.text(st.characters(categories=("Ll", "Lu", "Nd")), min_size=1, max_size=8)
    if isinstance(kind, IntArg):
        return st.integers(kind.low, kind.high)
    if isinstance(kind, ChoiceArg):
        return st.sampled_from(kind.choices)
    if isinstance(kind, WordArg):
        return word
    if isinstance(kind, WordListArg):
        return st.lists(word, min_size=1, max_size=kind.max_len)
    if isinstance(kind, LetterArg):
        return st.sampled_from("abcdefghijklmnopqrstuvwxyz")
    if isinstance(kind, PhraseArg):
        return st.text(st.characters(exclude_characters="\n"), min_size=1, max_size=40).filter(lambda s: s.strip())
    raise AssertionError(f"no strategy for {kind!r}")


constraint_strategy = st.sampled_from(sorted(TYPES)).flatmap(
    lambda name: st.fixed_dictionaries({"type": st.just(name), **{a: _strategy(k) for a, k in TYPES[name].args.items()}})
)
markdownish = st.lists(st.sampled_from(list("ab É東 ,.!?*-#[]<>{}\"'\n\t:0123456789PSs") + ["***", "SECTION 1", "P.S.", "```json"])).map("".join)


@settings(max_examples=200, deadline=None)
@given(response=st.one_of(st.text(), markdownish), constraints=st.lists(constraint_strategy, min_size=1, max_size=4))
def test_any_response_and_valid_constraints_give_bools(response, constraints):
    verdict = verify(response, constraints)
    assert len(verdict.passed) == len(constraints)
    assert all(type(p) is bool for p in verdict.passed)
    assert 0.0 <= verdict.score <= 1.0
    assert verdict.strict == all(verdict.passed)
    for c in constraints:
        assert describe(c)


def test_json_check_matches_json_module():
    assert ok(json.dumps({"x": "a, b"}), {"type": "json_format"})


# ---- the guarded reward (issue 23) -------------------------------------------------------------------


def _guard_cases():
    """The four kinds of issue 23 with the constraints they game, and what the raw verifier pays them."""
    from test_degeneration import (
        BRIGHT_PROMPT, BRIGHT_REPLY, IMPORTANT_PROMPT, IMPORTANT_REPLY, PS_CONSTRAINTS, PS_PROMPT, PS_REPLY, SECTION_PROMPT,
        SECTION_REPLY,
    )

    return [
        (IMPORTANT_PROMPT, [{"type": "num_highlights", "num_highlights": 2}], IMPORTANT_REPLY),
        (PS_PROMPT, PS_CONSTRAINTS, PS_REPLY),
        (BRIGHT_PROMPT, [{"type": "include_keywords", "keywords": ["bright"]}], BRIGHT_REPLY),
        (SECTION_PROMPT, [{"type": "num_sections", "num_sections": 2}], SECTION_REPLY),
    ]


def test_guarded_reward_pays_nothing_for_the_four_kinds_the_raw_verifier_pays_for():
    from align.evaluation.verifier import GUARD_REWARD, guarded_verifier_reward

    cases = _guard_cases()
    records = [PromptRecord([{"role": "user", "content": p}], f"t.jsonl:{i}", constraints=c) for i, (p, c, _) in enumerate(cases)]
    replies = [r for _, _, r in cases]
    raw = verifier_reward(records, replies)
    assert min(raw) >= 0.5 and sum(raw) / len(raw) >= 0.75  # the hack pays under the raw verifier
    assert guarded_verifier_reward(records, replies) == [GUARD_REWARD] * 4
    # dicts with "prompt" and "constraints" work the same
    dicts = [{"prompt": r.prompt, "constraints": r.constraints} for r in records]
    assert guarded_verifier_reward(dicts, replies) == [GUARD_REWARD] * 4


def test_guarded_reward_keeps_the_full_score_of_an_ordinary_compliant_reply():
    from align.evaluation.verifier import guarded_verifier_reward

    prompt = "Write a short cover letter for a volunteer job related to octopuses. Mark at least 2 key phrases with single asterisks, e.g. *important*."
    record = PromptRecord([{"role": "user", "content": prompt}], "t.jsonl:1", constraints=[{"type": "num_highlights", "num_highlights": 2}])
    reply = ("Dear Hiring Manager,\n\nI would like to volunteer at the aquarium's octopus exhibit. I have *three years of "
             "experience* caring for marine animals and I am *comfortable explaining* cephalopod behaviour to visitors.\n\n"
             "Thank you for your time,\nSam")
    assert verifier_reward([record], [reply]) == [1.0]
    assert guarded_verifier_reward([record], [reply]) == [1.0]
