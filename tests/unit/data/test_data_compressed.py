"""Compressed data sources (.gz, .bz2, .xz, .zst JSONL/JSON/CSV files and folders of them), the counts a
bad-row error ends with, Anthropic HH-RLHF as it ships (`*.jsonl.gz`), and the data CLI's flag spellings.

Each file is written here from rows (or from the plain corpus in tests/support/data/good), so every expected
value is the plain file's, read again through a decompressor.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from align.data.check import main
from align.data.load import iter_preferences, load_preferences, load_prompts, load_sft
from align.errors import AlignError, DataError
from repo_paths import DATA, REPO
from test_data import streamed_rows_and_peak

GOOD = DATA / "good"
LOADERS = {"prefs": load_preferences, "sft": load_sft, "prompts": load_prompts}
GOOD_FILES = {
    "prefs_strings.jsonl": "prefs",
    "prefs_conversational.jsonl": "prefs",
    "prefs_hh.jsonl": "prefs",
    "prefs_ranked.jsonl": "prefs",
    "sft_messages.jsonl": "sft",
    "sft_prompt_completion.jsonl": "sft",
    "prompts_eval.jsonl": "prompts",
}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def compress(data: bytes, compression: str) -> bytes:
    if compression == ".gz":
        return gzip.compress(data, compresslevel=1)
    if compression == ".bz2":
        return bz2.compress(data)
    if compression == ".xz":
        return lzma.compress(data)
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor().compress(data)


def write(path: Path, data: bytes | str) -> Path:
    """`data` written to `path`, compressed as the name's last suffix says."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    path.write_bytes(compress(data, path.suffix) if path.suffix in COMPRESSIONS else data)
    return path


