"""Tests for align/data.py: every format from every file type, the bad-data corpus, sources, streaming,
lengths, the TRL dataset and the `python -m align.data check` command.

The corpus lives in tests/support/data/good (one file per format) and tests/support/data/bad (one problem per file, the
bad row after a good one so that line numbers are not trivially 1).
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from align.config import build_config
from align.errors import ConfigError, DataError
from align.data.formats import detect_format
from align.data.load import (
    DataArgs,
    LoadStats,
    check_lengths,
    iter_preferences,
    iter_prompts,
    iter_sft,
    load_preferences,
    load_prompts,
    load_sft,
    to_hf_dataset,
)
from align.data.sources import datasets_dir
from align.records import PreferencePair, PromptRecord, SFTExample
from repo_paths import DATA, REPO

GOOD = DATA / "good"
BAD = DATA / "bad"

LOADERS = {"prefs": load_preferences, "sft": load_sft, "prompts": load_prompts}
GOOD_FILES = {
    "prefs_strings.jsonl": ("prefs", "strings"),
    "prefs_conversational.jsonl": ("prefs", "conversational"),
    "prefs_conversational_implicit.jsonl": ("prefs", "conversational"),
    "prefs_hh.jsonl": ("prefs", "hh"),
    "prefs_ranked.jsonl": ("prefs", "ranked"),
    "sft_messages.jsonl": ("sft", "messages"),
    "sft_prompt_completion.jsonl": ("sft", "prompt_completion"),
    "prompts_eval.jsonl": ("prompts", "prompt"),
}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def without_source(records: list) -> list:
    return [dataclasses.replace(r, source="?") for r in records]


# ---------------------------------------------------------------- writing a JSONL file as another type


def as_json(rows: list[dict], tmp: Path) -> Path:
    path = tmp / "data.json"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return path


def as_csv(rows: list[dict], tmp: Path) -> Path:
    """Strings stay strings; lists, objects and numbers become JSON text in their cell."""
    header = list(dict.fromkeys(k for row in rows for k in row))
    path = tmp / "data.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if k not in row else row[k] if isinstance(row[k], str) else json.dumps(row[k]) for k in header])
    return path


def as_parquet(rows: list[dict], tmp: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    header = list(dict.fromkeys(k for row in rows for k in row))
    path = tmp / "data.parquet"
    pq.write_table(pa.table({k: [row.get(k) for row in rows] for k in header}), path)
    return path


def as_folder(rows: list[dict], tmp: Path) -> Path:
    """Two JSONL shards: the format is fixed by the first file and holds across the folder."""
    folder = tmp / "shards"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", rows[:1])
    write_jsonl(folder / "part-1.jsonl", rows[1:])
    (folder / "README.md").write_text("a dataset card is not data\n")
    return folder


CONTAINERS = {"json": as_json, "csv": as_csv, "parquet": as_parquet, "folder": as_folder}


@pytest.mark.parametrize("container", sorted(CONTAINERS))
@pytest.mark.parametrize("name", sorted(GOOD_FILES))
def test_every_format_loads_the_same_from_every_file_type(name, container, tmp_path):
    kind, fmt = GOOD_FILES[name]
    load = LOADERS[kind]
    expected = load(GOOD / name)
    other = CONTAINERS[container](read_jsonl(GOOD / name), tmp_path)
    got = load(other)
    assert without_source(got) == without_source(expected)
    assert str(other) in got[0].source
    assert detect_format(read_jsonl(GOOD / name)[0]) == fmt


# ---------------------------------------------------------------- each format, hand-checked


def test_strings_format():
    pairs = load_preferences(GOOD / "prefs_strings.jsonl")
    assert [p.id for p in pairs] == ["s1", "s2", "s3"]
    assert pairs[0].prompt == [user("Name a primary colour. Answer in one word.")]
    assert (pairs[0].chosen, pairs[0].rejected) == ("Red", "A primary colour is red, one of three.")
    assert pairs[0].constraints == [{"type": "max_words", "n": 1}]  # carried unchanged
    assert [p.margin for p in pairs] == [None, 2.0, None]
    assert pairs[2].chosen == "yes,\n"  # replies are not stripped
    assert pairs[1].source == f"{GOOD / 'prefs_strings.jsonl'} line 2"


def test_conversational_format_with_explicit_prompt_and_with_the_prompt_repeated():
    c1, c2, c3 = load_preferences(GOOD / "prefs_conversational.jsonl")
    assert c1.prompt == [{"role": "system", "content": "Answer tersely."}, user("2 + 2?")]
    assert (c1.chosen, c1.rejected) == ("4", "It is four, I believe.")
    # TRL's older format repeats the prompt in chosen/rejected; the prefix is removed
    assert c2.prompt == [user("Capital of France?")]
    assert (c2.chosen, c2.rejected) == ("Paris", "Lyon")
    assert c3.prompt == [user("Hi"), assistant("Hello!"), user("Reply in lowercase.")]
    assert c3.constraints == [{"type": "lowercase"}]


def test_conversational_format_with_implicit_prompt():
    first, second = load_preferences(GOOD / "prefs_conversational_implicit.jsonl")
    assert first.prompt == [user("Count to three.")]
    assert (first.chosen, first.rejected) == ("1, 2, 3", "1, 2")
    assert second.prompt == [user("Hi"), assistant("Hello"), user("Bye in French?")]
    assert (second.chosen, second.rejected) == ("Au revoir", "Adios")


def test_conversational_prompt_string_with_full_conversations():
    """The ultrafeedback_binarized layout: prompt a string, chosen/rejected whole conversations."""
    row = {"prompt": "Hi", "chosen": [user("Hi"), assistant("Hello")], "rejected": [user("Hi"), assistant("Go away")]}
    (pair,) = load_preferences([row])
    assert (pair.prompt, pair.chosen, pair.rejected) == ([user("Hi")], "Hello", "Go away")


def test_prompt_as_messages_with_string_replies(tmp_path):
    """A system + user prompt as messages, the replies as plain strings: read as format 'strings' with the
    prompt's messages kept, from JSONL and from CSV (a prompt cell holding a JSON list of messages)."""
    system = {"role": "system", "content": "Answer in one word."}
    rows = [
        {"id": "m1", "prompt": [system, user("Capital of Italy?")], "chosen": "Rome", "rejected": "Rome is the capital."},
        {"id": "m2", "prompt": "Capital of Spain?", "chosen": "Madrid", "rejected": "Barcelona"},
    ]
    assert detect_format(rows[0]) == "strings"
    for path in (write_jsonl(tmp_path / "mixed_prompts.jsonl", rows), as_csv(rows, tmp_path)):
        first, second = load_preferences(path)
        assert (first.prompt, first.chosen, first.rejected) == ([system, user("Capital of Italy?")], "Rome", "Rome is the capital.")
        assert first.to_trl()["chosen"] == [assistant("Rome")]
        assert (second.prompt, second.chosen) == ([user("Capital of Spain?")], "Madrid")
        (prompt, _) = load_prompts(path)
        assert (prompt.prompt, prompt.reference_reply) == ([system, user("Capital of Italy?")], "Rome")


