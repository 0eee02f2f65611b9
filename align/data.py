"""Preference, SFT and prompt data: real formats in, canonical records (align.records) out.

    pairs = load_preferences("ifprefs:prefs_train")                 # list[PreferencePair]
    sft = load_sft("my_chats.jsonl", max_rows=1000)                   # list[SFTExample]
    prompts = load_prompts("hf:Anthropic/hh-rlhf:test")              # list[PromptRecord]
    align data check my_prefs.csv                                     # row count and format, or `error: ...`

Sources: a .jsonl, .json, .csv or .parquet file, the first three also compressed (.jsonl.gz, .csv.bz2,
.json.xz, .jsonl.zst, ...; .zst needs the `zstandard` package); a folder of such files (one file type,
compression included; with `split=`, the file or subfolder named after the split); `hf:NAME` or
`hf:NAME:SPLIT` (datasets.load_dataset, split "train" unless given); a built-in `NAME:SPLIT` such as
`ifprefs:prefs_train`, which is the folder `<repo>/datasets/NAME` (or $ALIGN_DATASETS_DIR/NAME) with that
split; or an in-memory list of row dicts.
JSONL, CSV and Parquet are streamed, compressed ones too (decompressed as they are read, with the same
line numbers); a JSON array file is read whole (use JSONL for big data), and a .json file that does not
start with `[` is read as JSON lines.

Row formats, detected per row from its fields (`format="auto"`) or forced with `format=`:

    strings            {"prompt": str | [msgs], "chosen": str, "rejected": str}
    conversational     {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}   TRL's format; the prompt
                       may also be a string, chosen/rejected may repeat the prompt as a prefix, and without
                       a prompt field they are whole conversations whose shared prefix is the prompt
    hh                 {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}   Anthropic HH-RLHF
    ranked             {"prompt": ..., "responses": [...], "scores": [...] | "ranking": [...]}   scores: higher
                       is better; ranking[i] is the rank of responses[i], 1 = best. Expanded into pairs:
                       pairs="all" (every pair with different scores) or "best_vs_each" (each top-scored
                       response against each lower one); ties give no pair
    messages           {"messages": [msgs]}                                        SFT
    prompt_completion  {"prompt": str | [msgs], "completion": str | [msgs]}        SFT
    prompt             {"prompt": str | [msgs]}                                    prompts only (eval files)

The first row that loads fixes the format for the rest of the source (every file of a folder included),
so a row of another shape is reported against that format. Known metadata fields pass through (`id`,
`constraints`, `margin` for pairs) or are ignored (`meta`, `margin` elsewhere); any other field is an
error naming it unless `extra_fields="ignore"`. In CSV files, the cells of structured fields (messages,
constraints, meta, responses, scores, ranking) hold JSON, and prompt/chosen/rejected/completion cells may
hold a JSON list of messages.

Bad rows raise DataError naming the file, the line or row, the field and what was expected
(`on_bad_rows="error"`; the message goes on with how many more rows of that file are bad, of each kind,
from a scan of the rest of the file), or are skipped with a count per reason on stderr
(`on_bad_rows="skip"`). A problem with the file as a whole (empty, unreadable, a CSV quote left open to
the end of the file, compressed data cut short) is always an error. `max_rows` caps the number of
records returned (pairs, for ranked rows) and stops reading there.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import io
import itertools
import json
import lzma
import os
import re
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Literal, Union

from align.config import arg
from align.errors import AlignError, ConfigError, DataError, cli_main
from align.records import Message, PreferencePair, PromptRecord, SFTExample, check_messages, is_finite_number, short_repr

PREFERENCE_FORMATS = ("strings", "conversational", "hh", "ranked")
SFT_FORMATS = ("messages", "prompt_completion")
FORMATS = PREFERENCE_FORMATS + SFT_FORMATS + ("prompt",)

# Required fields of each format; conversational rows may also have "prompt", ranked rows need one of
# RANK_FIELDS. META_FIELDS are allowed in every format.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "strings": ("prompt", "chosen", "rejected"),
    "conversational": ("chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "ranked": ("prompt", "responses"),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "prompt": ("prompt",),
}
META_FIELDS = ("id", "constraints", "meta", "margin")
RANK_FIELDS = ("scores", "ranking")
_OPTIONAL_FIELDS = {"conversational": ("prompt",), "ranked": RANK_FIELDS}

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
COMPRESSED_SUFFIXES = (".jsonl", ".json", ".csv")  # Parquet compresses inside the file
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
DEFAULT_HF_SPLIT = "train"

Kind = Literal["prefs", "sft", "prompts"]
Source = Union[str, os.PathLike, list, tuple]
Record = Union[PreferencePair, SFTExample, PromptRecord]


@dataclass
class DataArgs:
    train_data: str = arg("ifprefs:prefs_train", "training data: a file, a folder, hf:NAME[:SPLIT] or a built-in NAME:SPLIT")
    eval_data: str | None = arg("ifprefs:prefs_test", "evaluation data (same forms as train_data); none = no evaluation set")
    data_format: Literal["auto", "strings", "conversational", "hh", "ranked", "messages", "prompt_completion", "prompt"] = arg(
        "auto", "row format; auto = detected from the fields of the first row that loads"
    )
    on_bad_rows: Literal["error", "skip"] = arg("error", "a bad row stops loading with its file, line and field; skip = count and report them")
    ranked_pairs: Literal["all", "best_vs_each"] = arg("all", "pairs from ranked rows: every pair with different scores, or the best against each")
    extra_fields: Literal["error", "ignore"] = arg("error", "a field no format knows is an error, or is ignored")
    max_train_rows: int | None = arg(None, "use at most this many training records (pairs for ranked rows); none = all")
    max_eval_rows: int | None = arg(None, "use at most this many evaluation records; none = all")

    def validate(self) -> None:
        for name in ("max_train_rows", "max_eval_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"config: {name}: expected a positive number of rows or none, got {value}")


# ---------------------------------------------------------------- reading rows from a source


@dataclass
class _RawRow:
    """One row as read from a source: its parsed value, or why it could not be read. `origin` is the file
    (or hf: dataset, or in-memory list) it came from, set by the reader of that origin."""

    where: str
    data: Any = None
    error: str | None = None
    origin: str = ""


def datasets_dir() -> Path:
    """Where built-in datasets live: $ALIGN_DATASETS_DIR, else `datasets/` next to the align package."""
    env = os.environ.get("ALIGN_DATASETS_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "datasets"


def _file_type(path: Path) -> tuple[str, str | None]:
    """(data suffix, compression suffix or None), lower-cased: ('.jsonl', '.gz') for `a.b.jsonl.gz`."""
    suffix = path.suffix.lower()
    if suffix in COMPRESSIONS:
        return Path(path.stem).suffix.lower(), suffix
    return suffix, None


def _type_label(path: Path) -> str:
    data_suffix, compression = _file_type(path)
    return data_suffix + (compression or "")


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a .zst file, one chunk at a time, across frames. zstandard's own
    stream_reader returns the data so far when the file ends inside a frame; this raises EOFError, as
    gzip, bz2 and lzma do for a truncated file."""

    def __init__(self, f: BinaryIO, zstandard: Any):
        self._f, self._zstandard = f, zstandard
        self._frame: Any = None  # the decompressor of the current frame
        self._pending, self._offset = b"", 0  # decompressed bytes not yet handed out start at _offset

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._offset == len(self._pending):
            # Small input chunks keep the output of one call small (zstd ratios can exceed 100x).
            chunk = self._f.read(1 << 14)
            if not chunk:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            out = []
            while chunk:
                if self._frame is None or self._frame.eof:
                    self._frame = self._zstandard.ZstdDecompressor().decompressobj()
                out.append(self._frame.decompress(chunk))
                chunk = self._frame.unused_data if self._frame.eof else b""
            self._pending, self._offset = b"".join(out), 0
        n = min(len(buffer), len(self._pending) - self._offset)
        buffer[:n] = memoryview(self._pending)[self._offset : self._offset + n]
        self._offset += n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def _zstandard(path: Path) -> Any:
    try:
        import zstandard
    except ImportError:
        raise AlignError(
            f"{path}: reading .zst files needs the zstandard package: pip install zstandard "
            "(or decompress it first: zstd -d)"
        ) from None
    return zstandard


