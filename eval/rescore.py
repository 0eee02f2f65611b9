"""Re-score saved evaluations with the current degeneration check, paired against a baseline; no generation.

    python eval/rescore.py outputs/base/eval outputs/dpo/eval [more eval dirs ...]

When align.evaluation.degeneration gains a rule, replies already generated (generations.jsonl of eval/evaluate.py) can be
judged again in seconds: coherent strict, the degenerate share and the share of formats nobody asked for
(align.evaluation.degeneration.unasked_formats) of each run, greedy replies, with the paired
95% bootstrap interval of run - baseline over the same prompts (align.report.stats.paired_delta).
"""

import argparse
import json
import sys
from pathlib import Path

from align.errors import cli_main
from align.evaluation.metrics import judge_again
from align.io import read_jsonl
from align.report.stats import paired_delta


def rescored(eval_dir: str, mode: str) -> list[dict]:
    return judge_again([r for r in read_jsonl(Path(eval_dir) / "generations.jsonl") if r["mode"] == mode])


@cli_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("baseline", help="eval directory of the starting model")
    parser.add_argument("runs", nargs="+", help="eval directories to compare with it")
    parser.add_argument("--mode", default="greedy", choices=["greedy", "sample"])
    args = parser.parse_args()
    base = rescored(args.baseline, args.mode)
    for run in args.runs:
        rows = rescored(run, args.mode)
        out = {key: paired_delta(base, rows, key, 2000, 0) for key in ("coherent_strict", "verifier_strict", "degenerate", "unasked_format")}
        print(json.dumps({"run": run, "mode": args.mode, **{k: {m: round(v[m], 3) for m in ("baseline_mean", "run_mean", "mean", "lo", "hi")}
                                                             | {"n": v["n"]} for k, v in out.items()}}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