@pytest.mark.parametrize(
    "chosen, rejected, kinds",
    [
        ("Rome", [assistant("Milan")], "'chosen' is a string but 'rejected' is a list"),
        ([assistant("Rome")], "Milan", "'chosen' is a list but 'rejected' is a string"),
    ],
)
def test_replies_of_two_kinds_are_one_clear_error(chosen, rejected, kinds):
    row = {"prompt": [user("Capital of Italy?")], "chosen": chosen, "rejected": rejected}
    with pytest.raises(DataError) as info:
        load_preferences([row])
    assert str(info.value) == (
        f"rows[0]: fields 'chosen' and 'rejected': {kinds}; give both as reply strings (the prompt in 'prompt') or both "
        "as lists of {role, content} messages. No other row of this source is bad; no row of it loads, so "
        "--on_bad_rows skip would not help"
    )


def test_prompt_messages_must_still_end_with_a_user_turn():
    row = {"prompt": [user("Hi"), assistant("Hello")], "chosen": "a", "rejected": "b"}
    with pytest.raises(DataError, match=r"^rows\[0\]: field 'prompt': must end with a user turn, ends with 'assistant'\. "):
        load_preferences([row])


def test_hh_format_splits_turns():
    single, multi = load_preferences(GOOD / "prefs_hh.jsonl")
    assert single.prompt == [user("What is the boiling point of water?")]
    assert (single.chosen, single.rejected) == ("100 degrees Celsius at sea level.", "It depends.")
    assert multi.prompt == [user("Hi there"), assistant("Hello! How can I help?"), user("Name a fruit.")]
    assert (multi.chosen, multi.rejected) == ("Apple.", "Carrot.")


def test_hh_transcript_without_leading_blank_lines():
    row = {"chosen": "Human: Hi\n\nAssistant: Hello", "rejected": "Human: Hi\n\nAssistant: Bye"}
    (pair,) = load_preferences([row])
    assert (pair.prompt, pair.chosen, pair.rejected) == ([user("Hi")], "Hello", "Bye")


def test_ranked_all_pairs_skips_ties():
    """r1 scores [9, 7, 1] -> 3 pairs. r2 ranking [1, 3, 1, 2] (1 = best) over ["2", "seven", "3", "1"]:
    of the 6 index pairs, (0, 2) tie; the other 5 put the better-ranked response first."""
    pairs = load_preferences(GOOD / "prefs_ranked.jsonl")
    got = [(p.id, p.chosen, p.rejected) for p in pairs]
    assert got == [
        ("r1", "large", "huge"), ("r1", "large", "small"), ("r1", "huge", "small"),
        ("r2", "2", "seven"), ("r2", "2", "1"), ("r2", "3", "seven"), ("r2", "1", "seven"), ("r2", "3", "1"),
    ]


