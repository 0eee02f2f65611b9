"""Loading: DataArgs, the loaders (load_preferences, load_sft, load_prompts and their iter_ forms) with bad-row
handling, and what follows loading (to_hf_dataset, record lengths, check_lengths)."""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal

from align.config import arg
from align.errors import AlignError, ConfigError, DataError
from align.log import MAIN_ONLY, get_logger
from align.records import Message, PreferencePair, PromptRecord, SFTExample
from align.data.formats import Kind, Record, KIND_FORMATS, convert_row, detect_format
from align.data.sources import Source, RawRow, open_source

logger = get_logger(__name__)


@dataclass
class DataArgs:
    train_data: str = arg("ifprefs:prefs_train", "training data: a file, a folder, hf:NAME[:SPLIT] or a built-in NAME:SPLIT")
    eval_data: str | None = arg("ifprefs:prefs_test", "evaluation data (same forms as train_data); none = no evaluation set")
    data_format: Literal["auto", "strings", "conversational", "hh", "ranked", "messages", "prompt_completion", "prompt", "ifeval"] = arg(
        "auto", "row format; auto = detected from the fields of the first row that loads"
    )
    on_bad_rows: Literal["error", "skip"] = arg("error", "a bad row stops loading with its file, line and field; skip = count and report them")
    ranked_pairs: Literal["all", "best_vs_each"] = arg("all", "pairs from ranked rows: every pair with different scores, or the best against each")
    extra_fields: Literal["error", "ignore"] = arg("error", "a field no format knows is an error, or is ignored")
    max_train_rows: int | None = arg(None, "use at most this many training records (pairs for ranked rows); none = all")
    train_rows_from: Literal["sample", "head"] = arg(
        "sample", "which records max_train_rows keeps: sample = a seeded random sample of all of train_data, in file order "
                  "(every task and topic of the file; reads it all), head = the first ones (reads only those)")
    max_eval_rows: int | None = arg(None, "use at most this many evaluation records; none = all")

    def validate(self) -> None:
        for name in ("max_train_rows", "max_eval_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"config: {name}: expected a positive number of rows or none, got {value}")


@dataclass
class LoadStats:
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
    kind: str, raw: RawRow, fmt_fixed: str | None, pairs: str, extra_fields: str, forced: bool
) -> tuple[str, list[Record]]:
    """(the row's format, its records); DataError naming the row when it is bad. A bad row that looks like
    another format than the one the source is read as (asked for with format=, or fixed by its first
    good row) says so."""
    if raw.error is not None:
        raise DataError(f"{raw.where}: {raw.error}")
    row = {k: v for k, v in raw.data.items() if v is not None} if isinstance(raw.data, dict) else raw.data
    fmt = fmt_fixed or detect_format(row, raw.where)
    try:
        return fmt, convert_row(kind, fmt, row, raw.where, pairs, extra_fields)
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
    rows: Iterator[RawRow], bad: RawRow, good_before: int, convert: Callable[[RawRow, str | None], str], fmt_fixed: str | None
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


def _report_skipped(source: Source, stats: LoadStats) -> None:
    name = "rows" if isinstance(source, (list, tuple)) else os.fspath(source)
    lines = [f"{name}: skipped {sum(stats.skipped.values())} of {stats.rows} rows read (on_bad_rows='skip'):"]
    for reason, count in stats.skipped.most_common():
        lines.append(f"  {count} x {reason} (first: {stats.first_skipped[reason]})")
    logger.warning("\n".join(lines), extra=MAIN_ONLY)  # every process of a run reads the same rows: said once