def _open_bytes(path: Path) -> BinaryIO:
    """The file's bytes, decompressed as they are read when its name ends in .gz, .bz2, .xz or .zst."""
    compression = _file_type(path)[1]
    if compression == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if compression == ".bz2":
        return bz2.open(path, "rb")  # type: ignore[return-value]
    if compression == ".xz":
        return lzma.open(path, "rb")  # type: ignore[return-value]
    if compression == ".zst":
        zstandard = _zstandard(path)
        return io.BufferedReader(_ZstdReader(open(path, "rb"), zstandard))  # type: ignore[return-value]
    return open(path, "rb")


def _decompression_problem(path: Path, err: Exception) -> str | None:
    """What to say when reading a compressed file raised `err` because its data is corrupt or cut short;
    None for any other error. gzip and bz2 raise OSError for bad data, but without an errno, which tells
    it from a system error (permission denied, a disk error)."""
    compression = _file_type(path)[1]
    zstandard = sys.modules.get("zstandard")
    bad_data = (EOFError, zlib.error, lzma.LZMAError) + ((zstandard.ZstdError,) if zstandard else ())
    if compression is None or not (isinstance(err, bad_data) or (isinstance(err, OSError) and err.errno is None)):
        return None
    return f"cannot decompress the {compression} data ({err}); the file is cut short, corrupt or not {compression} data"


def _numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of the file, decompressed on the way; a corrupt or cut-short compressed file
    is a DataError at the line it breaks."""
    lineno = 0
    with _open_bytes(path) as f:
        while True:
            try:
                raw = f.readline()
            except Exception as err:
                problem = _decompression_problem(path, err)
                if problem is None:
                    raise
                raise DataError(f"{path} line {lineno + 1}: {problem}") from None
            if not raw:
                return
            lineno += 1
            yield lineno, raw


def _utf8_error(raw: bytes, err: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (at byte 0x{raw[err.start]:02x}, column {err.start + 1}); re-save the file as UTF-8"


class _JSONError(ValueError):
    def __init__(self, problem: str, lineno: int | None = None):
        super().__init__(problem)
        self.lineno = lineno


def _loads(text: str) -> Any:
    """json.loads, with each way it can fail turned into _JSONError with a readable message."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        problem = err.msg.removesuffix(" at")  # "Unterminated string starting at" + a position
        raise _JSONError(f"{problem} (at column {err.colno})", err.lineno) from None
    except RecursionError:
        raise _JSONError("nested too deeply") from None
    except ValueError as err:  # an integer over Python's 4300-digit limit
        raise _JSONError(str(err).split(";")[0]) from None


def _parse_json_line(text: str, where: str, *, truncated: bool, json_suffix: bool) -> _RawRow:
    try:
        return _RawRow(where, data=_loads(text))
    except _JSONError as err:
        hint = "; the line looks truncated" if truncated else ""
        if json_suffix:
            hint += "; a .json file holds a list of rows or one JSON object per line"
        return _RawRow(where, error=f"malformed JSON: {err}{hint}")


def _read_jsonl(path: Path) -> Iterator[_RawRow]:
    # Binary lines, decoded one at a time: a bad byte is reported at its line and memory stays flat.
    seen_content = False
    json_suffix = _file_type(path)[0] == ".json"
    for lineno, raw in _numbered_lines(path):
        where = f"{path} line {lineno}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            seen_content = True
            yield _RawRow(where, error=_utf8_error(raw, err))
            continue
        if lineno == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue  # a blank line holds no row
        seen_content = True
        yield _parse_json_line(text, where, truncated=not raw.endswith(b"\n"), json_suffix=json_suffix)
    if not seen_content:
        raise DataError(f"{path}: the file is empty (no rows)")


def _first_char(path: Path) -> str:
    with _open_bytes(path) as f:
        while chunk := f.read(4096):
            text = chunk.lstrip(b" \t\r\n").removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
            if text:
                return chr(text[0])
    return ""


