"""The report's figures (matplotlib, Agg backend): reward against KL, training curves."""

from __future__ import annotations

import io
import math
from typing import Any
from align.report.results import EvalResult
from align.report.stats import metric_values, bootstrap_ci


# Training-curve panels, in this order where present (DPO via TRL, then our PPO); other numeric keys fill
# the remaining panels.
TRAINING_CURVE_KEYS = (
    "train/loss", "loss", "rewards/margins", "rewards/accuracies", "objective/scores", "objective/verifier",
    "objective/kl", "objective/rlhf_reward", "rollout/response_length", "ppo/approx_kl", "eval/loss", "eval_loss",
)
NOT_CURVES = {"step", "time_s", "epoch", "tokens_seen", "learning_rate", "grad_norm", "total_flos"}
MAX_CURVE_PANELS = 9


def _figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reward_vs_kl_points(results: list[EvalResult], mode: str, n_resamples: int, seed: int) -> list[dict[str, Any]]:
    """One point per run (and per evaluated checkpoint): mean KL k1, verifier score and RM score, with CIs."""
    points = []
    for result in results:
        for step, res in [*result.checkpoints, (None, result)]:
            rows = res.rows(mode)
            points.append({
                "run": result.name, "step": step, "eval_dir": str(res.eval_dir),
                **{key: bootstrap_ci(metric_values(rows, key), n_resamples=n_resamples, seed=seed) for key in ("kl_k1", "verifier_score", "rm_score")},
            })
    return points


def plot_reward_vs_kl(points: list[dict[str, Any]], mode: str) -> bytes | None:
    """Verifier score and RM score against KL(policy || reference); None when no point has a KL."""
    panels = [(k, label) for k, label in (("verifier_score", "verifier score"), ("rm_score", "reward-model score"))
              if any(p["kl_k1"]["mean"] is not None and p[k]["mean"] is not None for p in points)]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    runs = list(dict.fromkeys(p["run"] for p in points))
    for ax, (key, label) in zip(axes[0], panels):
        for i, run in enumerate(runs):
            pts = [p for p in points if p["run"] == run and p["kl_k1"]["mean"] is not None and p[key]["mean"] is not None]
            if not pts:
                continue
            xs = [p["kl_k1"]["mean"] for p in pts]
            ys = [p[key]["mean"] for p in pts]
            xerr = [[x - p["kl_k1"]["lo"] for x, p in zip(xs, pts)], [p["kl_k1"]["hi"] - x for x, p in zip(xs, pts)]]
            yerr = [[y - p[key]["lo"] for y, p in zip(ys, pts)], [p[key]["hi"] - y for y, p in zip(ys, pts)]]
            color = colors[i % len(colors)]
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="o-" if len(pts) > 1 else "o", color=color, label=run, capsize=3, ms=7)
            for x, y, p in zip(xs, ys, pts):
                if p["step"] is not None:
                    ax.annotate(f"step {p['step']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        ax.set_xlabel("KL(policy || reference), nats per reply (k1, sampled replies)")
        ax.set_ylabel(f"{label} ({mode})")
        ax.set_title(f"{label} vs KL")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _figure_png(fig)


def curve_keys(results: list[EvalResult]) -> list[str]:
    """The training-curve panels: known keys present in any run first, then other numeric keys."""
    present = []
    for r in results:
        for row in r.train_metrics:
            for k, v in row.items():
                if k not in present and k not in NOT_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool):
                    present.append(k)
    known = [k for k in TRAINING_CURVE_KEYS if k in present]
    rest = [k for k in present if k not in known]
    return (known + rest)[:MAX_CURVE_PANELS]


def plot_training_curves(results: list[EvalResult]) -> bytes | None:
    keys = curve_keys(results)
    if not keys:
        return None
    plt = _pyplot()
    cols = min(3, len(keys))
    rows_n = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.3 * cols, 3.0 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for r in results:
            pts = [(row["step"], row[key]) for row in r.train_metrics if isinstance(row.get(key), (int, float)) and "step" in row]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None, label=r.name)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    return _figure_png(fig)
