"""Markdown tables of several evaluations against a start on the same prompts: the headline shares with paired 95%
intervals (greedy replies judged again by the current checks, as eval/rescore.py does), and constraints met by type.

    python tables.py START_EVAL name=EVAL [name=EVAL ...] > tables.md
"""
import json
import sys
from pathlib import Path

from align.evaluation.metrics import judge_again, pass_rates_by_constraint
from align.io import read_jsonl
from align.report.stats import paired_delta

KEYS = (("coherent_strict", "coherent strict"), ("verifier_strict", "IFEval strict"), ("degenerate", "degenerate"),
        ("unasked_format", "formats nobody asked for"), ("eos", "EOS"))


def greedy(eval_dir: str) -> list[dict]:
    rows = judge_again([r for r in read_jsonl(Path(eval_dir) / "generations.jsonl") if r["mode"] == "greedy"])
    return [{**r, "eos": float(r["eos"])} for r in rows]


start_dir, runs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
start = greedy(start_dir)
print(f"{len(start)} prompts, greedy. Paired 95% bootstrap intervals of run - start (2,000 resamples, seed 0).\n")
print("| policy | " + " | ".join(label for _, label in KEYS) + " |")
print("|---" * (len(KEYS) + 1) + "|")
print("| start | " + " | ".join(f"{sum(r[k] for r in start) / len(start):.3f}" for k, _ in KEYS) + " |")
rates = {"start": pass_rates_by_constraint(start)}
for name, run_dir in runs:
    rows = greedy(run_dir)
    cells = []
    for key, _ in KEYS:
        d = paired_delta(start, rows, key, 2000, 0)
        cells.append(f"{d['run_mean']:.3f} ({d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}])")
    print(f"| {name} | " + " | ".join(cells) + " |")
    rates[name] = pass_rates_by_constraint(rows)
print("\nConstraints met / asked, by type:\n")
print("| type | " + " | ".join(rates) + " |")
print("|---" * (len(rates) + 1) + "|")
for ctype in sorted(rates["start"], key=lambda t: -rates["start"][t]["total"]):
    print(f"| {ctype} | " + " | ".join(f"{r[ctype]['passed']}/{r[ctype]['total']}" for r in rates.values()) + " |")
