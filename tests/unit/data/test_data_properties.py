"""Property tests for align/data.py: whatever a row holds, loading gives valid records or a DataError
(never another exception), and what the writers of JSONL and CSV files put in comes back out."""

from __future__ import annotations

import csv
import io
import itertools
import json

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from align.data.formats import FORMATS, detect_format
from align.data.load import load_preferences, load_prompts, load_sft
from align.errors import DataError
from align.records import PreferencePair, PromptRecord, SFTExample

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

FIELD_NAMES = [
    "prompt", "chosen", "rejected", "responses", "scores", "ranking", "messages", "completion",
    "id", "constraints", "meta", "margin", "role", "content", "type", "text",
]
ROLES = ["user", "assistant", "system", "human", "", None, 1]

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.text(max_size=12) | st.integers()}),
    max_size=4,
)
hh_transcripts = st.lists(
    st.tuples(st.sampled_from(["Human", "Assistant", "human"]), st.text(max_size=8)), max_size=4
).map(lambda turns: "".join(f"\n\n{who}: {text}" for who, text in turns))
json_values = st.recursive(
    json_scalars | messages | hh_transcripts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELD_NAMES), inner, max_size=4),
    max_leaves=8,
)
# Rows shaped like each format, with values that are often right and sometimes subtly wrong (empty,
# whitespace, a bad role, the wrong type, a shared prefix that is not shared), so that both outcomes
# are exercised.
text = st.sampled_from(["p", "a", "b", "c", "d", "e", " ", ""]) | st.text(max_size=8)
dialogue = st.lists(text, min_size=1, max_size=4).map(
    lambda turns: [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
)
odd_chat = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot"]), "content": text}),
    min_size=1, max_size=3,
)
chat = dialogue | dialogue | odd_chat
reply = text.map(lambda t: [{"role": "assistant", "content": t}]) | chat


def hh_text(turns: list[tuple[str, str]]) -> str:
    return "".join(f"\n\n{who}: {t}" for who, t in turns)


@st.composite
def hh_row(draw) -> dict:
    prefix = draw(st.lists(text, min_size=1, max_size=3).map(lambda ts: [("Human" if i % 2 == 0 else "Assistant", t) for i, t in enumerate(ts)]))
    other = draw(st.just(prefix) | st.lists(st.tuples(st.sampled_from(["Human", "Assistant"]), text), min_size=1, max_size=3))
    return {"chosen": hh_text(prefix + [("Assistant", draw(text))]), "rejected": hh_text(other + [("Assistant", draw(text))])}


@st.composite
def implicit_prompt_row(draw) -> dict:
    prompt = draw(dialogue.filter(lambda d: d[-1]["role"] == "user") | chat)
    return {"chosen": prompt + draw(chat), "rejected": prompt + draw(chat)}


value = text | chat | json_scalars
valid_constraints = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["lowercase", "max_words"])}), max_size=2)
metadata = {
    "id": st.text(max_size=3) | st.integers() | st.just([]),
    "constraints": st.one_of(valid_constraints, valid_constraints, st.just([{"type": ""}]), json_scalars),
    "margin": st.one_of(st.floats(-5, 5), st.floats(-5, 5), st.floats(allow_nan=True), json_scalars),
    "meta": st.dictionaries(st.text(max_size=3), json_scalars, max_size=2),
}


def with_metadata(rows: st.SearchStrategy) -> st.SearchStrategy:
    return st.tuples(rows, st.fixed_dictionaries({}, optional=metadata)).map(lambda pair: {**pair[0], **pair[1]})


format_rows = with_metadata(st.one_of(
    st.fixed_dictionaries({"prompt": text, "chosen": text, "rejected": text}),
    st.fixed_dictionaries({"prompt": chat | text, "chosen": reply, "rejected": reply}),
    implicit_prompt_row(),
    hh_row(),
    st.fixed_dictionaries(
        {"prompt": text | chat, "responses": st.lists(text | chat, max_size=4)},
        optional={"scores": st.lists(st.integers(0, 3) | json_scalars, max_size=4), "ranking": st.lists(st.integers(1, 3), max_size=4)},
    ),
    st.fixed_dictionaries({"messages": chat | value}),
    st.fixed_dictionaries({"prompt": text | chat, "completion": text | reply}),
    st.fixed_dictionaries({"prompt": text | chat | value}),
))
shapeless_rows = st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=6) | json_values
rows = format_rows | shapeless_rows
LOADERS = {"prefs": (load_preferences, PreferencePair), "sft": (load_sft, SFTExample), "prompts": (load_prompts, PromptRecord)}


def check_row(row) -> None:
    try:
        fmt = detect_format(row)
    except DataError:
        fmt = None
    assert fmt is None or fmt in FORMATS
    for kind, (load, record_type) in LOADERS.items():
        for extra_fields in ("error", "ignore"):
            try:
                records = load([row], extra_fields=extra_fields)
            except DataError as err:
                assert str(err).startswith("rows")  # the message names where
                continue
            assert records and all(isinstance(r, record_type) for r in records)


@SETTINGS
@given(row=format_rows)
@example(row={"prompt": "p", "responses": ["a", "b"], "scores": [1, float("nan")]})
@example(row={"chosen": [{"role": "user", "content": "p"}], "rejected": [{"role": "user", "content": "p"}]})
@example(row={"prompt": "p", "responses": ["a", "b"], "scores": [10**400, 1]})  # overflows a float
@example(row={"prompt": "p", "chosen": "a", "rejected": "b", "margin": -(10**400)})
def test_any_row_shaped_like_a_format_gives_records_or_a_data_error(row):
    check_row(row)