def test_ranked_best_vs_each():
    """r2: responses 0 and 2 share rank 1, so each of them is paired with 1 and 3: 4 pairs."""
    pairs = load_preferences(GOOD / "prefs_ranked.jsonl", pairs="best_vs_each")
    got = [(p.id, p.chosen, p.rejected) for p in pairs]
    assert got == [
        ("r1", "large", "huge"), ("r1", "large", "small"),
        ("r2", "2", "seven"), ("r2", "2", "1"), ("r2", "3", "seven"), ("r2", "3", "1"),
    ]


def test_ranked_responses_as_messages_and_prompt_as_messages():
    row = {"prompt": [user("Pick")], "responses": [assistant("a"), [assistant("b")], "c"], "scores": [0.5, 2, -1]}
    pairs = load_preferences([row])
    assert [(p.chosen, p.rejected) for p in pairs] == [("b", "a"), ("a", "c"), ("b", "c")]
    assert all(p.prompt == [user("Pick")] for p in pairs)


def test_sft_messages():
    m1, m2 = load_sft(GOOD / "sft_messages.jsonl")
    assert m1.messages == [user("Say hi in Spanish."), assistant("Hola")]
    assert m1.constraints == [{"type": "max_words", "n": 1}] and m1.id == "m1"
    assert [m["role"] for m in m2.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_sft_prompt_completion_strings_and_messages():
    p1, _ = load_sft(GOOD / "sft_prompt_completion.jsonl")
    assert p1.messages == [user("Translate 'cat' to German."), assistant("Katze")]
    (listed,) = load_sft([{"prompt": [user("Opposite of hot?")], "completion": [assistant("Cold")]}])
    assert listed.messages == [user("Opposite of hot?"), assistant("Cold")]


def test_prompts_from_every_kind_of_data():
    e1, e2 = load_prompts(GOOD / "prompts_eval.jsonl")
    assert e1.prompt == [user("Write a haiku about rain, all in lowercase.")]
    assert e2.constraints == [{"type": "bullet_list", "n": 3}] and e2.id == "e2"
    assert e1.reference_reply is None

    _, m2 = load_prompts(GOOD / "sft_messages.jsonl")  # up to the last assistant turn
    assert m2.prompt[-1] == user("At night?") and len(m2.prompt) == 4
    assert m2.reference_reply == "Black."

    p1, _ = load_prompts(GOOD / "sft_prompt_completion.jsonl")
    assert (p1.prompt, p1.reference_reply) == ([user("Translate 'cat' to German.")], "Katze")

    s1, s2, s3 = load_prompts(GOOD / "prefs_strings.jsonl")  # one prompt per row, the chosen reply as reference
    assert (s1.prompt, s1.reference_reply, s1.constraints) == ([user("Name a primary colour. Answer in one word.")], "Red", [{"type": "max_words", "n": 1}])

    r1, r2 = load_prompts(GOOD / "prefs_ranked.jsonl")  # one prompt per ranked row, not one per pair
    assert (r1.reference_reply, r2.reference_reply) == ("large", "2")

    (plain,) = load_prompts([{"prompt": "Just a prompt"}])
    assert plain.prompt == [user("Just a prompt")]


# ---------------------------------------------------------------- the bad-data corpus

# file, kind, where the problem is, the field it names (None: the problem has no field), what was wrong.
BAD_ROWS = [
    ("missing_field.jsonl", "prefs", "line 2", "field 'rejected'", "missing"),
    ("null_field.jsonl", "prefs", "line 2", "field 'chosen'", "missing or null"),
    ("wrong_type.jsonl", "prefs", "line 2", "field 'chosen'", "expected a string, got int"),
    ("empty_reply.jsonl", "prefs", "line 2", "field 'rejected'", "the reply is empty"),
    ("empty_prompt.jsonl", "prefs", "line 2", "field 'prompt'", "empty"),
    ("identical.jsonl", "prefs", "line 2", "fields 'chosen' and 'rejected'", "identical"),
    ("extra_field.jsonl", "prefs", "line 2", "field 'label'", "extra_fields='ignore'"),
    ("bad_margin.jsonl", "prefs", "line 2", "field 'margin'", "expected a finite number"),
    ("bad_constraints.jsonl", "prefs", "line 2", "field 'constraints[0].type'", "expected"),
    ("not_object.jsonl", "prefs", "line 2", None, "expected an object"),
    ("no_user_turn.jsonl", "prefs", "line 2", "field 'prompt'", "no user turn"),
    ("unknown_role.jsonl", "prefs", "line 2", "field 'prompt[0].role'", "unknown role 'human'"),
    ("two_replies.jsonl", "prefs", "line 2", "field 'chosen'", "expected one assistant message"),
    ("latin1.jsonl", "prefs", "line 2", None, "not valid UTF-8"),
    ("malformed.jsonl", "prefs", "line 3", None, "malformed JSON"),
    ("truncated.jsonl", "prefs", "line 3", None, "truncated"),
    ("missing_field.json", "prefs", "row 2", "field 'chosen'", "missing"),
    ("hh_no_shared_prefix.jsonl", "prefs", "line 2", "fields 'chosen' and 'rejected'", "do not share a prefix"),
    ("hh_not_transcript.jsonl", "prefs", "line 2", "field 'chosen'", "expected an HH transcript"),
    ("hh_ends_with_human.jsonl", "prefs", "line 2", "field 'chosen'", "must end with an Assistant reply"),
    ("ranked_ties.jsonl", "prefs", "line 2", "field 'scores'", "all responses tie"),
    ("ranked_scores_length.jsonl", "prefs", "line 2", "field 'scores'", "expected a list of 3 numbers"),
    ("ranked_no_scores.jsonl", "prefs", "line 2", "field 'scores'", "'ranking'"),
    ("ranked_empty_response.jsonl", "prefs", "line 2", "field 'responses[1]'", "the reply is empty"),
    ("sft_no_assistant.jsonl", "sft", "line 2", "field 'messages'", "no assistant turn"),
    ("sft_empty_reply.jsonl", "sft", "line 2", "field 'messages[1].content'", "empty"),
    ("sft_content_type.jsonl", "sft", "line 2", "field 'messages[1].content'", "expected a string"),
    ("completion_empty.jsonl", "sft", "line 2", "field 'completion'", "the reply is empty"),
    ("stray_quote.csv", "prefs", "row 2 (line 3)", None, "broken CSV quoting"),
    ("wrong_columns.csv", "prefs", "row 2 (line 3)", None, "expected 3 columns"),
    ("latin1.csv", "prefs", "row 2 (line 3)", None, "not valid UTF-8"),
    ("empty_reply.csv", "prefs", "row 2 (line 3)", "field 'rejected'", "the reply is empty"),
    ("bad_scores.csv", "prefs", "row 2 (line 3)", "field 'scores'", "expected JSON"),
]

# Problems with the file as a whole: an error even with on_bad_rows="skip".
BAD_FILES = [
    ("empty.jsonl", "the file is empty"),
    ("utf16.jsonl", "the file is UTF-16 encoded"),
    ("blank_lines.jsonl", "the file is empty"),
    ("empty_list.json", "no rows"),
    ("malformed_array.json", "line 3: malformed JSON"),
    ("broken_quote.csv", "line 3: a quoted field opened here is never closed"),
    ("header_only.csv", "no rows below the header"),
    ("corrupt.parquet", "not a readable Parquet file"),
    ("notes.txt", "unsupported file type '.txt'"),
]


@pytest.mark.parametrize("name, kind, where, field, problem", BAD_ROWS, ids=[r[0] for r in BAD_ROWS])
def test_bad_row_is_an_error_naming_file_line_and_field(name, kind, where, field, problem):
    with pytest.raises(DataError) as info:
        LOADERS[kind](BAD / name)
    message = str(info.value)
    assert message.startswith(f"{BAD / name} {where}: "), message
    if field is not None:
        assert field in message
    assert problem in message


# Files with two good rows around the bad one; the others have one good row before it.
TWO_GOOD_ROWS = ("malformed.jsonl", "truncated.jsonl", "stray_quote.csv")
RANKED = ("ranked_ties.jsonl", "ranked_scores_length.jsonl", "ranked_no_scores.jsonl", "ranked_empty_response.jsonl", "bad_scores.csv")


@pytest.mark.parametrize("name, kind, where, field, problem", BAD_ROWS, ids=[r[0] for r in BAD_ROWS])
def test_bad_row_is_skipped_and_reported(name, kind, where, field, problem, capsys):
    records = LOADERS[kind](BAD / name, on_bad_rows="skip")
    good_rows = 2 if name in TWO_GOOD_ROWS else 1
    assert len(records) == (3 * good_rows if name in RANKED else good_rows)  # a good ranked row gives 3 pairs
    err = capsys.readouterr().err
    assert f"skipped 1 of {good_rows + 1} rows read" in err
    assert f"1 x " in err and f"(first: {BAD / name} {where})" in err


def test_a_file_with_only_bad_rows_is_an_error_in_skip_mode_too(tmp_path, capsys):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "Caf\u00e9?", "chosen": "Oui", "rejected": "Non"}\n'.encode("latin-1") * 2)
    with pytest.raises(DataError, match="latin1.jsonl: no valid rows \\(2 read, all skipped as bad\\)"):
        load_preferences(path, on_bad_rows="skip")
    assert "2 x not valid UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize("name, problem", BAD_FILES, ids=[f[0] for f in BAD_FILES])