def _read_json(path: Path) -> Iterator[_RawRow]:
    if _first_char(path) != "[":
        yield from _read_jsonl(path)
        return
    with _open_bytes(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 (at byte 0x{raw[err.start]:02x}); re-save the file as UTF-8") from None
    try:
        rows = _loads(text)
    except _JSONError as err:
        where = f"{path} line {err.lineno}" if err.lineno else str(path)
        raise DataError(f"{where}: malformed JSON: {err}") from None
    if not rows:
        raise DataError(f"{path}: no rows (an empty list)")
    for i, row in enumerate(rows, start=1):
        yield _RawRow(f"{path} row {i}", data=row)


# CSV cells are strings; these fields hold JSON (lists and objects) in a CSV file.
_JSON_CELLS = ("messages", "constraints", "meta", "responses", "scores", "ranking")
_MESSAGE_CELLS = ("prompt", "chosen", "rejected", "completion")


def _decode_csv_cells(row: dict[str, str]) -> dict[str, Any]:
    """Turn a CSV row's strings into a row like a JSON one; raise DataError (no location) for a bad cell."""
    out: dict[str, Any] = {}
    for key, cell in row.items():
        if cell == "" and key in _JSON_CELLS + META_FIELDS:
            continue  # an empty cell of an optional or structured column means "absent"
        if key in _JSON_CELLS:
            try:
                out[key] = _loads(cell)
            except _JSONError:
                raise DataError(f"field '{key}': expected JSON in the CSV cell (e.g. [1, 2, 3]), got {cell[:40]!r}") from None
        elif key == "margin":
            try:
                out[key] = float(cell)
            except ValueError:
                raise DataError(f"field 'margin': expected a number, got {cell[:40]!r}") from None
        elif key in _MESSAGE_CELLS and cell.lstrip().startswith("[{"):
            try:
                value = _loads(cell)
            except _JSONError:
                value = cell  # text that happens to start with "[{"
            out[key] = value if isinstance(value, list) and all(isinstance(m, dict) for m in value) else cell
        else:
            out[key] = cell
    return out


def _read_csv(path: Path) -> Iterator[_RawRow]:
    bad_lines: dict[int, str] = {}

    def lines() -> Iterator[str]:
        # Undecodable lines are decoded with replacement so the CSV structure survives, and remembered,
        # so the row they belong to is reported (and can be skipped) instead of failing the whole file.
        for lineno, raw in _numbered_lines(path):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad_lines[lineno] = _utf8_error(raw, err)
                text = raw.decode("utf-8", errors="replace")
            yield text.removeprefix("\ufeff") if lineno == 1 else text

    # The csv module refuses fields over 128 KiB by default; long replies are legitimate data.
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(lines(), strict=True)
    header: list[str] | None = None
    rownum = 0
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            if "unexpected end of data" in str(err):
                # An open quote swallows every later line, so no row after it can be trusted.
                raise DataError(
                    f"{path} line {start}: a quoted field opened here is never closed (broken quote); "
                    "every later row would be read into it"
                ) from None
            rownum += 1
            yield _RawRow(f"{path} row {rownum} (line {start})", error=f"broken CSV quoting: {err}")
            continue
        if not cells:
            continue  # a blank line holds no row
        if header is None:
            if start in bad_lines:
                raise DataError(f"{path} line {start}: header: {bad_lines[start]}")
            header = [c.strip() for c in cells]
            duplicated = sorted({c for c in header if header.count(c) > 1})
            if "" in header or duplicated:
                raise DataError(f"{path} line {start}: header: expected unique, non-empty column names, got {cells}")
            continue
        rownum += 1
        where = f"{path} row {rownum} (line {start})"
        bad = [bad_lines[n] for n in range(start, reader.line_num + 1) if n in bad_lines]
        if bad:
            yield _RawRow(where, error=bad[0])
        elif len(cells) != len(header):
            yield _RawRow(where, error=f"expected {len(header)} columns ({', '.join(header)}), got {len(cells)}")
        else:
            try:
                decoded = _RawRow(where, data=_decode_csv_cells(dict(zip(header, cells))))
            except DataError as err:
                decoded = _RawRow(where, error=str(err))
            yield decoded
    if header is None:
        raise DataError(f"{path}: the file is empty (no header row)")
    if rownum == 0:
        raise DataError(f"{path}: no rows below the header")


def _from_columns(row: dict[str, Any]) -> dict[str, Any]:
    """Undo what a columnar format (Parquet, Arrow) does to objects with differing keys: every object
    in a column gets every key, null where it had none. Constraints and meta come back as written."""
    out = dict(row)
    if isinstance(out.get("constraints"), list):
        out["constraints"] = [
            {k: v for k, v in c.items() if v is not None} if isinstance(c, dict) else c for c in out["constraints"]
        ]
    if isinstance(out.get("meta"), dict):
        out["meta"] = {k: v for k, v in out["meta"].items() if v is not None}
    return out


def _read_parquet(path: Path) -> Iterator[_RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    if parquet.metadata.num_rows == 0:
        raise DataError(f"{path}: no rows")
    rownum = 0
    batches = parquet.iter_batches(batch_size=256)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError, ValueError) as err:
            raise DataError(f"{path} row {rownum + 1}: unreadable Parquet data ({err})") from None
        for row in batch.to_pylist():
            rownum += 1
            yield _RawRow(f"{path} row {rownum}", data=_from_columns(row))


def _read_hf(name: str, split: str) -> Iterator[_RawRow]:
    try:
        import datasets
    except ImportError:
        raise AlignError("hf: sources need the `datasets` package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # the Hub, the network and dataset builders raise many types; all mean "cannot load"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"hf:{name}: cannot load split {split!r} ({detail}); check the name and split, and note that with "
            "HF_HUB_OFFLINE=1 only datasets already in the local cache load"
        ) from None
    for i, row in enumerate(ds, start=1):
        yield _RawRow(f"hf:{name}[{split}] row {i}", data=_from_columns(row), origin=f"hf:{name}[{split}]")


def _read_memory(rows: list | tuple) -> Iterator[_RawRow]:
    if not rows:
        raise DataError("rows: no rows (an empty list)")
    for i, row in enumerate(rows):
        yield _RawRow(f"rows[{i}]", data=row, origin="rows")


_READERS: dict[str, Callable[[Path], Iterator[_RawRow]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


_EXPECTED_FILES = f"{', '.join(FILE_SUFFIXES)}, or {', '.join(COMPRESSED_SUFFIXES)} compressed as {', '.join(COMPRESSIONS)}"


def _is_data_file(path: Path) -> bool:
    data_suffix, compression = _file_type(path)
    return data_suffix in (FILE_SUFFIXES if compression is None else COMPRESSED_SUFFIXES)


def _data_name(path: Path) -> str:
    """The file name without its data and compression suffixes: `train` for train.jsonl.gz."""
    return path.name[: len(path.name) - len(_type_label(path))]


def _read_path(path: Path, split: str | None) -> Iterator[_RawRow]:
    if path.is_dir():
        if split is not None:
            matches = [p for p in sorted(path.iterdir()) if p.name == split and p.is_dir()]
            matches += [p for p in sorted(path.iterdir()) if _is_data_file(p) and _data_name(p) == split and p.is_file()]
            if not matches:
                raise DataError(
                    f"{path}: no split {split!r} (expected {split}.jsonl, .json, .csv, .parquet, one of the first three "
                    f"compressed as {', '.join(COMPRESSIONS)}, or a folder {split}/)"
                )
            if len(matches) > 1:
                raise DataError(f"{path}: split {split!r} is ambiguous ({', '.join(p.name for p in matches)}); keep one")
            return _read_path(matches[0], None)
        files = sorted(p for p in path.iterdir() if p.is_file() and _is_data_file(p) and not p.name.startswith("."))
        if not files:
            raise DataError(f"{path}: no data files in the folder (expected {_EXPECTED_FILES})")
        # data.jsonl beside data.jsonl.gz is most likely the same rows twice, so compression counts too.
        suffixes = sorted({_type_label(p) for p in files})
        if len(suffixes) > 1:
            raise DataError(f"{path}: mixed file formats in one folder ({', '.join(suffixes)}); keep one format per folder")
        return itertools.chain.from_iterable(_read_path(p, None) for p in files)
    if split is not None:
        raise DataError(f"{path}: split={split!r} applies to folders, hf: and built-in datasets, not to a single file")
    if not _is_data_file(path):
        raise DataError(f"{path}: unsupported file type {_type_label(path) or path.suffix!r}; expected {_EXPECTED_FILES}")
    return _read_file(path, _READERS[_file_type(path)[0]])


def _read_file(path: Path, reader: Callable[[Path], Iterator[_RawRow]]) -> Iterator[_RawRow]:
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty (0 bytes)")
        try:
            if reader is not _read_parquet:
                _check_not_wide_encoding(path)
            for raw in reader(path):
                raw.origin = str(path)
                yield raw
        except Exception as err:  # corrupt data met outside the line readers (the first bytes, a JSON array)
            problem = _decompression_problem(path, err)
            if problem is None:
                raise
            raise DataError(f"{path}: {problem}") from None
    except OSError as err:  # permissions, a file removed while reading, a disk error
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


_WIDE_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


def _check_not_wide_encoding(path: Path) -> None:
    """A UTF-16 or UTF-32 text file garbles every line, so it is a problem of the file, not of rows."""
    with _open_bytes(path) as f:
        start = f.read(4)
    for bom, name in _WIDE_BOMS.items():
        if start.startswith(bom):
            raise DataError(f"{path}: the file is {name} encoded (it starts with a {name} byte-order mark); re-save it as UTF-8")


def _merge_split(source: str, from_name: str, split: str | None) -> str | None:
    if from_name and split is not None and split != from_name:
        raise DataError(f"{source}: names split {from_name!r} but split={split!r} was given")
    return from_name or split


def _open_source(source: Source, split: str | None) -> Iterator[_RawRow]:
    if isinstance(source, (list, tuple)):
        if split is not None:
            raise DataError("rows: split= does not apply to an in-memory list of rows")
        return _read_memory(source)
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"data source: expected a path, hf:NAME or a built-in NAME:SPLIT, got {type(source).__name__}")
    text = os.fspath(source)
    path = Path(text)
    if path.exists():
        return _read_path(path, split)
    if text.startswith("hf:"):
        name, _, from_name = text[3:].partition(":")
        if not name:
            raise DataError(f"{text}: expected hf:NAME or hf:NAME:SPLIT")
        return _read_hf(name, _merge_split(text, from_name, split) or DEFAULT_HF_SPLIT)
    prefix, colon, from_name = text.partition(":")
    if colon and prefix and "/" not in prefix:
        folder = datasets_dir() / prefix
        if not folder.is_dir():
            raise DataError(f"{text}: no built-in dataset {prefix!r} (no folder {folder}; set ALIGN_DATASETS_DIR to the datasets folder)")
        merged = _merge_split(text, from_name, split)
        if merged is None:
            raise DataError(f"{text}: name the split, e.g. {prefix}:train")
        return _read_path(folder, merged)
    raise DataError(
        f"{text}: no such file or folder (a data source is a {', '.join(FILE_SUFFIXES)} file (or compressed), a folder of them, "
        "hf:NAME[:SPLIT], or a built-in NAME:SPLIT such as ifprefs:prefs_train)"
    )


# ---------------------------------------------------------------- row formats -> records


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), type(value).__name__)


