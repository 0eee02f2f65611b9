"""`align data check FILE` (`python -m align.data check FILE`): row count and detected format, or the first bad row."""

from __future__ import annotations

import argparse
import itertools
from typing import Any

from align.errors import DataError, cli_main
from align.data.formats import FORMATS, PREFERENCE_FORMATS, SFT_FORMATS, detect_format
from align.data.load import LoadStats, iter_records
from align.data.sources import Source, open_source


_KIND_OF_FORMAT = {**{f: "prefs" for f in PREFERENCE_FORMATS}, **{f: "sft" for f in SFT_FORMATS}, "prompt": "prompts", "ifeval": "prompts"}
_RECORD_NAMES = {"prefs": "preference pairs", "sft": "SFT examples", "prompts": "prompts"}


def _guess_kind(source: Source, split: str | None) -> str:
    """The kind of data from the first row whose format can be told (preference data if none)."""
    for raw in itertools.islice(open_source(source, split), 1000):
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
    stats = LoadStats()
    for _ in iter_records(
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