def iter_records(
    kind: Kind,
    source: Source,
    split: str | None = None,
    *,
    format: str = "auto",
    on_bad_rows: str = "error",
    pairs: str = "all",
    extra_fields: str = "error",
    max_rows: int | None = None,
    stats: LoadStats | None = None,
) -> Iterator[Any]:
    """Stream the records of `kind` from `source` (see the package docstring for sources, formats and options):
    format auto or a format of that kind; on_bad_rows error or skip; pairs (ranked rows) all or best_vs_each;
    extra_fields error or ignore; max_rows caps the records; `stats` is filled as rows are read."""
    _choice("format", format, ("auto",) + KIND_FORMATS[kind])
    _choice("on_bad_rows", on_bad_rows, ("error", "skip"))
    _choice("pairs", pairs, ("all", "best_vs_each"))
    _choice("extra_fields", extra_fields, ("error", "ignore"))
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ConfigError(f"max_rows={max_rows!r}: expected a positive integer or None")
    stats = LoadStats() if stats is None else stats
    fmt_fixed = None if format == "auto" else format

    def convert_only(raw: RawRow, fmt: str | None) -> str:
        return _convert_raw(kind, raw, fmt, pairs, extra_fields, format != "auto")[0]

    rows = open_source(source, split)
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


def iter_preferences(source: Source, split: str | None = None, **options: Any) -> Iterator[PreferencePair]:
    """Stream preference pairs from `source` (options: iter_records')."""
    return iter_records("prefs", source, split, **options)


def iter_sft(source: Source, split: str | None = None, **options: Any) -> Iterator[SFTExample]:
    """Stream SFT conversations from `source` (options: iter_records')."""
    return iter_records("sft", source, split, **options)


def iter_prompts(source: Source, split: str | None = None, **options: Any) -> Iterator[PromptRecord]:
    """Stream prompts for generation from eval, prompt-only, SFT or preference data (options: iter_records')."""
    return iter_records("prompts", source, split, **options)


def load_preferences(source: Source, split: str | None = None, **options: Any) -> list[PreferencePair]:
    """iter_preferences(source, split, **options) as a list (the same keyword options)."""
    return list(iter_preferences(source, split, **options))


def load_sft(source: Source, split: str | None = None, **options: Any) -> list[SFTExample]:
    """iter_sft(source, split, **options) as a list (the same keyword options)."""
    return list(iter_sft(source, split, **options))


def load_prompts(source: Source, split: str | None = None, **options: Any) -> list[PromptRecord]:
    """iter_prompts(source, split, **options) as a list (the same keyword options)."""
    return list(iter_prompts(source, split, **options))


# ---------------------------------------------------------------- after loading


def sample_records(records: list[Record], n: int, seed: int) -> list[Record]:
    """`n` of `records` drawn at random without replacement (seeded), kept in their original order.

    A short run that took the first rows of a file ordered by prompt would see few prompts: the head of
    `ifprefs:prefs_train` (256 pairs: 64 steps of 4) holds 33 of its 412 base prompts; a sample holds ~200.
    """
    if n >= len(records):
        return list(records)
    import random

    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


def load_train(loader: Callable[..., list[Record]], cfg: DataArgs, **options: Any) -> list[Record]:
    """cfg.train_data through `loader` (load_preferences, load_sft, load_prompts), cut to cfg.max_train_rows as
    cfg.train_rows_from says (a sample seeded by cfg.seed, or the head)."""
    sample = cfg.max_train_rows is not None and cfg.train_rows_from == "sample"
    records = loader(cfg.train_data, max_rows=None if sample else cfg.max_train_rows, **options)
    if sample and len(records) > cfg.max_train_rows:
        seed = getattr(cfg, "seed", 0)
        logger.info(f"data: a random sample of {cfg.max_train_rows} of the {len(records)} training records "
                    f"(--train_rows_from sample, seed {seed})", extra=MAIN_ONLY)
        records = sample_records(records, cfg.max_train_rows, seed)
    return records


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
    both of the latter log the count as a warning. Returns the records kept."""
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
        logger.warning(f"{message}: skipped", extra=MAIN_ONLY)  # the same on every process
        dropped = set(too_long)
        return [r for i, r in enumerate(records) if i not in dropped]
    logger.warning(f"{message}: kept; the trainer will cut them to {max_length} tokens", extra=MAIN_ONLY)
    return records