def detect_format(row: Any, where: str = "row") -> str:
    """The format of one row, from its fields: one of FORMATS. Raises DataError when no format fits."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with named fields, got {_type_name(row)}")
    keys = {k for k, v in row.items() if v is not None}
    if "responses" in keys:
        return "ranked"
    if "chosen" in keys or "rejected" in keys:
        reply = row.get("chosen", row.get("rejected"))
        if isinstance(reply, list):
            return "conversational"
        return "strings" if "prompt" in keys else "hh"
    if "messages" in keys:
        return "messages"
    if "completion" in keys:
        return "prompt_completion"
    if "prompt" in keys:
        return "prompt"
    raise DataError(
        f"{where}: cannot tell the format from the fields {sorted(map(str, row))}; expected prompt/chosen/rejected, "
        "chosen/rejected (HH), prompt/responses with scores or ranking, messages, prompt/completion, or prompt"
    )


def _check_fields(row: dict, fmt: str, where: str, extra_fields: str) -> None:
    required = FORMAT_FIELDS[fmt]
    for name in required:
        if name not in row:
            raise DataError(f"{where}: field '{name}': missing or null (format '{fmt}' needs {', '.join(required)})")
    if extra_fields == "ignore":
        return
    known = set(required) | set(META_FIELDS) | set(_OPTIONAL_FIELDS.get(fmt, ()))
    for name in row:
        if name not in known:
            raise DataError(
                f"{where}: field {short_repr(str(name))}: not a field of format '{fmt}' (known: {', '.join(sorted(known))}); "
                "pass extra_fields='ignore' to ignore it"
            )


def _meta(row: dict) -> dict[str, Any]:
    """The metadata every record keeps (checked by the record itself)."""
    return {"constraints": row.get("constraints"), "id": row.get("id")}


def _text(row: dict, name: str, where: str) -> str:
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}': expected a string, got {_type_name(value)}")
    return value


def _prompt_messages(value: Any, where: str) -> list[Message]:
    """A prompt given as a string (one user turn) or as chat messages."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field 'prompt': the prompt is empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return check_messages(value, where, field_name="prompt")
    raise DataError(f"{where}: field 'prompt': expected a string or a list of {{role, content}} messages, got {_type_name(value)}")


