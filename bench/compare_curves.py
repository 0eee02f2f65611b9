"""Several learning curves of bench/learning_curve.py side by side, against training seconds.

    python bench/compare_curves.py --out docs/curves.png --budget_seconds 600 \
        "1 pair a step=curves/b1/learning_curve.json" "4 pairs a step=curves/b4/learning_curve.json"

For each NAME=learning_curve.json: a table row per checkpoint (step, training seconds, coherent strict as the
paired difference from the starting model with its 95% interval, degenerate share, EOS rate), printed as
markdown; and one plot of coherent strict (run mean, interval shaded) against training seconds, every curve on
the same axes, with a dashed line at --budget_seconds (e.g. the training a recipe fits in its wall-time budget).
The curves must share their evaluation (prompts, decoding) and their CPU so that their points compare; a mismatch
is an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from learning_curve import band, save_figure  # noqa: E402

from align.errors import ConfigError, cli_main  # noqa: E402


def load_curves(specs: list[str]) -> dict[str, dict]:
    """NAME=PATH pairs -> {name: learning_curve.json}, checked to share their evaluation."""
    curves = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"expected NAME=PATH to a learning_curve.json, got {spec!r}")
        if not Path(path).is_file():
            raise ConfigError(f"{path}: no such file (curve {name!r})")
        curves[name] = json.loads(Path(path).read_text())
    evaluations = {(c["eval_prompts"], c["decoding"]) for c in curves.values()}
    if len(evaluations) > 1:
        raise ConfigError(f"the curves were evaluated differently ({sorted(evaluations)}): their points do not compare")
    cpus = {c["cpu"] for c in curves.values()}
    if len(cpus) > 1:
        raise ConfigError(f"the curves ran on different CPUs ({sorted(cpus)}): their training seconds do not compare")
    return curves


def _delta(metric: dict) -> str:
    return f"{metric['run_mean']:.3f} ({metric['mean']:+.3f} [{metric['lo']:+.3f}, {metric['hi']:+.3f}])"


def table(curves: dict[str, dict]) -> str:
    """Markdown: one row per checkpoint of every curve."""
    lines = ["| curve | step | training s | coherent strict | degenerate | EOS |", "|---|---:|---:|---|---|---|"]
    for name, curve in curves.items():
        for p in curve["points"]:
            m = p["metrics"]
            lines.append(f"| {name} | {p['step']} | {p['train_seconds']:.0f} | {_delta(m['coherent_strict'])} | "
                         f"{m['degenerate']['run_mean']:.3f} | {m['eos']['run_mean']:.3f} |")
    return "\n".join(lines)


def plot(curves: dict[str, dict], path: Path, budget_seconds: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        xs = [0] + [p["train_seconds"] for p in curve["points"]]
        ys, lo, hi = band(curve["points"], "coherent_strict")
        ax.plot(xs, ys, marker="o", label=name)
        ax.fill_between(xs, lo, hi, alpha=0.15)
    if budget_seconds:
        ax.axvline(budget_seconds, linestyle="--", color="grey", label=f"{budget_seconds:g} s")
    first = next(iter(curves.values()))
    ax.set_xlabel("training seconds")
    ax.set_ylabel("coherent strict")
    ax.set_title(f"coherent strict, {first['eval_prompts']} held-out prompts ({first['decoding']}), 95% paired intervals\n"
                 f"{first['cpu']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


@cli_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("curves", nargs="+", help="NAME=path/to/learning_curve.json")
    parser.add_argument("--out", required=True, help="the plot to write (.png)")
    parser.add_argument("--budget_seconds", type=float, default=None, help="draw a dashed line at this many training seconds")
    args = parser.parse_args()
    curves = load_curves(args.curves)
    print(table(curves))
    plot(curves, Path(args.out), args.budget_seconds)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