@pytest.mark.parametrize("on_bad_rows", ["error", "skip"])
def test_bad_file_is_an_error_even_when_skipping(name, problem, on_bad_rows):
    with pytest.raises(DataError) as info:
        load_preferences(BAD / name, on_bad_rows=on_bad_rows)
    assert str(info.value).startswith(str(BAD / name))
    assert problem in str(info.value)


def test_skip_mode_counts_by_reason(capsys):
    """mixed_good_and_bad.jsonl: good lines 1, 3, 6, 9; identical replies on 2 and 5; an empty chosen
    reply on 4 and 8; malformed JSON on 7."""
    pairs = load_preferences(BAD / "mixed_good_and_bad.jsonl", on_bad_rows="skip")
    assert [p.source.rsplit(" ", 1)[1] for p in pairs] == ["1", "3", "6", "9"]
    err = capsys.readouterr().err
    assert "skipped 5 of 9 rows read" in err
    assert "2 x fields 'chosen' and 'rejected': identical replies carry no preference" in err
    assert "2 x field 'chosen': the reply is empty" in err
    assert "1 x malformed JSON" in err


def test_error_mode_stops_at_the_first_bad_row():
    with pytest.raises(DataError, match=r"line 2: fields 'chosen' and 'rejected'"):
        load_preferences(BAD / "mixed_good_and_bad.jsonl")