def _message_list(row: dict, name: str, where: str) -> list[Message]:
    value = row[name]
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{name}': expected a list of {{role, content}} messages, got {_type_name(value)}")
    return check_messages(value, where, field_name=name)


def _single_reply(messages: list[Message], where: str, name: str) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        got = ", ".join(m["role"] for m in messages) or "nothing"
        raise DataError(f"{where}: field '{name}': expected one assistant message after the prompt, got {got}")
    return messages[0]["content"]


def _check_replies_alike(row: dict, where: str) -> None:
    """chosen and rejected both reply strings or both message lists: one of each has no single reading."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    kinds = {name: "a string" if isinstance(value, str) else "a list" for name, value in (("chosen", chosen), ("rejected", rejected))}
    if isinstance(chosen, (str, list)) and isinstance(rejected, (str, list)) and kinds["chosen"] != kinds["rejected"]:
        raise DataError(
            f"{where}: fields 'chosen' and 'rejected': 'chosen' is {kinds['chosen']} but 'rejected' is {kinds['rejected']}; "
            "give both as reply strings (the prompt in 'prompt') or both as lists of {role, content} messages"
        )


def _pairs_from_strings(row: dict, where: str, pairs: str) -> list[PreferencePair]:
    _check_replies_alike(row, where)
    # The prompt may be chat messages (a system turn, earlier turns) while the replies are plain strings.
    prompt = _prompt_messages(row["prompt"], where)
    chosen, rejected = _text(row, "chosen", where), _text(row, "rejected", where)
    return [PreferencePair(prompt, chosen, rejected, where, margin=row.get("margin"), **_meta(row))]


def _pairs_from_conversation(row: dict, where: str, pairs: str) -> list[PreferencePair]:
    _check_replies_alike(row, where)
    chosen, rejected = _message_list(row, "chosen", where), _message_list(row, "rejected", where)
    if "prompt" in row:
        prompt = _prompt_messages(row["prompt"], where)
        n = len(prompt)
        # TRL's older format (and e.g. ultrafeedback_binarized) repeat the prompt at the start of each reply.
        if chosen[:n] == prompt and len(chosen) > n:
            chosen = chosen[n:]
        if rejected[:n] == prompt and len(rejected) > n:
            rejected = rejected[n:]
    else:
        # Implicit prompt: two whole conversations; the prompt is what they share.
        if chosen == rejected:
            raise DataError(f"{where}: fields 'chosen' and 'rejected': identical conversations carry no preference")
        n = next((i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)))
        if n == 0:
            raise DataError(
                f"{where}: fields 'chosen' and 'rejected': without a 'prompt' field they must be whole conversations "
                "that share the prompt, but they differ from the first message"
            )
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    return [
        PreferencePair(
            prompt, _single_reply(chosen, where, "chosen"), _single_reply(rejected, where, "rejected"), where,
            margin=row.get("margin"), **_meta(row),
        )
    ]


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _hh_turns(row: dict, name: str, where: str) -> list[Message]:
    text = _text(row, name, where)
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(f"{where}: field '{name}': expected an HH transcript '\\n\\nHuman: ...\\n\\nAssistant: ...'")
    turns = [
        {"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2])
    ]
    if turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: field '{name}': the transcript must end with an Assistant reply")
    return turns


def _pairs_from_hh(row: dict, where: str, pairs: str) -> list[PreferencePair]:
    chosen, rejected = _hh_turns(row, "chosen", where), _hh_turns(row, "rejected", where)
    if chosen[:-1] != rejected[:-1]:
        turn = next((i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)) - 1)
        raise DataError(
            f"{where}: fields 'chosen' and 'rejected': the transcripts do not share a prefix (they differ at turn "
            f"{turn + 1}); HH rows must differ only in the final Assistant reply"
        )
    return [PreferencePair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], where, margin=row.get("margin"), **_meta(row))]


def _response_text(value: Any, where: str, name: str) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        (message,) = check_messages([value], where, field_name=name)
        if message["role"] != "assistant":
            raise DataError(f"{where}: field '{name}.role': expected 'assistant', got {message['role']!r}")
        value = message["content"]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}': expected a string or an assistant message, got {_type_name(value)}")
    if not value.strip():
        raise DataError(f"{where}: field '{name}': the reply is empty")
    return value


def _scores(row: dict, where: str, n: int) -> tuple[str, list[float]]:
    """(field name, scores with higher = better) from `scores` or `ranking` (1 = best)."""
    given = [name for name in RANK_FIELDS if name in row]
    if len(given) != 1:
        raise DataError(f"{where}: field 'scores': expected either 'scores' (higher is better) or 'ranking' (1 = best), got {given or 'neither'}")
    (name,) = given
    values = row[name]
    if not isinstance(values, list) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, list) else _type_name(values)
        raise DataError(f"{where}: field '{name}': expected a list of {n} numbers, one per response, got {got}")
    for i, v in enumerate(values):
        if not is_finite_number(v):
            raise DataError(f"{where}: field '{name}[{i}]': expected a finite number, got {short_repr(v)}")
    return name, [float(v) if name == "scores" else -float(v) for v in values]


def _pairs_from_ranked(row: dict, where: str, pairs: str) -> list[PreferencePair]:
    prompt = _prompt_messages(row["prompt"], where)
    responses = row["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(f"{where}: field 'responses': expected a list of at least 2 responses, got {_type_name(responses)}")
    texts = [_response_text(r, where, f"responses[{i}]") for i, r in enumerate(responses)]
    name, scores = _scores(row, where, len(texts))
    if pairs == "all":
        ranked = [(i, j) if scores[i] > scores[j] else (j, i) for i, j in itertools.combinations(range(len(texts)), 2) if scores[i] != scores[j]]
    else:
        top = max(scores)
        ranked = [(i, j) for i in range(len(texts)) if scores[i] == top for j in range(len(texts)) if scores[j] < top]
    if not ranked:
        raise DataError(f"{where}: field '{name}': all responses tie, so there is no preference to learn")
    for i, j in ranked:
        if texts[i].strip() == texts[j].strip():
            raise DataError(f"{where}: fields 'responses[{i}]' and 'responses[{j}]': identical replies with different {name}")
    return [PreferencePair(prompt, texts[i], texts[j], where, **_meta(row)) for i, j in ranked]


def _sft_from_messages(row: dict, where: str) -> SFTExample:
    return SFTExample(_message_list(row, "messages", where), where, **_meta(row))


def _completion_messages(row: dict, where: str) -> list[Message]:
    value = row["completion"]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field 'completion': the reply is empty")
        return [{"role": "assistant", "content": value}]
    messages = _message_list(row, "completion", where)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            raise DataError(f"{where}: field 'completion[{i}].role': expected 'assistant', got {m['role']!r}")
    return messages


def _sft_from_prompt_completion(row: dict, where: str) -> SFTExample:
    prompt = _prompt_messages(row["prompt"], where)
    return SFTExample(prompt + _completion_messages(row, where), where, **_meta(row))


_PAIR_ADAPTERS: dict[str, Callable[[dict, str, str], list[PreferencePair]]] = {
    "strings": _pairs_from_strings,
    "conversational": _pairs_from_conversation,
    "hh": _pairs_from_hh,
    "ranked": _pairs_from_ranked,
}
_SFT_ADAPTERS: dict[str, Callable[[dict, str], SFTExample]] = {
    "messages": _sft_from_messages,
    "prompt_completion": _sft_from_prompt_completion,
}


def _prompt_from_row(fmt: str, row: dict, where: str) -> PromptRecord:
    """A prompt for generation from a row of any format; a known good reply becomes `reference_reply`."""
    if fmt in _PAIR_ADAPTERS:
        best = _PAIR_ADAPTERS[fmt](row, where, "best_vs_each")[0]
        return PromptRecord(best.prompt, where, best.constraints, reference_reply=best.chosen, id=best.id)
    if fmt in _SFT_ADAPTERS:
        messages = _SFT_ADAPTERS[fmt](row, where).messages
        # The prompt is the conversation up to its last assistant turn, which is the reference reply.
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return PromptRecord(messages[:last], where, reference_reply=messages[last]["content"], **_meta(row))
    return PromptRecord(_prompt_messages(row["prompt"], where), where, **_meta(row))


_KIND_FORMATS = {"prefs": PREFERENCE_FORMATS, "sft": SFT_FORMATS, "prompts": FORMATS}
_KIND_NEEDS = {
    "prefs": "preference data needs prompt/chosen/rejected, chosen/rejected (HH) or prompt/responses with scores or ranking",
    "sft": "SFT data needs messages or prompt/completion",
}


def _convert(kind: str, fmt: str, row: Any, where: str, pairs: str, extra_fields: str) -> list[Record]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with named fields, got {_type_name(row)}")
    if fmt not in _KIND_FORMATS[kind]:
        raise DataError(f"{where}: this row is in format '{fmt}' (fields {sorted(map(str, row))}), but {_KIND_NEEDS[kind]}")
    _check_fields(row, fmt, where, extra_fields)
    if kind == "prefs":
        return list(_PAIR_ADAPTERS[fmt](row, where, pairs))
    if kind == "sft":
        return [_SFT_ADAPTERS[fmt](row, where)]
    return [_prompt_from_row(fmt, row, where)]


# ---------------------------------------------------------------- loading


@dataclass
class _LoadStats:
    """What one pass over a source saw (for the skip report and `python -m align.data check`)."""

    rows: int = 0
    records: int = 0
    format: str | None = None
    skipped: Counter = field(default_factory=Counter)
    first_skipped: dict[str, str] = field(default_factory=dict)


def _choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(map(repr, choices))}")


def _reason(message: str, where: str) -> str:
    """A bad row's message without its location, so that rows with the same problem group together."""
    reason = message.removeprefix(f"{where}: ")
    reason = re.sub(r"\[\d+\]", "[i]", reason)
    return re.sub(r" \(at [^)]*\)", "", reason)


