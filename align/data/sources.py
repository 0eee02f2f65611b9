"""Reading rows from a source (files, compressed files, folders, hf: datasets, built-in NAME:SPLIT, in-memory lists)
with line-numbered errors; see align.data for the forms."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import itertools
import json
import lzma
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Union

from align.errors import AlignError, DataError
from align.data.formats import META_FIELDS

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
COMPRESSED_SUFFIXES = (".jsonl", ".json", ".csv")  # Parquet compresses inside the file
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
DEFAULT_HF_SPLIT = "train"


Source = Union[str, os.PathLike, list, tuple]


@dataclass
class RawRow:
    """One row as read from a source: its parsed value, or why it could not be read. `origin` is the file
    (or hf: dataset, or in-memory list) it came from, set by the reader of that origin."""

    where: str
    data: Any = None
    error: str | None = None
    origin: str = ""


def datasets_dir() -> Path:
    """Where built-in datasets live: $ALIGN_DATASETS_DIR, else `datasets/` next to the align package."""
    env = os.environ.get("ALIGN_DATASETS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "datasets"


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


def _parse_json_line(text: str, where: str, *, truncated: bool, json_suffix: bool) -> RawRow:
    try:
        return RawRow(where, data=_loads(text))
    except _JSONError as err:
        hint = "; the line looks truncated" if truncated else ""
        if json_suffix:
            hint += "; a .json file holds a list of rows or one JSON object per line"
        return RawRow(where, error=f"malformed JSON: {err}{hint}")


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    # Binary lines, decoded one at a time: a bad byte is reported at its line and memory stays flat.
    seen_content = False
    json_suffix = _file_type(path)[0] == ".json"
    for lineno, raw in _numbered_lines(path):
        where = f"{path} line {lineno}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            seen_content = True
            yield RawRow(where, error=_utf8_error(raw, err))
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


def _read_json(path: Path) -> Iterator[RawRow]:
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
        yield RawRow(f"{path} row {i}", data=row)


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


def _read_csv(path: Path) -> Iterator[RawRow]:
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
            yield RawRow(f"{path} row {rownum} (line {start})", error=f"broken CSV quoting: {err}")
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
            yield RawRow(where, error=bad[0])
        elif len(cells) != len(header):
            yield RawRow(where, error=f"expected {len(header)} columns ({', '.join(header)}), got {len(cells)}")
        else:
            try:
                decoded = RawRow(where, data=_decode_csv_cells(dict(zip(header, cells))))
            except DataError as err:
                decoded = RawRow(where, error=str(err))
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


def _read_parquet(path: Path) -> Iterator[RawRow]:
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
            yield RawRow(f"{path} row {rownum}", data=_from_columns(row))


def _read_hf(name: str, split: str) -> Iterator[RawRow]:
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
        yield RawRow(f"hf:{name}[{split}] row {i}", data=_from_columns(row), origin=f"hf:{name}[{split}]")


def _read_memory(rows: list | tuple) -> Iterator[RawRow]:
    if not rows:
        raise DataError("rows: no rows (an empty list)")
    for i, row in enumerate(rows):
        yield RawRow(f"rows[{i}]", data=row, origin="rows")


_READERS: dict[str, Callable[[Path], Iterator[RawRow]]] = {
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


def _read_path(path: Path, split: str | None) -> Iterator[RawRow]:
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


def _read_file(path: Path, reader: Callable[[Path], Iterator[RawRow]]) -> Iterator[RawRow]:
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


def open_source(source: Source, split: str | None) -> Iterator[RawRow]:
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