@SETTINGS
@given(row=shapeless_rows)
def test_any_json_value_as_a_row_gives_records_or_a_data_error(row):
    check_row(row)


@settings(SETTINGS, max_examples=50)
@given(lines=st.lists(st.binary(max_size=60) | rows.map(lambda r: json.dumps(r).encode()), min_size=1, max_size=4))
@example(lines=[b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": ' + b"9" * 5000 + b"}"])  # over 4300 digits
@example(lines=[b"[" * 100_000])  # deeper than the JSON parser recurses
@example(lines=[b"\xff\xfe{\x00"])  # a UTF-16 byte-order mark
def test_any_bytes_in_a_jsonl_file_give_records_or_a_data_error(lines, tmp_path_factory):
    path = tmp_path_factory.mktemp("jsonl") / "data.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    for kind, (load, record_type) in LOADERS.items():
        for on_bad_rows in ("error", "skip"):
            try:
                records = load(path, on_bad_rows=on_bad_rows)
            except DataError as err:
                assert str(err).startswith(str(path))
                continue
            assert all(isinstance(r, record_type) for r in records)


@SETTINGS
@given(text=st.text(alphabet=st.sampled_from('ab,"\n\r[{}]: '), max_size=60))
def test_any_csv_text_gives_records_or_a_data_error(text, tmp_path_factory):
    path = tmp_path_factory.mktemp("csv") / "data.csv"
    path.write_text("prompt,chosen,rejected\n" + text, encoding="utf-8")
    for on_bad_rows in ("error", "skip"):
        try:
            records = load_preferences(path, on_bad_rows=on_bad_rows)
        except DataError as err:
            assert str(err).startswith(str(path))
            continue
        assert all(isinstance(r, PreferencePair) for r in records)


# Text a CSV writer and a JSON encoder must carry through unchanged: quotes, commas, newlines (also
# \r\n inside a quoted cell), non-ASCII. Surrogates cannot be written as UTF-8; a cell starting with
# "[{" is read as a JSON list of messages by design (see align.data), so neither is generated.
cell_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=1, max_size=30).filter(
    lambda s: s.strip() and not s.lstrip().startswith("[{")
)


@SETTINGS
@given(triples=st.lists(st.tuples(cell_text, cell_text, cell_text), min_size=1, max_size=5))
def test_strings_rows_survive_jsonl_and_csv(triples, tmp_path_factory):
    triples = [t for t in triples if t[1].strip() != t[2].strip()]
    if not triples:
        return
    folder = tmp_path_factory.mktemp("roundtrip")
    jsonl = folder / "data.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in triples), encoding="utf-8")
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["prompt", "chosen", "rejected"])
    writer.writerows(triples)
    csv_path = folder / "data.csv"
    csv_path.write_bytes(buffer.getvalue().encode("utf-8"))
    for path in (jsonl, csv_path):
        pairs = load_preferences(path)
        assert [(p.prompt[0]["content"], p.chosen, p.rejected) for p in pairs] == triples


@SETTINGS
@given(scores=st.lists(st.integers(min_value=0, max_value=3), min_size=2, max_size=6))
def test_ranked_pairs_follow_the_scores(scores):
    """"all": one pair per index pair with different scores, better first; "best_vs_each": each
    top-scored response against each lower one. A row of ties only is an error."""
    responses = [f"response {i}" for i in range(len(scores))]
    row = {"prompt": "p", "responses": responses, "scores": scores}
    index = {text: i for i, text in enumerate(responses)}
    top = max(scores)
    expected = {
        "all": sum(1 for i, j in itertools.combinations(range(len(scores)), 2) if scores[i] != scores[j]),
        "best_vs_each": scores.count(top) * sum(1 for s in scores if s < top),
    }
    for mode, count in expected.items():
        if count == 0:
            try:
                load_preferences([row], pairs=mode)
            except DataError as err:
                assert "all responses tie" in str(err)
            else:
                raise AssertionError("a row of ties must be an error")
            continue
        pairs = load_preferences([row], pairs=mode)
        assert len(pairs) == count
        assert all(scores[index[p.chosen]] > scores[index[p.rejected]] for p in pairs)
        if mode == "best_vs_each":
            assert all(scores[index[p.chosen]] == top for p in pairs)


turn_text = st.text(alphabet=st.characters(codec="ascii", exclude_characters="\n"), max_size=15).filter(lambda s: s.strip())


@SETTINGS
@given(turns=st.lists(turn_text, min_size=1, max_size=7).map(lambda t: t if len(t) % 2 == 1 else t[:-1]), chosen=turn_text, rejected=turn_text)
def test_hh_transcripts_split_into_their_turns(turns, chosen, rejected):
    """A transcript built from alternating Human/Assistant turns comes back as those turns."""
    prefix = "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {text}" for i, text in enumerate(turns))
    row = {"chosen": f"{prefix}\n\nAssistant: {chosen}", "rejected": f"{prefix}\n\nAssistant: {rejected}"}
    try:
        (pair,) = load_preferences([row])
    except DataError as err:
        assert chosen.strip() == rejected.strip() and "identical" in str(err)
        return
    assert [m["content"] for m in pair.prompt] == [t.strip() for t in turns]
    assert [m["role"] for m in pair.prompt] == ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    assert (pair.chosen, pair.rejected) == (chosen.strip(), rejected.strip())