def _convert_raw(
    kind: str, raw: _RawRow, fmt_fixed: str | None, pairs: str, extra_fields: str, forced: bool
) -> tuple[str, list[Record]]:
    """(the row's format, its records); DataError naming the row when it is bad. A bad row that looks like
    another format than the one the source is read as (asked for with format=, or fixed by its first
    good row) says so."""
    if raw.error is not None:
        raise DataError(f"{raw.where}: {raw.error}")
    row = {k: v for k, v in raw.data.items() if v is not None} if isinstance(raw.data, dict) else raw.data
    fmt = fmt_fixed or detect_format(row, raw.where)
    try:
        return fmt, _convert(kind, fmt, row, raw.where, pairs, extra_fields)
    except DataError as err:
        try:
            looks = detect_format(row, raw.where) if fmt_fixed else fmt
        except DataError:
            looks = fmt
        if looks == fmt:
            raise
        if forced:
            raise DataError(f"{err} (this row looks like format '{looks}', but format '{fmt}' was asked for)") from None
        raise DataError(
            f"{err} (this row looks like format '{looks}', but the source is read as '{fmt}', the format of its "
            "first good row; keep one format per source)"
        ) from None


def _plural(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"


def _rest_of_origin(
    rows: Iterator[_RawRow], bad: _RawRow, good_before: int, convert: Callable[[_RawRow, str | None], str], fmt_fixed: str | None
) -> str:
    """What follows a bad row's error in on_bad_rows='error' mode: how many more rows of its file are bad, of
    each kind, and what --on_bad_rows skip would load. Reads the rest of the file (not the files after it
    in a folder); each row is judged as skip mode would, so the counts are the ones skip mode reports."""
    origin = bad.origin
    noun = "file" if origin not in ("", "rows") and not origin.startswith("hf:") else "source"
    reasons: Counter = Counter()
    good = good_before
    stopped = ""
    try:
        for raw in rows:
            if raw.origin != origin:
                break
            try:
                fmt_fixed = convert(raw, fmt_fixed)
                good += 1
            except DataError as err:
                # Counted by the problem alone; the error already says which format the rows are read as.
                reasons[_reason(str(err), raw.where).split(" (this row looks like format ")[0]] += 1
    except AlignError as err:
        # A problem of the file as a whole further on; one of the next file in a folder is not this file's.
        if str(err).startswith((f"{origin}:", f"{origin} ")):
            stopped = f" (counted up to where the file breaks: {err})"
    more = sum(reasons.values())
    if more:
        kinds = [f"{n:,} x {reason}" for reason, n in reasons.most_common(3)]
        if len(reasons) > 3:
            others = more - sum(n for _, n in reasons.most_common(3))
            kinds.append(f"{_plural(others, 'row', 'rows')} of {_plural(len(reasons) - 3, 'other kind', 'other kinds')}")
        told = f"{_plural(more, 'more row', 'more rows')} of this {noun} {'is' if more == 1 else 'are'} bad ({'; '.join(kinds)}){stopped}"
    else:
        told = f"no other row of this {noun} is bad{stopped}"
    if good == 0:
        return f"{told}; no row of it loads, so --on_bad_rows skip would not help"
    skipped = "the skipped ones" if more else "the skipped one"
    return f"{told}; --on_bad_rows skip loads its {_plural(good, 'good row', 'good rows')} and reports {skipped}"


def _report_skipped(source: Source, stats: _LoadStats) -> None:
    name = "rows" if isinstance(source, (list, tuple)) else os.fspath(source)
    lines = [f"{name}: skipped {sum(stats.skipped.values())} of {stats.rows} rows read (on_bad_rows='skip'):"]
    for reason, count in stats.skipped.most_common():
        lines.append(f"  {count} x {reason} (first: {stats.first_skipped[reason]})")
    print("\n".join(lines), file=sys.stderr, flush=True)


def _iter_records(
    kind: Kind,
    source: Source,
    split: str | None,
    *,
    format: str,
    on_bad_rows: str,
    pairs: str,
    extra_fields: str,
    max_rows: int | None,
    stats: _LoadStats | None = None,
) -> Iterator[Any]:
    _choice("format", format, ("auto",) + _KIND_FORMATS[kind])
    _choice("on_bad_rows", on_bad_rows, ("error", "skip"))
    _choice("pairs", pairs, ("all", "best_vs_each"))
    _choice("extra_fields", extra_fields, ("error", "ignore"))
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ConfigError(f"max_rows={max_rows!r}: expected a positive integer or None")
    stats = _LoadStats() if stats is None else stats
    fmt_fixed = None if format == "auto" else format

    def convert_only(raw: _RawRow, fmt: str | None) -> str:
        return _convert_raw(kind, raw, fmt, pairs, extra_fields, format != "auto")[0]

    rows = _open_source(source, split)
    origin, good_in_origin = None, 0
    try:
        for raw in rows:
            stats.rows += 1
            if raw.origin != origin:
                origin, good_in_origin = raw.origin, 0
            try:
                fmt, records = _convert_raw(kind, raw, fmt_fixed, pairs, extra_fields, format != "auto")
            except DataError as err:
                if on_bad_rows == "error":
                    rest = _rest_of_origin(rows, raw, good_in_origin, convert_only, fmt_fixed)
                    raise DataError(f"{err}. {rest[0].upper()}{rest[1:]}") from None
                reason = _reason(str(err), raw.where)
                stats.skipped[reason] += 1
                stats.first_skipped.setdefault(reason, raw.where)
                continue
            # The first row that loads fixes the format, so a later row of another shape is reported
            # against it rather than silently read another way.
            fmt_fixed = stats.format = fmt
            good_in_origin += 1
            for record in records:
                yield record
                stats.records += 1
                if max_rows is not None and stats.records >= max_rows:
                    return
    finally:
        if stats.skipped:
            _report_skipped(source, stats)
    if stats.records == 0:
        name = "rows" if isinstance(source, (list, tuple)) else os.fspath(source)
        raise DataError(f"{name}: no valid rows ({stats.rows} read, all skipped as bad)")


def iter_preferences(
    source: Source,
    split: str | None = None,
    *,
    format: str = "auto",
    on_bad_rows: str = "error",
    pairs: str = "all",
    extra_fields: str = "error",
    max_rows: int | None = None,
) -> Iterator[PreferencePair]:
    """Stream preference pairs from `source` (see the module docstring for sources and formats)."""
    return _iter_records(
        "prefs", source, split, format=format, on_bad_rows=on_bad_rows, pairs=pairs, extra_fields=extra_fields, max_rows=max_rows
    )


def iter_sft(
    source: Source,
    split: str | None = None,
    *,
    format: str = "auto",
    on_bad_rows: str = "error",
    extra_fields: str = "error",
    max_rows: int | None = None,
) -> Iterator[SFTExample]:
    """Stream SFT conversations from `source`."""
    return _iter_records(
        "sft", source, split, format=format, on_bad_rows=on_bad_rows, pairs="all", extra_fields=extra_fields, max_rows=max_rows
    )


def iter_prompts(
    source: Source,
    split: str | None = None,
    *,
    format: str = "auto",
    on_bad_rows: str = "error",
    extra_fields: str = "error",
    max_rows: int | None = None,
) -> Iterator[PromptRecord]:
    """Stream prompts for generation from eval, prompt-only, SFT or preference data."""
    return _iter_records(
        "prompts", source, split, format=format, on_bad_rows=on_bad_rows, pairs="all", extra_fields=extra_fields, max_rows=max_rows
    )


def load_preferences(
    source: Source,
    split: str | None = None,
    *,
    format: str = "auto",
    on_bad_rows: str = "error",
    pairs: str = "all",
    extra_fields: str = "error",
    max_rows: int | None = None,
) -> list[PreferencePair]:
    return list(
        iter_preferences(source, split, format=format, on_bad_rows=on_bad_rows, pairs=pairs, extra_fields=extra_fields, max_rows=max_rows)
    )


def load_sft(
    source: Source,
    split: str | None = None,
    *,
    format: str = "auto",
    on_bad_rows: str = "error",
    extra_fields: str = "error",
    max_rows: int | None = None,
) -> list[SFTExample]:
    return list(iter_sft(source, split, format=format, on_bad_rows=on_bad_rows, extra_fields=extra_fields, max_rows=max_rows))


def load_prompts(
    source: Source,
    split: str | None = None,
    *,
    format: str = "auto",
    on_bad_rows: str = "error",
    extra_fields: str = "error",
    max_rows: int | None = None,
) -> list[PromptRecord]:
    return list(iter_prompts(source, split, format=format, on_bad_rows=on_bad_rows, extra_fields=extra_fields, max_rows=max_rows))


# ---------------------------------------------------------------- after loading


def to_hf_dataset(records: Iterable[Record]):
    """A `datasets.Dataset` in TRL's conversational format (one `to_trl()` row per record)."""
    records = list(records)
    if not records:
        raise DataError("to_hf_dataset: no records")
    kinds = sorted({type(r).__name__ for r in records})
    if len(kinds) > 1:
        raise DataError(f"to_hf_dataset: mixed record types ({', '.join(kinds)}); one dataset holds one kind")
    rows = [r.to_trl() for r in records]
    with_margin = [r for r, row in zip(records, rows) if "margin" in row]
    if 0 < len(with_margin) < len(rows):
        missing = next(r for r, row in zip(records, rows) if "margin" not in row)
        raise DataError(
            f"{missing.source}: field 'margin': missing, while {len(with_margin)} of {len(rows)} pairs have one; "
            "give every pair a margin or none"
        )
    import datasets

    return datasets.Dataset.from_list(rows)


def _token_length(tokenizer: Any, messages: list[Message], generation_prompt: bool) -> int:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    else:
        # No template to apply: count the contents alone (a lower bound on the real sequence).
        text = "\n\n".join(m["content"] for m in messages)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def record_length(record: Record, tokenizer: Any) -> int:
    """Tokens in the longest sequence a record becomes: prompt + reply (the longer of chosen and
    rejected), the whole SFT conversation, or the prompt with the generation prompt."""
    if isinstance(record, PreferencePair):
        return max(
            _token_length(tokenizer, record.prompt + [{"role": "assistant", "content": reply}], False)
            for reply in (record.chosen, record.rejected)
        )
    if isinstance(record, SFTExample):
        return _token_length(tokenizer, record.messages, False)
    if isinstance(record, PromptRecord):
        return _token_length(tokenizer, record.prompt, True)
    raise TypeError(f"record_length: expected PreferencePair, SFTExample or PromptRecord, got {type(record).__name__}")


def check_lengths(
    records: Iterable[Record], tokenizer: Any, max_length: int, on_too_long: Literal["error", "skip", "keep"] = "error"
) -> list[Record]:
    """Count the records longer than `max_length` tokens (with the tokenizer's chat template) and report
    them: raise DataError ("error"), drop them ("skip") or keep them for the trainer to truncate ("keep");
    both of the latter print the count to stderr. Returns the records kept."""
    _choice("on_too_long", on_too_long, ("error", "skip", "keep"))
    records = list(records)
    lengths = [record_length(r, tokenizer) for r in records]
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if not too_long:
        return records
    examples = "; ".join(f"{records[i].source} ({lengths[i]} tokens)" for i in too_long[:3])
    message = (
        f"{len(too_long)} of {len(records)} records are longer than max_length={max_length} tokens "
        f"(longest {max(lengths)}; e.g. {examples})"
    )
    if on_too_long == "error":
        raise DataError(f"{message}; raise max_length, or drop them (on_too_long='skip') or keep them truncated ('keep')")
    if on_too_long == "skip":
        print(f"{message}: skipped", file=sys.stderr, flush=True)
        dropped = set(too_long)
        return [r for i, r in enumerate(records) if i not in dropped]
    print(f"{message}: kept; the trainer will cut them to {max_length} tokens", file=sys.stderr, flush=True)
    return records


# ---------------------------------------------------------------- align data check FILE (python -m align.data check FILE)

_KIND_OF_FORMAT = {**{f: "prefs" for f in PREFERENCE_FORMATS}, **{f: "sft" for f in SFT_FORMATS}, "prompt": "prompts"}
_RECORD_NAMES = {"prefs": "preference pairs", "sft": "SFT examples", "prompts": "prompts"}


def _guess_kind(source: Source, split: str | None) -> str:
    """The kind of data from the first row whose format can be told (preference data if none)."""
    for raw in itertools.islice(_open_source(source, split), 1000):
        try:
            return _KIND_OF_FORMAT[detect_format(raw.data, raw.where)]
        except DataError:
            continue
    return "prefs"


def _add_flag(parser: argparse.ArgumentParser, name: str, **options: Any) -> None:
    """`--name` as the recipes spell it (the one --help shows), with `--name-with-dashes` accepted too."""
    parser.add_argument(f"--{name}", dest=name, **options)
    if "_" in name:
        hidden = {k: v for k, v in options.items() if k not in ("default", "help")}
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **hidden)