def jsonl(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def sources(records: list) -> list[str]:
    return [r.source for r in records]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    # This process's sys.path travels along, so an optional package found here (zstandard) is found there.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    return subprocess.run(
        [sys.executable, "-m", "align.data", "check", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


PAIR = {"prompt": "p", "chosen": "a", "rejected": "b"}


# ---------------------------------------------------------------- every compression, every file type


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_every_format_loads_the_same_from_compressed_jsonl(compression, tmp_path):
    for name, kind in GOOD_FILES.items():
        path = write(tmp_path / (name + compression), (GOOD / name).read_bytes())
        plain, packed = LOADERS[kind](GOOD / name), LOADERS[kind](path)
        assert [r.__class__ for r in packed] == [r.__class__ for r in plain]
        # Same records; the source is the compressed file with the line numbers of the plain one.
        assert sources(packed) == [s.replace(str(GOOD / name), str(path)) for s in sources(plain)]
        assert [r.to_trl() for r in packed] == [r.to_trl() for r in plain]


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_compressed_json_array_json_lines_and_csv(compression, tmp_path):
    """prefs_strings.jsonl's three rows as a .json array, a .json of lines and a .csv, each compressed."""
    rows = [json.loads(line) for line in (GOOD / "prefs_strings.jsonl").read_text().splitlines()]
    expected = [r.to_trl() for r in load_preferences(GOOD / "prefs_strings.jsonl")]
    array = write(tmp_path / f"array.json{compression}", json.dumps(rows, indent=2))
    lines = write(tmp_path / f"lines.json{compression}", jsonl(rows))
    header = ["id", "prompt", "chosen", "rejected", "constraints", "margin"]
    csv_text = io.StringIO(newline="")
    writer = csv.writer(csv_text)
    writer.writerow(header)
    for r in rows:
        writer.writerow(["" if k not in r else r[k] if isinstance(r[k], str) else json.dumps(r[k]) for k in header])
    table = write(tmp_path / f"table.csv{compression}", csv_text.getvalue())

    assert [p.to_trl() for p in load_preferences(array)] == expected
    assert sources(load_preferences(array)) == [f"{array} row {i}" for i in (1, 2, 3)]
    assert [p.to_trl() for p in load_preferences(lines)] == expected
    assert sources(load_preferences(lines)) == [f"{lines} line {i}" for i in (1, 2, 3)]
    # The CSV reply "yes,\n" spans two lines, so row 3 starts on line 4.
    assert [(p.to_trl(), p.constraints) for p in load_preferences(table)] == [
        (p.to_trl(), p.constraints) for p in load_preferences(GOOD / "prefs_strings.jsonl")
    ]
    assert sources(load_preferences(table)) == [f"{table} row 1 (line 2)", f"{table} row 2 (line 3)", f"{table} row 3 (line 4)"]


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_cli_checks_each_compression(compression, tmp_path):
    path = write(tmp_path / f"prefs.jsonl{compression}", (GOOD / "prefs_ranked.jsonl").read_bytes())
    result = run_cli(str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: 8 preference pairs from 2 rows (0 skipped), format 'ranked'\n"


@pytest.mark.parametrize("compression", [".gz", ".zst"])
def test_compressed_jsonl_is_streamed_in_flat_memory(compression, tmp_path):
    """~10 MB of rows in a compressed file read to the end: the peak of Python allocations stays under
    4 MB (decompressing it whole first would need over 10 MB). The replies are random hex, which
    compresses about 2x as text does, not ~800x as a repeated word would."""
    rng = random.Random(0)
    rows = [
        {"id": str(i), "prompt": f"question {i}", "chosen": rng.randbytes(750).hex() + " yes", "rejected": rng.randbytes(750).hex()}
        for i in range(3500)
    ]
    text = jsonl(rows)
    assert len(text) > 10e6
    path = write(tmp_path / f"big.jsonl{compression}", text)
    del rows, text
    count, peak = streamed_rows_and_peak(path)
    assert count == 3500
    assert peak < 4e6, f"peak {peak / 1e6:.1f} MB"


# ---------------------------------------------------------------- folders of compressed files


def test_folder_of_compressed_shards_and_splits(tmp_path):
    rows = [{**PAIR, "id": str(i)} for i in range(5)]
    shards = tmp_path / "shards"
    shards.mkdir()
    write(shards / "part-0.jsonl.gz", jsonl(rows[:2]))
    write(shards / "part-1.jsonl.gz", jsonl(rows[2:]))
    pairs = load_preferences(shards)
    assert [p.id for p in pairs] == ["0", "1", "2", "3", "4"]
    assert pairs[2].source == f"{shards / 'part-1.jsonl.gz'} line 1"

    splits = tmp_path / "splits"
    splits.mkdir()
    write(splits / "train.jsonl.xz", jsonl(rows))
    write(splits / "test.csv.bz2", "prompt,chosen,rejected\nq,yes,no\n")
    assert len(load_preferences(splits, split="train")) == 5
    (test_pair,) = load_preferences(splits, split="test")
    assert (test_pair.prompt, test_pair.chosen, test_pair.source) == ([user("q")], "yes", f"{splits / 'test.csv.bz2'} row 1 (line 2)")


def test_folder_with_a_file_and_its_compressed_copy_is_an_error(tmp_path):
    """data.jsonl beside data.jsonl.gz is most likely the same rows twice."""
    write(tmp_path / "data.jsonl", jsonl([PAIR]))
    write(tmp_path / "data.jsonl.gz", jsonl([PAIR]))
    with pytest.raises(DataError) as info:
        load_preferences(tmp_path)
    assert str(info.value) == f"{tmp_path}: mixed file formats in one folder (.jsonl, .jsonl.gz); keep one format per folder"


@pytest.mark.parametrize(
    "name, label",
    [("test.gz", "'.gz'"), ("data.parquet.gz", "'.parquet.gz'"), ("notes.txt.zst", "'.txt.zst'")],
)
def test_unsupported_compressed_file_types(name, label, tmp_path):
    path = tmp_path / name
    path.write_bytes(b"x")
    with pytest.raises(DataError) as info:
        load_preferences(path)
    assert str(info.value) == (
        f"{path}: unsupported file type {label}; expected .jsonl, .json, .csv, .parquet, "
        "or .jsonl, .json, .csv compressed as .gz, .bz2, .xz, .zst"
    )


# ---------------------------------------------------------------- broken compressed files


@pytest.mark.parametrize("on_bad_rows", ["error", "skip"])
def test_cut_short_gz_is_an_error_at_the_line_it_breaks(on_bad_rows, tmp_path):
    """2,000 rows cut to half their compressed size: the rows before the break load lazily, and the line
    where the data runs out is named, even in skip mode (a problem of the file, not of a row)."""
    rows = [{**PAIR, "id": str(i)} for i in range(2000)]
    whole = gzip.compress(jsonl(rows).encode(), compresslevel=1)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    pairs = iter_preferences(path, on_bad_rows=on_bad_rows)
    assert next(pairs).id == "0"
    with pytest.raises(DataError) as info:
        list(pairs)
    message = str(info.value)
    line = int(message.removeprefix(f"{path} line ").split(":")[0])
    assert 2 < line < 2000
    assert message == (
        f"{path} line {line}: cannot decompress the .gz data (Compressed file ended before the end-of-stream marker "
        "was reached); the file is cut short, corrupt or not .gz data"
    )


@pytest.mark.parametrize(
    "compression, detail",
    [(".gz", "Not a gzipped file (b'{\"')"), (".bz2", "Invalid data stream"), (".xz", "Input format not supported by decoder")],
)
def test_uncompressed_data_under_a_compressed_name_is_one_error(compression, detail, tmp_path):
    path = tmp_path / f"data.jsonl{compression}"
    path.write_text(jsonl([PAIR]))
    with pytest.raises(DataError) as info:
        load_preferences(path, on_bad_rows="skip")
    assert str(info.value) == f"{path}: cannot decompress the {compression} data ({detail}); the file is cut short, corrupt or not {compression} data"


def test_cut_short_zst_is_an_error_not_silently_fewer_rows(tmp_path):
    """zstandard's own stream reader returns the data so far when a frame is cut off; the loader must not."""
    zstandard = pytest.importorskip("zstandard")
    whole = zstandard.ZstdCompressor().compress(jsonl([{**PAIR, "id": str(i)} for i in range(500)]).encode())
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(whole[:-3])
    with pytest.raises(DataError, match=r"cut.jsonl.zst( line \d+)?: cannot decompress the .zst data \(the file ends inside a zstd frame\)"):
        load_preferences(path)


def test_zst_across_frames(tmp_path):
    """A .zst file of two frames (zstd -c a b, or pzstd) holds the rows of both."""
    zstandard = pytest.importorskip("zstandard")
    packer = zstandard.ZstdCompressor()
    path = tmp_path / "frames.jsonl.zst"
    path.write_bytes(packer.compress(jsonl([{**PAIR, "id": "a"}]).encode()) + packer.compress(jsonl([{**PAIR, "id": "b"}]).encode()))
    assert [p.id for p in load_preferences(path)] == ["a", "b"]
    assert load_preferences(path)[1].source == f"{path} line 2"


def test_missing_zstandard_is_one_clear_error(tmp_path, monkeypatch, capsys):
    """Without the package (simulated: None in sys.modules makes `import zstandard` fail), a .zst file, or a
    folder of them, gives one message saying what to install; the CLI prints it and exits 2."""
    monkeypatch.setitem(sys.modules, "zstandard", None)
    folder = tmp_path / "zst"
    folder.mkdir()
    path = folder / "prefs.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd not decodable without zstandard")
    expected = f"{path}: reading .zst files needs the zstandard package: pip install zstandard (or decompress it first: zstd -d)"
    for source in (path, folder):
        with pytest.raises(AlignError) as info:
            load_preferences(source)
        assert str(info.value) == expected
    with pytest.raises(SystemExit) as exit_info:
        main(["check", str(path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {expected}\n"


# ---------------------------------------------------------------- a bad row's error counts the rest of its file


def test_bad_row_in_gz_names_its_line_and_counts_the_rest_of_the_file(tmp_path):
    """2,312 lines: an empty chosen reply on line 87 and on 7 later lines, malformed JSON on line 2000,
    so 2,312 - 9 = 2,303 good rows."""
    rows = [json.dumps({**PAIR, "id": str(i)}) for i in range(1, 2313)]
    empty = (87, 100, 400, 401, 1500, 2100, 2200, 2312)
    for line in empty:
        rows[line - 1] = json.dumps({"prompt": "p", "chosen": " ", "rejected": "b"})
    rows[2000 - 1] = "{not json"
    path = write(tmp_path / "prefs.jsonl.gz", "\n".join(rows) + "\n")
    expected = (
        f"{path} line 87: field 'chosen': the reply is empty. 8 more rows of this file are bad "
        "(7 x field 'chosen': the reply is empty; 1 x malformed JSON: Expecting property name enclosed in double quotes); "
        "--on_bad_rows skip loads its 2,303 good rows and reports the skipped ones"
    )
    with pytest.raises(DataError) as info:
        load_preferences(path)
    assert str(info.value) == expected

    result = run_cli(str(path))
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"error: {expected}\n")
    result = run_cli(str(path), "--on_bad_rows", "skip")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: 2303 preference pairs from 2303 rows (9 skipped), format 'strings'\n"


def test_bad_row_counts_name_the_three_commonest_kinds_then_the_rest():
    """In-memory rows: one identical pair (the error), then 3 empty rejected, 2 missing rejected, 2 not
    objects, 1 unknown field and 1 good row; 5 kinds after the first error in all."""
    identical = {"prompt": "p", "chosen": "a", "rejected": "a"}
    rows = [PAIR, identical] + [{**PAIR, "rejected": ""}] * 3 + [{"prompt": "p", "chosen": "a"}] * 2 + [[1], [2]]
    rows += [{**PAIR, "note": "x"}, identical, PAIR]
    with pytest.raises(DataError) as info:
        load_preferences(rows)
    assert str(info.value) == (
        "rows[1]: fields 'chosen' and 'rejected': identical replies carry no preference. 9 more rows of this source are bad "
        "(3 x field 'rejected': the reply is empty; 2 x field 'rejected': missing or null (format 'strings' needs prompt, "
        "chosen, rejected); 2 x expected an object with named fields, got list; 2 rows of 2 other kinds); "
        "--on_bad_rows skip loads its 2 good rows and reports the skipped ones"
    )


def test_bad_row_counts_stop_at_the_end_of_its_file_in_a_folder(tmp_path):
    """a.jsonl.gz: good, bad, bad; b.jsonl.gz: three bad rows. The error is a's line 2 and counts a alone."""
    bad = {"prompt": "p", "chosen": "a", "rejected": "a"}
    write(tmp_path / "a.jsonl.gz", jsonl([PAIR, bad, bad]))
    write(tmp_path / "b.jsonl.gz", jsonl([bad] * 3))
    with pytest.raises(DataError) as info:
        load_preferences(tmp_path)
    assert str(info.value) == (
        f"{tmp_path / 'a.jsonl.gz'} line 2: fields 'chosen' and 'rejected': identical replies carry no preference. "
        "1 more row of this file is bad (1 x fields 'chosen' and 'rejected': identical replies carry no preference); "
        "--on_bad_rows skip loads its 1 good row and reports the skipped ones"
    )


def test_bad_row_counts_say_where_a_broken_file_stopped_them(tmp_path):
    """A bad row near the start of a .gz file cut short later on: both problems, in one message."""
    rows = [{"prompt": "p", "chosen": "", "rejected": "b"}] + [{**PAIR, "id": str(i)} for i in range(2000)]
    whole = gzip.compress(jsonl(rows).encode(), compresslevel=1)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError) as info:
        load_preferences(path)
    message = str(info.value)
    assert message.startswith(
        f"{path} line 1: field 'chosen': the reply is empty. No other row of this file is bad "
        f"(counted up to where the file breaks: {path} line "
    ), message
    assert message.endswith(
        "cannot decompress the .gz data (Compressed file ended before the end-of-stream marker was reached); the file is "
        "cut short, corrupt or not .gz data); --on_bad_rows skip loads its " + message.split("skip loads its ")[1]
    )
    good = int(message.split("skip loads its ")[1].split(" good rows")[0].replace(",", ""))
    line = int(message.split(f"{path} line ")[2].split(":")[0])
    assert good == line - 2  # every complete line after line 1 is a good row


def test_a_file_with_no_good_row_says_skipping_would_not_help(tmp_path):
    path = write(tmp_path / "hh.jsonl.bz2", jsonl([{"chosen": "no transcript", "rejected": "at all"}] * 2))
    with pytest.raises(DataError) as info:
        load_preferences(path)
    assert str(info.value) == (
        f"{path} line 1: field 'chosen': expected an HH transcript '\\n\\nHuman: ...\\n\\nAssistant: ...'. 1 more row of this "
        "file is bad (1 x field 'chosen': expected an HH transcript '\\n\\nHuman: ...\\n\\nAssistant: ...'); no row of it "
        "loads, so --on_bad_rows skip would not help"
    )


# ---------------------------------------------------------------- Anthropic HH-RLHF as it ships

# Rows in HH-RLHF's exact shape: whole transcripts as strings, a blank line before each turn, the replies
# differing only at the end. Row 3's chosen transcript ends with an empty Assistant turn, as some real rows do.
HH_ROWS = [
    {
        "chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for about nine minutes.",
        "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: Why would you want to do that?",
    },
    {
        "chosen": "\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: What’s a good name for a cat?"
        "\n\nAssistant: Maybe “Pepper”.\n\nIt suits a grey cat.",
        "rejected": "\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: What’s a good name for a cat?"
        "\n\nAssistant: Cat.",
    },
    {
        "chosen": "\n\nHuman: Tell me a joke.\n\nAssistant:",
        "rejected": "\n\nHuman: Tell me a joke.\n\nAssistant: No.",
    },
    {
        "chosen": "\n\nHuman: What is 2 + 2?\n\nAssistant: 4",
        "rejected": "\n\nHuman: What is 2 + 2?\n\nAssistant: 5",
    },
]


def test_hh_rlhf_jsonl_gz_end_to_end(tmp_path):
    path = write(tmp_path / "train.jsonl.gz", jsonl(HH_ROWS))
    expected = (
        f"{path} line 3: field 'chosen': the reply is empty. No other row of this file is bad; "
        "--on_bad_rows skip loads its 3 good rows and reports the skipped one"
    )
    result = run_cli(str(path))
    assert (result.returncode, result.stderr) == (2, f"error: {expected}\n")
    result = run_cli(str(path), "--on_bad_rows", "skip")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: 3 preference pairs from 3 rows (1 skipped), format 'hh'\n"
    assert f"1 x field 'chosen': the reply is empty (first: {path} line 3)" in result.stderr

    with pytest.raises(DataError) as info:
        load_preferences(path)
    assert str(info.value) == expected
    egg, cat, sums = load_preferences(path, on_bad_rows="skip")
    assert (egg.prompt, egg.chosen, egg.rejected) == (
        [user("How do I boil an egg?")], "Put it in boiling water for about nine minutes.", "Why would you want to do that?",
    )
    assert cat.prompt == [user("Hi!"), assistant("Hello, how can I help?"), user("What’s a good name for a cat?")]
    assert (cat.chosen, cat.rejected) == ("Maybe “Pepper”.\n\nIt suits a grey cat.", "Cat.")
    assert (sums.chosen, sums.rejected, sums.source) == ("4", "5", f"{path} line 4")
    # As a folder with a split, the way the dataset's repository lays it out (train.jsonl.gz, test.jsonl.gz).
    prompts = load_prompts(tmp_path, split="train", on_bad_rows="skip")
    assert [(p.prompt[-1]["content"], p.reference_reply) for p in prompts] == [
        ("How do I boil an egg?", "Put it in boiling water for about nine minutes."),
        ("What’s a good name for a cat?", "Maybe “Pepper”.\n\nIt suits a grey cat."),
        ("What is 2 + 2?", "4"),
    ]


# ---------------------------------------------------------------- the data CLI's flag spellings


@pytest.mark.parametrize("flag", ["--on_bad_rows", "--on-bad-rows"])
def test_cli_accepts_both_spellings_of_on_bad_rows(flag, tmp_path, capsys):
    path = write(tmp_path / "prefs.jsonl", jsonl([PAIR, {"prompt": "p", "chosen": "a", "rejected": "a"}, PAIR]))
    main(["check", str(path), flag, "skip"])
    assert capsys.readouterr().out == f"{path}: 2 preference pairs from 2 rows (1 skipped), format 'strings'\n"
    with pytest.raises(SystemExit) as info:
        main(["check", str(path), flag, "error"])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {path} line 2: fields 'chosen' and 'rejected'")


@pytest.mark.parametrize("flag", ["--extra_fields", "--extra-fields"])
def test_cli_accepts_both_spellings_of_extra_fields(flag, tmp_path, capsys):
    path = write(tmp_path / "prefs.jsonl", jsonl([{**PAIR, "label": 1}]))
    main(["check", str(path), flag, "ignore"])
    assert capsys.readouterr().out == f"{path}: 1 preference pairs from 1 rows (0 skipped), format 'strings'\n"


def test_cli_help_shows_the_recipes_spelling(capsys):
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    help_text = capsys.readouterr().out
    assert "--on_bad_rows {error,skip}" in help_text and "--extra_fields {error,ignore}" in help_text
    assert "--on-bad-rows" not in help_text and "--extra-fields" not in help_text