def test_extra_fields_ignore():
    pairs = load_preferences(BAD / "extra_field.jsonl", extra_fields="ignore")
    assert [p.chosen for p in pairs] == ["Red", "Square"]


# ---------------------------------------------------------------- formats: detection and override


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "strings"),
        ({"prompt": [user("p")], "chosen": [assistant("a")], "rejected": [assistant("b")]}, "conversational"),
        ({"chosen": [user("p"), assistant("a")], "rejected": [user("p"), assistant("b")]}, "conversational"),
        ({"chosen": "\n\nHuman: p\n\nAssistant: a", "rejected": "\n\nHuman: p\n\nAssistant: b"}, "hh"),
        ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 2, 3]}, "ranked"),
        ({"messages": [user("p"), assistant("a")]}, "messages"),
        ({"prompt": "p", "completion": "a"}, "prompt_completion"),
        ({"prompt": "p", "constraints": []}, "prompt"),
        ({"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}, "ifeval"),
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


@pytest.mark.parametrize("row", [{"text": "hello"}, {}, ["prompt"], "prompt", None])
def test_detect_format_rejects_unknown_shapes(row):
    with pytest.raises(DataError):
        detect_format(row)


def test_forced_format_reports_against_it():
    """A prompt may be messages in format 'strings' too, so the first field that does not fit is 'chosen'."""
    with pytest.raises(DataError) as info:
        load_preferences(GOOD / "prefs_conversational.jsonl", format="strings")
    assert str(info.value).startswith(
        f"{GOOD / 'prefs_conversational.jsonl'} line 1: field 'chosen': expected a string, got list "
        "(this row looks like format 'conversational', but format 'strings' was asked for). "
        "2 more rows of this file are bad (2 x field 'chosen': expected a string, got list); "
        "no row of it loads, so --on_bad_rows skip would not help"
    ), str(info.value)


def test_format_must_suit_the_kind_of_data():
    with pytest.raises(ConfigError, match="format='messages'"):
        load_preferences(GOOD / "sft_messages.jsonl", format="messages")
    with pytest.raises(DataError, match=r"line 1: this row is in format 'messages'.*preference data needs"):
        load_preferences(GOOD / "sft_messages.jsonl")
    with pytest.raises(DataError, match=r"line 1: this row is in format 'strings'.*SFT data needs"):
        load_sft(GOOD / "prefs_strings.jsonl")


def test_the_first_good_row_fixes_the_format(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": [user("p")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
    ])
    with pytest.raises(DataError) as info:
        load_preferences(path)
    assert str(info.value) == (
        f"{path} line 2: field 'chosen': expected a string, got list (this row looks like format 'conversational', "
        "but the source is read as 'strings', the format of its first good row; keep one format per source). "
        "No other row of this file is bad; --on_bad_rows skip loads its 1 good row and reports the skipped one"
    )


def test_a_bad_first_row_does_not_fix_the_format(tmp_path, capsys):
    """Line 1 lacks its prompt, so it looks like an HH row; it is skipped and the strings rows still load."""
    path = write_jsonl(tmp_path / "data.jsonl", [
        {"chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
    ])
    assert len(load_preferences(path, on_bad_rows="skip")) == 2
    assert "expected an HH transcript" in capsys.readouterr().err


def test_options_are_checked():
    with pytest.raises(ConfigError, match="on_bad_rows='drop'"):
        load_preferences(GOOD / "prefs_strings.jsonl", on_bad_rows="drop")
    with pytest.raises(ConfigError, match="pairs='best'"):
        load_preferences(GOOD / "prefs_strings.jsonl", pairs="best")
    with pytest.raises(ConfigError, match="max_rows=0"):
        load_preferences(GOOD / "prefs_strings.jsonl", max_rows=0)


# ---------------------------------------------------------------- sources


def test_builtin_dataset_resolves_under_align_datasets_dir(tmp_path, monkeypatch):
    folder = tmp_path / "ifprefs"
    folder.mkdir()
    write_jsonl(folder / "prefs_train.jsonl", read_jsonl(GOOD / "prefs_strings.jsonl"))
    write_jsonl(folder / "eval.jsonl", read_jsonl(GOOD / "prompts_eval.jsonl"))
    monkeypatch.setenv("ALIGN_DATASETS_DIR", str(tmp_path))
    assert datasets_dir() == tmp_path
    pairs = load_preferences("ifprefs:prefs_train")
    assert [p.id for p in pairs] == ["s1", "s2", "s3"]
    assert pairs[0].source == f"{folder / 'prefs_train.jsonl'} line 1"
    assert [p.id for p in load_prompts("ifprefs:eval")] == ["e1", "e2"]
    with pytest.raises(DataError, match=r"no split 'prefs_test'"):
        load_preferences("ifprefs:prefs_test")
    with pytest.raises(DataError, match=r"no built-in dataset 'nosuch'"):
        load_preferences("nosuch:train")
    with pytest.raises(DataError, match=r"names split 'prefs_train' but split='eval'"):
        load_preferences("ifprefs:prefs_train", split="eval")


def test_builtin_datasets_default_to_the_repo_folder(monkeypatch):
    monkeypatch.delenv("ALIGN_DATASETS_DIR", raising=False)
    assert datasets_dir() == REPO / "datasets"


def test_folder_with_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", read_jsonl(GOOD / "prefs_strings.jsonl"))
    write_jsonl(tmp_path / "test.jsonl", read_jsonl(GOOD / "prefs_strings.jsonl")[:1])
    assert len(load_preferences(tmp_path, split="test")) == 1
    assert len(load_preferences(tmp_path, split="train")) == 3
    with pytest.raises(DataError, match="no split 'dev'"):
        load_preferences(tmp_path, split="dev")


def test_folder_with_mixed_file_types_is_an_error(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", read_jsonl(GOOD / "prefs_strings.jsonl"))
    as_csv(read_jsonl(GOOD / "prefs_strings.jsonl"), tmp_path)
    with pytest.raises(DataError, match=r"mixed file formats in one folder \(\.csv, \.jsonl\)"):
        load_preferences(tmp_path)


def test_folder_with_mixed_row_formats_is_an_error(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", read_jsonl(GOOD / "prefs_strings.jsonl"))
    write_jsonl(tmp_path / "b.jsonl", read_jsonl(GOOD / "prefs_hh.jsonl"))
    with pytest.raises(DataError, match=r"b.jsonl line 1: field 'prompt': missing or null \(format 'strings'"):
        load_preferences(tmp_path)


def test_missing_source_and_misplaced_split(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_preferences(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="applies to folders"):
        load_preferences(GOOD / "prefs_strings.jsonl", split="train")
    with pytest.raises(DataError, match="no data files"):
        load_preferences(tmp_path)


def test_in_memory_rows():
    pairs = load_preferences([{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert pairs[0].source == "rows[0]"
    with pytest.raises(DataError, match=r"rows\[1\]: field 'rejected'"):
        load_preferences([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}])


# ---------------------------------------------------------------- streaming


def test_iter_functions_are_lazy():
    """Line 2 of identical.jsonl is bad; a generator that has only yielded line 1 has not read it."""
    pairs = iter_preferences(BAD / "identical.jsonl")
    assert inspect.isgenerator(pairs)
    assert next(pairs).chosen == "Red"
    with pytest.raises(DataError, match="line 2"):
        next(pairs)
    assert inspect.isgenerator(iter_sft(GOOD / "sft_messages.jsonl"))
    assert inspect.isgenerator(iter_prompts(GOOD / "prompts_eval.jsonl"))


def test_max_rows_stops_reading(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
    path.write_text(good * 10 + "not json at all\n")
    assert len(load_preferences(path, max_rows=10)) == 10
    with pytest.raises(DataError, match="line 11: malformed JSON"):
        load_preferences(path, max_rows=11)
    # max_rows counts records: the two ranked rows give 3 + 5 pairs
    assert len(load_preferences(GOOD / "prefs_ranked.jsonl", max_rows=4)) == 4


def streamed_rows_and_peak(path) -> tuple[int, int]:
    """The preference rows of `path`, read one at a time to the end, and the peak bytes of Python allocations."""
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_preferences(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return count, peak


def test_jsonl_is_streamed_in_flat_memory(tmp_path):
    """A ~30 MB file read to the end: the peak of Python allocations stays under 4 MB (reading the file
    whole would need over 30 MB), and the first rows come back without reading the rest."""
    path = tmp_path / "big.jsonl"
    reply = "word " * 600  # 3 kB
    with open(path, "w", encoding="utf-8") as f:
        for i in range(10_000):
            f.write(json.dumps({"id": str(i), "prompt": f"question {i}", "chosen": reply + "yes", "rejected": reply + "no"}) + "\n")
    assert path.stat().st_size > 30e6

    count, peak = streamed_rows_and_peak(path)
    assert count == 10_000
    assert peak < 4e6, f"peak {peak / 1e6:.1f} MB"

    with open(path, "a", encoding="utf-8") as f:  # a broken last line: reading to the end would stop there
        f.write("{not json\n")
    assert len(load_preferences(path, max_rows=5)) == 5


# ---------------------------------------------------------------- lengths and the TRL dataset


@pytest.fixture(scope="module")
def word_tokenizer():
    """One token per whitespace-separated word; the template writes `role: content\\n` per message and
    `assistant:` as the generation prompt."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    return tokenizer


def length_records():
    """Token counts with the template:
    pair, chosen:   user: a b c / assistant: d          -> 4 + 2 = 6
    pair, rejected: user: a b c / assistant: e f g h    -> 4 + 5 = 9  (the pair's length)
    sft:            user: x y / assistant: z            -> 3 + 2 = 5
    prompt:         user: p q / assistant:              -> 3 + 1 = 4
    """
    return [
        PreferencePair([user("a b c")], "d", "e f g h", source="pair"),
        SFTExample([user("x y"), assistant("z")], source="sft"),
        PromptRecord([user("p q")], source="prompt"),
    ]


def test_check_lengths_counts_and_reports(word_tokenizer, capsys):
    records = length_records()
    assert check_lengths(records, word_tokenizer, max_length=9) == records  # 9 is not longer than 9
    with pytest.raises(DataError, match=r"1 of 3 records are longer than max_length=8 tokens \(longest 9; e.g. pair \(9 tokens\)\)"):
        check_lengths(records, word_tokenizer, max_length=8)
    assert check_lengths(records, word_tokenizer, max_length=8, on_too_long="skip") == records[1:]
    assert "1 of 3 records are longer than max_length=8 tokens" in capsys.readouterr().err
    assert check_lengths(records, word_tokenizer, max_length=4, on_too_long="keep") == records
    assert "2 of 3 records are longer than max_length=4" in capsys.readouterr().err  # 9 and 5 > 4; 4 is not


def test_check_lengths_without_a_chat_template(word_tokenizer):
    """Without a template only the contents count: "a b c" + "e f g h" = 7 words."""
    plain = word_tokenizer.__class__(tokenizer_object=word_tokenizer.backend_tokenizer, unk_token="[UNK]")
    assert not plain.chat_template
    with pytest.raises(DataError, match=r"longest 7"):
        check_lengths(length_records()[:1], plain, max_length=6)


def test_to_hf_dataset_is_trls_conversational_format():
    pairs = load_preferences(GOOD / "prefs_conversational.jsonl")
    ds = to_hf_dataset(pairs)
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert ds[2] == pairs[2].to_trl()
    assert ds[2]["chosen"] == [assistant("sure thing")]

    sft = to_hf_dataset(load_sft(GOOD / "sft_messages.jsonl"))
    assert sft.column_names == ["messages"]
    prompts = to_hf_dataset(load_prompts(GOOD / "prompts_eval.jsonl"))
    assert prompts.column_names == ["prompt"]

    with_margin = [PreferencePair([user("p")], "a", "b", margin=1.5), PreferencePair([user("q")], "a", "b", margin=0.0)]
    assert to_hf_dataset(with_margin)["margin"] == [1.5, 0.0]


def test_to_hf_dataset_rejects_mixed_input():
    with pytest.raises(DataError, match=r"line 1: field 'margin': missing, while 1 of 3 pairs have one"):
        to_hf_dataset(load_preferences(GOOD / "prefs_strings.jsonl"))
    with pytest.raises(DataError, match="mixed record types"):
        to_hf_dataset(length_records())
    with pytest.raises(DataError, match="no records"):
        to_hf_dataset([])


# ---------------------------------------------------------------- config


def test_data_args_defaults_and_strictness():
    args = build_config(DataArgs, {})
    assert (args.train_data, args.eval_data) == ("ifprefs:prefs_train", "ifprefs:prefs_test")
    assert (args.data_format, args.on_bad_rows, args.ranked_pairs, args.extra_fields) == ("auto", "error", "all", "error")
    assert build_config(DataArgs, {"max_train_rows": 100, "eval_data": None}).eval_data is None
    with pytest.raises(ConfigError, match="on_bad_rows"):
        build_config(DataArgs, {"on_bad_rows": "drop"})
    with pytest.raises(ConfigError, match="max_eval_rows"):
        build_config(DataArgs, {"max_eval_rows": 0})


# ---------------------------------------------------------------- python -m align.data check


def run_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "align.data", "check", *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def test_cli_check_good_file():
    result = run_cli(str(GOOD / "prefs_ranked.jsonl"))
    assert result.returncode == 0, result.stderr
    assert "8 preference pairs from 2 rows (0 skipped), format 'ranked'" in result.stdout
    result = run_cli(str(GOOD / "sft_messages.jsonl"))
    assert "2 SFT examples from 2 rows (0 skipped), format 'messages'" in result.stdout
    result = run_cli(str(GOOD / "sft_messages.jsonl"), "--kind", "prompts")
    assert "2 prompts from 2 rows" in result.stdout


def test_cli_check_bad_file_exits_2_without_traceback():
    result = run_cli(str(BAD / "unknown_role.jsonl"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {BAD / 'unknown_role.jsonl'} line 2: field 'prompt[0].role'")
    assert "Traceback" not in result.stderr
    result = run_cli(str(BAD / "broken_quote.csv"))
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_cli_check_skip_mode_reports():
    result = run_cli(str(BAD / "mixed_good_and_bad.jsonl"), "--on-bad-rows", "skip")
    assert result.returncode == 0
    assert "4 preference pairs from 4 rows (5 skipped), format 'strings'" in result.stdout
    assert "skipped 5 of 9 rows read" in result.stderr


def test_hf_hub_failure_is_a_quick_clear_error():
    start = time.perf_counter()
    result = run_cli("hf:align-tests/no-such-dataset")
    assert result.returncode == 2
    assert "error: hf:align-tests/no-such-dataset: cannot load split 'train'" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.perf_counter() - start < 30


def test_hf_source_loads_through_datasets(tmp_path):
    """`hf:` goes through datasets.load_dataset, which also reads a local folder (no Hub needed)."""
    folder = tmp_path / "hfdata"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", read_jsonl(GOOD / "prefs_strings.jsonl"))
    result = run_cli(f"hf:{folder}:train", env={"HF_DATASETS_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    assert "3 preference pairs from 3 rows (0 skipped), format 'strings'" in result.stdout


def test_max_train_rows_takes_a_seeded_sample_of_the_whole_file(tmp_path):
    """A short run's rows come from all of the file, not its head (ifprefs is ordered by prompt: the head of
    prefs_train holds 33 of 412 prompts); --train_rows_from head keeps the first rows and reads only those."""
    from align.data.load import load_train

    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(100))
                    + "not json at all\n")
    head = build_config(DataArgs, {"train_data": str(path), "max_train_rows": 10, "train_rows_from": "head"})
    assert [r.prompt[0]["content"] for r in load_train(load_preferences, head)] == [f"p{i}" for i in range(10)]

    good = tmp_path / "good.jsonl"
    good.write_text("".join(path.read_text().splitlines(keepends=True)[:100]))
    sample = build_config(DataArgs, {"train_data": str(good), "max_train_rows": 10})
    assert sample.train_rows_from == "sample"
    picked = [int(r.prompt[0]["content"][1:]) for r in load_train(load_preferences, sample)]
    assert len(picked) == 10 == len(set(picked)) and picked == sorted(picked)  # no repeats, file order
    assert max(picked) >= 50  # spread over the file, not its first rows
    assert picked == [int(r.prompt[0]["content"][1:]) for r in load_train(load_preferences, sample)]  # seeded
    # a sample reads the whole file, so a bad row anywhere in it is an error naming its line
    with pytest.raises(DataError, match="line 101: malformed JSON"):
        load_train(load_preferences, build_config(DataArgs, {"train_data": str(path), "max_train_rows": 10}))


# Three rows of IFEval's input_data.jsonl (google-research/instruction_following_eval, keys 1000, 1001 and 1012 there),
# the second with two instructions align's verifier has no check for.
IFEVAL_ROWS = [
    {"key": 1000, "prompt": "Write a 300+ word summary of the wikipedia page \"https://en.wikipedia.org/wiki/Raymond_III,_Count_of_Tripoli\". "
     "Do not use any commas and highlight at least 3 sections that has titles in markdown format, for example *highlighted section part 1*, "
     "*highlighted section part 2*, *highlighted section part 3*.",
     "instruction_id_list": ["punctuation:no_comma", "detectable_format:number_highlighted_sections", "length_constraints:number_words"],
     "kwargs": [{}, {"num_highlights": 3}, {"relation": "at least", "num_words": 300}]},
    {"key": 1001, "prompt": "I am planning a trip to Japan, and I would like thee to write an itinerary for my journey in a Shakespearean style. "
     "You are not allowed to use any commas in your response.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 1005, "prompt": "Write a resume for a fresh high school graduate who is seeking their first job. Make sure to include at least 12 "
     "placeholder represented by square brackets, such as [address], [name].",
     "instruction_id_list": ["detectable_content:number_placeholders", "language:response_language"],
     "kwargs": [{"num_placeholders": 12}, {"language": "kn"}]},
]


def test_ifeval_rows_load_as_prompts_with_our_constraints(tmp_path, capsys):
    path = tmp_path / "input_data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in IFEVAL_ROWS))
    with pytest.raises(DataError, match=r"input_data.jsonl line 3: field 'instruction_id_list\[1\]': IFEval instruction "
                                        r"'language:response_language' has no check here"):
        load_prompts(path)
    stats = LoadStats()
    records = load_prompts(path, on_bad_rows="skip", stats=stats)
    assert stats.format == "ifeval" and stats.rows == 3 and sum(stats.skipped.values()) == 1
    assert "skipped 1 of 3 rows read" in capsys.readouterr().err
    assert [r.id for r in records] == ["1000", "1001"]
    assert records[0].prompt == [{"role": "user", "content": IFEVAL_ROWS[0]["prompt"]}]
    assert records[0].constraints == [{"type": "no_comma"}, {"type": "num_highlights", "num_highlights": 3},
                                      {"type": "num_words", "relation": "at least", "num_words": 300}]
    with pytest.raises(DataError, match=r"rows\[0\]: field 'kwargs': expected a list of 1 objects, one per instruction id"):
        load_prompts([{"prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": []}])
    with pytest.raises(DataError, match=r"this row is in format 'ifeval'"):
        load_preferences(path)