@cli_main
def main(argv: list[str] | None = None, prog: str = "python -m align.data") -> None:
    parser = argparse.ArgumentParser(prog=prog, description="Check a data source: row count and format.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="read every row; print the counts and the detected format")
    check.add_argument("source", help="a file, a folder, hf:NAME[:SPLIT] or a built-in NAME:SPLIT")
    check.add_argument("--kind", choices=("prefs", "sft", "prompts"), help="default: from the first row's format")
    check.add_argument("--split", default=None)
    check.add_argument("--format", default="auto", choices=("auto",) + FORMATS)
    _add_flag(check, "on_bad_rows", default="error", choices=("error", "skip"), help="skip = count and report bad rows")
    check.add_argument("--pairs", default="all", choices=("all", "best_vs_each"))
    _add_flag(check, "extra_fields", default="error", choices=("error", "ignore"))
    args = parser.parse_args(argv)

    kind = args.kind or _guess_kind(args.source, args.split)
    stats = _LoadStats()
    for _ in _iter_records(
        kind, args.source, args.split, format=args.format, on_bad_rows=args.on_bad_rows, pairs=args.pairs,
        extra_fields=args.extra_fields, max_rows=None, stats=stats,
    ):
        pass
    skipped = sum(stats.skipped.values())
    print(
        f"{args.source}: {stats.records} {_RECORD_NAMES[kind]} from {stats.rows - skipped} rows "
        f"({skipped} skipped), format '{stats.format}'"
    )


if __name__ == "__main__":
    main()
