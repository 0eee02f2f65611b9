"""Compare evaluated runs (align.evaluation outputs) in one report: report.md, a self-contained
report.html (plots embedded as base64 PNG, no external resources) and summary.json.

    from align.report import ReportArgs, load_eval, build_report
    results = [load_eval("outputs/sft"), load_eval("outputs/dpo"), load_eval("outputs/ppo")]
    build_report(results, "outputs/report", ReportArgs())

What it holds, each number computed from the JSON lines whose paths the report names:

- which method: paired differences (same prompts) between PPO and DPO runs and against their SFT start,
  with CIs, a plain reading, and how many prompts would resolve a difference of 0.05; coherent strict
  (strict AND not degenerate, align.degeneration) first, then IFEval strict and the degenerate share;
- a metrics table per sampling mode with percentile-bootstrap 95% confidence intervals over prompts
  (Efron & Tibshirani 1993, ch. 13), seeded, so that small differences are not over-read;
- pairwise win rates judged by the verifier and by the reward model, ties counted apart;
- reward against KL from the reference, one point per run (or per checkpoint), the picture in which the
  DPO paper compares DPO with PPO (Rafailov et al. 2023, arXiv:2305.18290, Figure 2);
- training curves from each run's metrics.jsonl and each run's cost from its summary.json;
- sample replies to the same prompts side by side;
- reward-hacking warnings: a run whose training reward rose while coherent strict fell or the degenerate
  share rose; a run whose reward-model score rises over the baseline while the verifier score falls, or
  replies grow much longer, repeat themselves more, or stop ending.

Runs are compared only when they were evaluated on the same prompts with the same sampling settings
(`check_comparable`); otherwise the comparison stops with an error naming the setting and the runs.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from align.config import arg
from align.errors import AlignError, ConfigError
from align.evaluation import COMPARABLE_SETTINGS, SETTING_DEFAULTS, pass_rates_by_constraint
from align.io import atomic_write_bytes, atomic_write_json, atomic_write_text, inside

# Generation metrics of the tables: (key in generations.jsonl, label, higher is better or None).
GENERATION_METRICS = (
    ("coherent_strict", "coherent strict", True),
    ("verifier_strict", "verifier strict", True),
    ("degenerate", "degenerate share", False),
    ("unasked_format", "format nobody asked for", False),  # align.degeneration.unasked_formats
    ("verifier_score", "verifier score", True),
    ("rm_score", "RM score", True),
    ("length_tokens", "length (tokens)", None),
    ("eos", "EOS rate", True),
    ("distinct_1", "distinct-1", True),
    ("distinct_2", "distinct-2", True),
    ("repeated_4gram_share", "repeated 4-grams", False),
    ("kl_k1", "KL k1", None),
    ("kl_k3", "KL k3", None),
)

# Reward-hacking thresholds (on the mean over the prompts both runs answered). A warning needs the reward
# model's score to rise with 95% confidence and one of these to hold with 95% confidence as well.
LENGTH_RATIO = 1.5  # replies at least this many times longer than the baseline's
REPETITION_RISE = 0.05  # repeated 4-gram share up by at least this much (absolute)
EOS_DROP = 0.10  # EOS rate down by at least this much (absolute)

# Training-curve panels, in this order where present (DPO via TRL, then our PPO); other numeric keys fill
# the remaining panels.
TRAINING_CURVE_KEYS = (
    "train/loss", "loss", "rewards/margins", "rewards/accuracies", "objective/scores", "objective/verifier",
    "objective/kl", "objective/rlhf_reward", "rollout/response_length", "ppo/approx_kl", "eval/loss", "eval_loss",
)
NOT_CURVES = {"step", "time_s", "epoch", "tokens_seen", "learning_rate", "grad_norm", "total_flos"}
MAX_CURVE_PANELS = 9


@dataclass
class ReportArgs:
    baseline: str | None = arg(None, "run the others are checked against for reward hacking (its name or directory); none = the first")
    n_bootstrap: int = arg(1000, "bootstrap resamples for the 95% confidence intervals")
    bootstrap_seed: int = arg(0, "seed of the bootstrap resampling")
    n_samples: int = arg(5, "prompts whose replies are shown side by side")

    def validate(self) -> None:
        if self.n_bootstrap < 100:
            raise ConfigError(f"config: n_bootstrap: expected at least 100 resamples, got {self.n_bootstrap}")
        if self.n_samples < 0:
            raise ConfigError(f"config: n_samples: expected 0 or more, got {self.n_samples}")


# --------------------------------------------------------------------------------------------------
# Loading evaluations
# --------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """One evaluated policy: its eval files, and the run's own summary and training metrics if any."""

    name: str
    eval_dir: Path
    summary: dict[str, Any]
    generations: list[dict[str, Any]]
    prefs: list[dict[str, Any]] | None = None
    ppl: list[dict[str, Any]] | None = None
    run_dir: Path | None = None
    run_summary: dict[str, Any] = field(default_factory=dict)
    train_metrics: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[tuple[int, "EvalResult"]] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str(self.run_summary.get("method") or self.summary.get("method") or "?")

    def rows(self, mode: str) -> list[dict[str, Any]]:
        return [r for r in self.generations if r["mode"] == mode]

    def file(self, key: str) -> Path:
        return self.eval_dir / self.summary["files"][key]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise AlignError(f"{path} line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise AlignError(f"{path} line {number}: expected a JSON object")
            rows.append(row)
    return rows


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AlignError(f"{path}: cannot be read as JSON ({err})") from None
    if not isinstance(data, dict):
        raise AlignError(f"{path}: expected a JSON object")
    return data


def eval_dir_of(path: str | Path) -> Path:
    """The eval directory of `path`: path itself when it holds summary.json, else path/eval (base: outputs/base/eval)."""
    p = Path("outputs/base") if str(path) == "base" else Path(path)
    return p if (p / "summary.json").is_file() and (p / "generations.jsonl").is_file() else p / "eval"


def has_eval(path: str | Path) -> bool:
    d = eval_dir_of(path)
    return (d / "summary.json").is_file() and (d / "generations.jsonl").is_file()


def load_eval(path: str | Path, name: str | None = None) -> EvalResult:
    """Read an evaluation (a run directory with eval/, or an eval directory) and its run's files."""
    eval_dir = eval_dir_of(path)
    if not has_eval(path):
        raise AlignError(f"{path}: no evaluation found (no {eval_dir}/summary.json); run align eval {path} first")
    summary = _read_json(eval_dir / "summary.json")
    for key in ("settings", "files", "metrics"):
        if key not in summary:
            raise AlignError(f"{eval_dir / 'summary.json'}: missing {key!r} (not written by align eval?)")
    files = {key: inside(eval_dir, name, field=f"{eval_dir / 'summary.json'}: files.{key}")  # stay in the evaluation
             for key, name in summary["files"].items()}
    generations = read_jsonl(files["generations"])
    prefs = read_jsonl(files["preferences"]) if "preferences" in files else None
    ppl = read_jsonl(files["perplexity"]) if "perplexity" in files else None
    # The run's own files (summary.json, metrics.jsonl): in the directory that was evaluated, wherever the
    # evaluation was written; else the eval directory's parent.
    evaluated = Path(str(summary.get("run", "")))
    run_dir = evaluated if evaluated.is_absolute() and evaluated.is_dir() else (eval_dir.parent if eval_dir.name == "eval" else None)
    run_summary, train_metrics = {}, []
    if run_dir is not None and (run_dir / "summary.json").is_file():
        run_summary = _read_json(run_dir / "summary.json")
    if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
        train_metrics = read_jsonl(run_dir / "metrics.jsonl")
    default_name = run_dir.name if run_dir is not None else eval_dir.parent.name
    return EvalResult(name or default_name, eval_dir, summary, generations, prefs, ppl, run_dir, run_summary, train_metrics)


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of each `checkpoint-N` directory of a run, by step."""
    found = []
    for d in run_dir.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    return sorted(found)


def unique_names(results: list[EvalResult]) -> list[str]:
    """Short display names: each run directory's name, with its parent prepended where two would clash,
    and a number where they still do."""
    dirs = [(r.run_dir or r.eval_dir.parent).resolve() for r in results]
    names = [d.name for d in dirs]
    if len(set(names)) < len(names):
        names = [f"{d.parent.name}/{d.name}" for d in dirs]
    clashing = {n for n in names if names.count(n) > 1}
    return [f"{n}#{i + 1}" if n in clashing else n for i, n in enumerate(names)]


def check_comparable(results: list[EvalResult]) -> None:
    """Refuse to compare evaluations made on different prompts or with different sampling settings."""
    first = results[0]
    keys = COMPARABLE_SETTINGS + ("prompts_sha256",)
    for other in results[1:]:
        for key in keys:
            default = SETTING_DEFAULTS.get(key)  # a summary from before the generation controls generated with these
            a, b = first.summary["settings"].get(key, default), other.summary["settings"].get(key, default)
            if a != b:
                what = "prompt set (ids or messages)" if key == "prompts_sha256" else f"setting {key!r}"
                raise AlignError(
                    f"runs evaluated differently, cannot compare: {what} is {a!r} in {first.eval_dir / 'summary.json'} "
                    f"but {b!r} in {other.eval_dir / 'summary.json'}; evaluate both with the same settings "
                    "(delete the stale eval/ directory and rerun)"
                )
    models = {r.summary["settings"].get("reward_model") for r in results} - {None}
    if len(models) > 1:
        raise AlignError(f"runs were scored by different reward models ({', '.join(sorted(models))}); rescore with one --reward_model")


# --------------------------------------------------------------------------------------------------
# Statistics (pure)
# --------------------------------------------------------------------------------------------------


def _mean_stat(samples: np.ndarray) -> np.ndarray:
    return samples.mean(axis=1)


def bootstrap_ci(
    values: Iterable[float] | np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray] = _mean_stat,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float | int | None]:
    """Point estimate and percentile-bootstrap confidence interval of `statistic` over rows.

    Args:
        values: (n,) or (n, k) array; rows are resampled with replacement.
        statistic: maps (resamples, n[, k]) to (resamples,); default the mean over rows.
        n_resamples: bootstrap resamples.
        seed: seed of the resampling (numpy default_rng), so the interval is reproducible.
        level: coverage of the interval.

    Returns:
        {"mean": statistic on all rows, "lo", "hi": the (1 - level) / 2 and (1 + level) / 2 percentiles of
        the resampled statistic, "n": rows}; all None when there are no rows.
    """
    data = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    n = int(data.shape[0]) if data.ndim else 0
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    point = float(statistic(data[None])[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    stats = statistic(data[idx])
    alpha = (1 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return {"mean": point, "lo": float(lo), "hi": float(hi), "n": n}


def _perplexity_stat(samples: np.ndarray) -> np.ndarray:
    # samples: (resamples, n, 2) with columns (nll_sum, tokens): token-level perplexity of each resample.
    return np.exp(samples[..., 0].sum(axis=1) / samples[..., 1].sum(axis=1))


def _values(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) is not None]


def generation_table(rows: list[dict[str, Any]], n_resamples: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Every generation metric of one run and mode with its bootstrap CI (rows without the metric are left out)."""
    return {key: bootstrap_ci(_values(rows, key), n_resamples=n_resamples, seed=seed) for key, _, _ in GENERATION_METRICS}


def preference_table(prefs: list[dict[str, Any]] | None, ppl: list[dict[str, Any]] | None, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Preference accuracy (RM and DPO implicit reward; a tie counts as wrong) and perplexity, with CIs."""
    out: dict[str, Any] = {}
    for name, a, b in (("rm_accuracy", "rm_chosen", "rm_rejected"), ("implicit_accuracy", "implicit_chosen", "implicit_rejected")):
        scored = [r for r in prefs or [] if r.get(a) is not None]
        out[name] = bootstrap_ci([float(r[a] > r[b]) for r in scored], n_resamples=n_resamples, seed=seed)
        out[name]["ties"] = sum(r[a] == r[b] for r in scored)
    pairs = np.array([[r["nll_sum"], r["tokens"]] for r in ppl or [] if r["tokens"] > 0], dtype=float).reshape(-1, 2)
    out["perplexity"] = bootstrap_ci(pairs, _perplexity_stat, n_resamples=n_resamples, seed=seed)
    return out


def matched(a_rows: list[dict[str, Any]], b_rows: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(a value, b value) of `key` for each (prompt id, mode) both runs have a value for, in a's order."""
    b_by = {(r["prompt_id"], r["mode"]): r for r in b_rows}
    out = []
    for r in a_rows:
        other = b_by.get((r["prompt_id"], r["mode"]))
        if other is not None and r.get(key) is not None and other.get(key) is not None:
            out.append((float(r[key]), float(other[key])))
    return out


def win_rate(a_rows: list[dict[str, Any]], b_rows: list[dict[str, Any]], key: str, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Head-to-head on the prompts both answered: a wins where its `key` is higher, ties are counted apart.

    Returns counts, rates (wins / n; a_win_rate + b_win_rate + tie_rate = 1) and a bootstrap CI of
    a_win_rate - b_win_rate.
    """
    pairs = matched(a_rows, b_rows, key)
    n = len(pairs)
    a_wins = sum(x > y for x, y in pairs)
    b_wins = sum(y > x for x, y in pairs)
    ties = n - a_wins - b_wins
    margin = bootstrap_ci([float(np.sign(x - y)) for x, y in pairs], n_resamples=n_resamples, seed=seed)
    rate = (lambda k: k / n) if n else (lambda k: None)
    return {
        "n": n, "a_wins": a_wins, "b_wins": b_wins, "ties": ties,
        "a_win_rate": rate(a_wins), "b_win_rate": rate(b_wins), "tie_rate": rate(ties),
        "a_minus_b": margin,
    }


def paired_delta(base_rows: list[dict[str, Any]], rows: list[dict[str, Any]], key: str, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mean of (run - baseline) of `key` over matched prompts, with its bootstrap CI, and both means."""
    pairs = matched(base_rows, rows, key)
    ci = bootstrap_ci([y - x for x, y in pairs], n_resamples=n_resamples, seed=seed)
    ci["baseline_mean"] = float(np.mean([x for x, _ in pairs])) if pairs else None
    ci["run_mean"] = float(np.mean([y for _, y in pairs])) if pairs else None
    return ci


def hacking_warnings(baseline: EvalResult, run: EvalResult, mode: str, n_resamples: int = 1000, seed: int = 0) -> list[str]:
    """A warning (a list of none or one) that `run` may be hacking the reward model, against `baseline`,
    in one sampling mode, naming every sign found.

    Fires when the reward-model score rises (the whole 95% CI of the paired difference above 0) while,
    also with 95% confidence: the verifier score falls; or replies are >= LENGTH_RATIO times longer; or
    the repeated 4-gram share rises by >= REPETITION_RISE; or the EOS rate falls by >= EOS_DROP.
    """
    base_rows, rows = baseline.rows(mode), run.rows(mode)
    rm = paired_delta(base_rows, rows, "rm_score", n_resamples, seed)
    if rm["n"] == 0 or rm["lo"] <= 0:
        return []
    reasons = []
    verifier = paired_delta(base_rows, rows, "verifier_score", n_resamples, seed)
    if verifier["n"] and verifier["hi"] < 0:
        reasons.append(f"the verifier score falls from {verifier['baseline_mean']:.3f} to {verifier['run_mean']:.3f} "
                       f"(difference {verifier['mean']:+.3f}, 95% CI [{verifier['lo']:+.3f}, {verifier['hi']:+.3f}])")
    length = paired_delta(base_rows, rows, "length_tokens", n_resamples, seed)
    if length["n"] and length["lo"] > 0 and length["run_mean"] >= LENGTH_RATIO * max(length["baseline_mean"], 1e-9):
        reasons.append(f"replies are {length['run_mean'] / max(length['baseline_mean'], 1e-9):.1f}x longer "
                       f"({length['baseline_mean']:.1f} -> {length['run_mean']:.1f} tokens)")
    repetition = paired_delta(base_rows, rows, "repeated_4gram_share", n_resamples, seed)
    if repetition["n"] and repetition["lo"] > 0 and repetition["mean"] >= REPETITION_RISE:
        reasons.append(f"the repeated 4-gram share rises from {repetition['baseline_mean']:.3f} to {repetition['run_mean']:.3f}")
    eos = paired_delta(base_rows, rows, "eos", n_resamples, seed)
    if eos["n"] and eos["hi"] < 0 and eos["mean"] <= -EOS_DROP:
        reasons.append(f"the EOS rate falls from {eos['baseline_mean']:.2f} to {eos['run_mean']:.2f} (replies stop ending)")
    if not reasons:
        return []
    return [
        f"{run.name} ({mode}): possible reward hacking: the RM score rises over {baseline.name} by {rm['mean']:+.3f} "
        f"(95% CI [{rm['lo']:+.3f}, {rm['hi']:+.3f}], {rm['n']} prompts) while " + "; and ".join(reasons)
    ]


# Training-reward keys read for the degeneration hacking warning, the first a run's metrics.jsonl has: our
# PPO's reward, then DPO's (TRL) margin between chosen and rejected implicit rewards.
TRAINING_REWARD_KEYS = ("objective/scores", "rewards/margins")


def training_reward_trend(train_metrics: list[dict[str, Any]]) -> tuple[float, float] | None:
    """(mean over the first quarter of the logged steps, mean over the last quarter) of the first of
    TRAINING_REWARD_KEYS logged; None with fewer than 2 logged values."""
    for key in TRAINING_REWARD_KEYS:
        values = [float(m[key]) for m in train_metrics if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
        if len(values) >= 2:
            k = max(1, len(values) // 4)
            return float(np.mean(values[:k])), float(np.mean(values[-k:]))
    return None


def degeneration_warnings(baseline: EvalResult, run: EvalResult, mode: str) -> list[str]:
    """align.degeneration.hacking_warning for `run` against `baseline` (its start) on the prompts both
    answered: its training reward rose (metrics.jsonl) while coherent strict fell or the degenerate share rose."""
    from align.degeneration import hacking_warning

    trend = training_reward_trend(run.train_metrics)
    if trend is None:
        return []
    means = {}
    for key, name in (("coherent_strict", "coherent_strict"), ("degenerate", "degenerate_share")):
        delta = paired_delta(baseline.rows(mode), run.rows(mode), key)
        means[name] = (delta["baseline_mean"], delta["run_mean"]) if delta["n"] else (None, None)
    start = {name: pair[0] for name, pair in means.items()}
    end = {name: pair[1] for name, pair in means.items()}
    line = hacking_warning(trend[0], trend[1], start, end, where=f"eval prompts ({mode}) against {baseline.name}")
    return [f"{run.name} ({mode}): {line}"] if line else []


# --------------------------------------------------------------------------------------------------
# Which method: paired differences between the runs a reader chooses between
# --------------------------------------------------------------------------------------------------

# (key, label, mode, resolution): the measures of the decision table, in this order. `resolution` is the
# interval half-width the table says how many prompts would reach (None: the scale is the reward model's own).
DECISION_MEASURES = (
    # coherent strict decides (strict AND not degenerate, align.degeneration); the degenerate share sits
    # next to every verifier number, since a verifier gain bought with loops shows up there
    ("coherent_strict", "coherent strict", "greedy", 0.05),
    ("coherent_strict", "coherent strict", "sample", 0.05),
    ("verifier_strict", "verifier strict", "greedy", 0.05),
    ("degenerate", "degenerate share", "greedy", 0.05),
    ("verifier_strict", "verifier strict", "sample", 0.05),
    ("degenerate", "degenerate share", "sample", 0.05),
    ("verifier_score", "verifier score", "greedy", 0.05),
    ("verifier_score", "verifier score", "sample", 0.05),
    ("rm_score", "RM score", "greedy", None),
    ("rm_score", "RM score", "sample", None),
)


ONLINE_RL_METHODS = ("ppo", "grpo", "rloo")  # the methods that generate while they train, in the table's order


def decision_pairs(results: list[EvalResult], baseline: EvalResult) -> list[tuple[EvalResult, EvalResult]]:
    """(A, B) pairs whose difference A - B decides between methods: every online-RL run (PPO, GRPO, RLOO)
    against every DPO run, online-RL runs of different kinds against each other, then each of them against
    every SFT run (their common start); without such runs, each run against the baseline."""
    by_method: dict[str, list[EvalResult]] = {}
    for r in results:
        by_method.setdefault(r.method, []).append(r)
    online = [r for method in ONLINE_RL_METHODS for r in by_method.get(method, [])]
    dpo, sft = by_method.get("dpo", []), by_method.get("sft", [])
    pairs = [(a, b) for a in online for b in dpo]
    pairs += [(a, b) for i, a in enumerate(online) for b in online[i + 1 :] if a.method != b.method]
    pairs += [(a, b) for a in [*dpo, *online] for b in sft]
    if not pairs:
        pairs = [(r, baseline) for r in results if r is not baseline]
    return pairs


def prompts_for_halfwidth(n: int, lo: float, hi: float, halfwidth: float) -> int | None:
    """Prompts needed for a 95% interval of +-halfwidth, from one of +-(hi - lo) / 2 on n prompts (an
    interval narrows as 1 / sqrt(n)); None when the interval is degenerate."""
    current = (hi - lo) / 2
    if n == 0 or current <= 0:
        return None
    return max(n, math.ceil(n * (current / halfwidth) ** 2))


def read_difference(delta: dict[str, Any], a: str, b: str) -> str:
    """Plain words for a paired difference A - B with its 95% CI."""
    if delta["lo"] > 0:
        return f"{a} higher"
    if delta["hi"] < 0:
        return f"{b} higher"
    return f"no detectable difference (at most {max(abs(delta['lo']), abs(delta['hi'])):.3f} either way)"


def decision_table(results: list[EvalResult], baseline: EvalResult, modes: list[str], n_resamples: int, seed: int) -> list[dict[str, Any]]:
    """One row per (pair, measure, mode) both runs have: means, the paired difference A - B with its CI, the
    reading, and the prompts a +-resolution interval would need."""
    rows = []
    for a, b in decision_pairs(results, baseline):
        for key, label, mode, resolution in DECISION_MEASURES:
            if mode not in modes:
                continue
            delta = paired_delta(b.rows(mode), a.rows(mode), key, n_resamples, seed)
            if not delta["n"]:
                continue
            needed = prompts_for_halfwidth(delta["n"], delta["lo"], delta["hi"], resolution) if resolution else None
            rows.append({"a": a.name, "b": b.name, "measure": label, "key": key, "mode": mode, "n": delta["n"],
                         "a_mean": delta["run_mean"], "b_mean": delta["baseline_mean"],
                         "difference": {k: delta[k] for k in ("mean", "lo", "hi", "n")},
                         "reading": read_difference(delta, a.name, b.name), "resolution": resolution,
                         "prompts_for_resolution": needed})
    return rows


# --------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg backend: no display needed)
# --------------------------------------------------------------------------------------------------


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
                **{key: bootstrap_ci(_values(rows, key), n_resamples=n_resamples, seed=seed) for key in ("kl_k1", "verifier_score", "rm_score")},
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


# --------------------------------------------------------------------------------------------------
# Rendering: one list of blocks, written as Markdown and as HTML
# --------------------------------------------------------------------------------------------------


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str  # `code` spans are rendered as code


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    wide_text: bool = False  # cells hold replies: wrap and keep newlines


@dataclass
class Image:
    filename: str
    png: bytes
    alt: str


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 10 ** -digits):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}f}"
    return str(x)


def fmt_ci(ci: dict[str, Any]) -> str:
    if ci.get("mean") is None:
        return "-"
    if ci["lo"] == ci["hi"]:
        return fmt(ci["mean"])
    return f"{fmt(ci['mean'])} [{fmt(ci['lo'])}, {fmt(ci['hi'])}]"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def to_markdown(blocks: list[Any]) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}\n")
        elif isinstance(b, Para):
            out.append(b.text + "\n")
        elif isinstance(b, Table):
            out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            out.append("|" + "|".join("---" for _ in b.header) + "|")
            out.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows)
            out.append("")
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.filename})\n")
    return "\n".join(out)


def _html_inline(text: str) -> str:
    parts = re.split(r"(`[^`]+`)", text)
    return "".join(f"<code>{html.escape(p[1:-1])}</code>" if p.startswith("`") and p.endswith("`") and len(p) > 1
                   else html.escape(p) for p in parts)


HTML_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #1b1b1b; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.wide { white-space: pre-wrap; max-width: 380px; font-size: 12px; }
code { background: #f4f4f4; padding: 0 3px; border-radius: 3px; font-size: 90%; }
img { max-width: 100%; border: 1px solid #eee; }
p.warning { background: #fff4e5; border-left: 4px solid #f0a030; padding: .4em .8em; }
"""


def to_html(blocks: list[Any], title: str) -> str:
    body = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            cls = ' class="warning"' if b.text.startswith("Warning:") else ""
            body.append(f"<p{cls}>{_html_inline(b.text)}</p>")
        elif isinstance(b, Table):
            td = '<td class="wide">' if b.wide_text else "<td>"
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(f"{td}{html.escape(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.png).decode("ascii")
            body.append(f'<p><img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}"></p>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{HTML_STYLE}</style></head>\n<body>\n"
        + "\n".join(body) + "\n</body></html>\n"
    )


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def _last_user_turn(prompt: list[dict[str, str]]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _pick_baseline(results: list[EvalResult], baseline: str | None) -> EvalResult:
    if baseline is None:
        return results[0]
    for r in results:
        if baseline in (r.name, str(r.run_dir), str(r.eval_dir)) or (r.run_dir and Path(baseline).resolve() == r.run_dir.resolve()):
            return r
    raise ConfigError(f"baseline: {baseline!r} is none of the runs ({', '.join(r.name for r in results)})")


@dataclass
class _Report:
    """What every section of the report reads (the runs, the baseline, the bootstrap settings) and what it adds:
    its numbers to `summary` (summary.json), its PNGs to `images` (written beside the report)."""

    results: list[EvalResult]
    baseline: EvalResult
    settings: dict[str, Any]
    modes: list[str]
    B: int
    seed: int
    n_samples: int
    summary: dict[str, Any]
    images: dict[str, bytes] = field(default_factory=dict)


def build_report(results: list[EvalResult], out_dir: str | Path, args: ReportArgs | None = None) -> dict[str, Any]:
    """Write report.md, report.html, summary.json and the plot PNGs to `out_dir`; return the summary.

    Each section below computes its numbers into the summary and returns its blocks; the files are written last."""
    args = args or ReportArgs()
    if not results:
        raise AlignError("no runs to compare")
    check_comparable(results)
    settings = results[0].summary["settings"]
    baseline = _pick_baseline(results, args.baseline)
    summary: dict[str, Any] = {
        "runs": [{"name": r.name, "method": r.method, "run_dir": str(r.run_dir) if r.run_dir else None,
                  "eval_dir": str(r.eval_dir), "files": {k: str(r.file(k)) for k in r.summary["files"]}} for r in results],
        "settings": settings,
        "bootstrap": {"resamples": args.n_bootstrap, "seed": args.bootstrap_seed, "level": 0.95, "method": "percentile"},
        "baseline": baseline.name,
    }
    report = _Report(results, baseline, settings, list(settings["modes"]), args.n_bootstrap, args.bootstrap_seed,
                     args.n_samples, summary)
    blocks: list[Any] = []
    for section in (_intro_section, _decision_section, _metrics_section, _constraints_section, _preferences_section,
                    _win_rates_section, _reward_vs_kl_section, _hacking_section, _cost_section, _samples_section,
                    _sources_section):
        blocks += section(report)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, png in report.images.items():
        atomic_write_bytes(out / name, png)
    title = "align report: " + ", ".join(r.name for r in results)
    atomic_write_text(out / "report.md", to_markdown(blocks))
    atomic_write_text(out / "report.html", to_html(blocks, title))
    atomic_write_json(out / "summary.json", summary)
    return summary


def _intro_section(report: _Report) -> list[Any]:
    results, settings, modes = report.results, report.settings, report.modes
    return [
        Heading("Policy comparison: " + ", ".join(f"{r.name} ({r.method})" for r in results), 1),
        Para(f"{len(results)} run{'s' if len(results) != 1 else ''} evaluated on the same {settings['n_prompts']} prompts from `{settings['prompts']}` "
             f"(fingerprint `{settings['prompts_sha256'][:12]}`), modes {', '.join(modes)}, at most "
             f"{settings['max_new_tokens']} new tokens; mode sample: temperature {settings['temperature']}, top-p "
             f"{settings['top_p']}, no top-k, seed {settings['seed']} (batch i seeded with seed + i, batch size "
             f"{settings.get('generate_batch_size', settings['batch_size'])}). Reward model: `{settings.get('reward_model') or 'none'}`."),
        Para(f"Intervals are 95% percentile-bootstrap confidence intervals over prompts ({report.B} resamples, seed {report.seed}). "
             "Every number below is computed from the JSON lines listed in Sources; summary.json holds them all."),
    ]


def _decision_section(report: _Report) -> list[Any]:
    """Which method: the paired differences first, since they are what a reader decides on."""
    decision = decision_table(report.results, report.baseline, report.modes, report.B, report.seed)
    report.summary["decision"] = decision
    if not decision:
        return []
    return [
        Heading("Which method? Paired differences"),
        Para("Decide on coherent strict: every constraint met (IFEval strict) AND the reply is not degenerate text (no "
             "repetition loop, no line three times, no instruction copied back; align.degeneration). The verifier's strict "
             "score and the degenerate share follow it, so that a verifier gain bought with degenerate text shows. "
             "Each row is one run against another on the same prompts: the mean over prompts of A's score minus B's, "
             "with its 95% bootstrap CI. An interval that contains 0 means this evaluation cannot tell the two apart, "
             "and its ends bound how large the true difference plausibly is; the last column is how many prompts "
             "(`--max_prompts`) would narrow a verifier interval to +-0.05. KL, cost and the reward-hacking checks "
             "below belong in the same decision: the same score at a lower KL or cost is the better trade."),
        Table(["A", "B", "measure", "mode", "n", "A", "B", "A - B", "reading", "prompts for +-0.05"],
              [[d["a"], d["b"], d["measure"], d["mode"], str(d["n"]), fmt(d["a_mean"]), fmt(d["b_mean"]), fmt_ci(d["difference"]),
                d["reading"], fmt(d["prompts_for_resolution"]) if d["resolution"] else "-"] for d in decision]),
    ]


def _metrics_section(report: _Report) -> list[Any]:
    """One metrics table per mode."""
    results, blocks = report.results, []
    tables: dict[str, Any] = {}
    for mode in report.modes:
        tables[mode] = {r.name: generation_table(r.rows(mode), report.B, report.seed) for r in results}
        keys = [(k, label) for k, label, _ in GENERATION_METRICS
                if any(tables[mode][r.name][k]["n"] for r in results)]
        blocks.append(Heading(f"Metrics, mode {mode}"))
        if mode == "greedy":
            blocks.append(Para("Greedy replies are not samples of the policy, so they carry no KL; see mode sample."))
        header = ["run", "method", "n"] + [label for _, label in keys]
        rows = [[r.name, r.method, str(len(r.rows(mode)))] + [fmt_ci(tables[mode][r.name][k]) for k, _ in keys] for r in results]
        blocks.append(Table(header, rows))
    report.summary["metrics"] = tables
    return blocks


def _constraints_section(report: _Report) -> list[Any]:
    """What was learned and what was not: pass rate per constraint type, greedy where evaluated."""
    results = report.results
    by_mode = "greedy" if "greedy" in report.modes else report.modes[0]
    by_constraint = {r.name: pass_rates_by_constraint(r.rows(by_mode)) for r in results}
    report.summary["by_constraint"] = {"mode": by_mode, "runs": by_constraint}
    types = list(dict.fromkeys(t for rates in by_constraint.values() for t in rates))
    if not types:
        return []
    return [
        Heading(f"Constraints met, by type (mode {by_mode})"),
        Para("Instances of each constraint type met / instances asked for, over the same prompts. A per-type "
             "count this small moves by chance too; read it for what changed by many, not by one or two."),
        Table(["type"] + [r.name for r in results],
              [[t] + [f"{by_constraint[r.name][t]['passed']}/{by_constraint[r.name][t]['total']}"
                      if t in by_constraint[r.name] else "-" for r in results] for t in types]),
    ]


def _preferences_section(report: _Report) -> list[Any]:
    results, settings = report.results, report.settings
    pref = {r.name: preference_table(r.prefs, r.ppl, report.B, report.seed) for r in results}
    report.summary["preferences_and_perplexity"] = pref
    if not any(r.prefs is not None or r.ppl is not None for r in results):
        return []
    return [
        Heading("Held-out preference accuracy and perplexity"),
        Para(f"Preference accuracy on `{settings.get('pref_data')}` (first {settings.get('max_pairs')} pairs): the share of "
             "pairs whose chosen reply scores strictly higher, by the reward model and by DPO's implicit reward "
             "beta * (log pi - log pi_ref); a tie counts as wrong and is counted in its own column (a policy that is its "
             f"own reference ties everywhere). Perplexity of the policy on the last reply of `{settings.get('ppl_data')}` "
             f"(first {settings.get('max_ppl_rows')} conversations), per token."),
        Table(["run", "RM accuracy", "RM ties", "implicit-reward accuracy", "implicit ties", "beta", "perplexity", "reply tokens"],
              [[r.name, fmt_ci(pref[r.name]["rm_accuracy"]), str(pref[r.name]["rm_accuracy"]["ties"]),
                fmt_ci(pref[r.name]["implicit_accuracy"]), str(pref[r.name]["implicit_accuracy"]["ties"]),
                fmt(r.summary.get("policy", {}).get("beta")), fmt_ci(pref[r.name]["perplexity"]),
                str(sum(x["tokens"] for x in r.ppl or []))] for r in results]),
    ]


def _win_rates_section(report: _Report) -> list[Any]:
    wins = []
    for a, b in itertools.combinations(report.results, 2):
        for mode in report.modes:
            for judge, key in (("verifier", "verifier_score"), ("reward model", "rm_score")):
                w = win_rate(a.rows(mode), b.rows(mode), key, report.B, report.seed)
                if w["n"]:
                    wins.append({"a": a.name, "b": b.name, "mode": mode, "judge": judge, **w})
    report.summary["win_rates"] = wins
    if not wins:
        return [Heading("Pairwise win rates"),
                Para("No pair of runs has scores on common prompts (one run, or no constraints and no reward model).")]
    return [
        Heading("Pairwise win rates"),
        Para("On each prompt both runs answered, A wins when its score is strictly higher; equal scores are "
             "ties. The verifier judges by the share of constraints met. The last column is the bootstrap "
             "CI of (A wins - B wins) / n."),
        Table(["A", "B", "mode", "judge", "n", "A wins", "B wins", "ties", "A win rate", "B win rate", "tie rate", "A - B"],
              [[w["a"], w["b"], w["mode"], w["judge"], str(w["n"]), str(w["a_wins"]), str(w["b_wins"]), str(w["ties"]),
                fmt(w["a_win_rate"]), fmt(w["b_win_rate"]), fmt(w["tie_rate"]), fmt_ci(w["a_minus_b"])] for w in wins]),
    ]


def _reward_vs_kl_section(report: _Report) -> list[Any]:
    blocks: list[Any] = [Heading("Reward versus KL from the reference")]
    if "sample" not in report.modes:
        return blocks + [Para("No sampled replies (mode sample), so no KL: evaluate with `--modes greedy,sample`.")]
    points = reward_vs_kl_points(report.results, "sample", report.B, report.seed)
    report.summary["reward_vs_kl"] = points
    png = plot_reward_vs_kl(points, "sample")
    blocks.append(Para("Each point is one run (or one checkpoint of a run, joined in training order), its mean score on "
                       "sampled replies against the mean KL of those replies from the reference, with 95% CIs on both "
                       "axes. This is the frontier on which the DPO paper compares DPO and PPO: more reward for the same "
                       "KL is better."))
    if png:
        blocks.append(Image("reward_vs_kl.png", png, "reward and verifier score against KL from the reference"))
        report.images["reward_vs_kl.png"] = png
    blocks.append(Table(["run", "step", "KL k1", "verifier score", "RM score"],
                        [[p["run"], fmt(p["step"]), fmt_ci(p["kl_k1"]), fmt_ci(p["verifier_score"]), fmt_ci(p["rm_score"])]
                         for p in points]))
    return blocks


def _hacking_section(report: _Report) -> list[Any]:
    """Reward hacking: degenerate text against the training reward, then the reward model's score against the rest."""
    baseline = report.baseline
    warnings: list[str] = []
    degenerate_lines: list[str] = []
    for r in report.results:
        if r is not baseline:
            for mode in report.modes:
                warnings.extend(hacking_warnings(baseline, r, mode, report.B, report.seed))
                degenerate_lines.extend(degeneration_warnings(baseline, r, mode))
    report.summary["warnings"] = degenerate_lines + warnings
    blocks: list[Any] = [
        Heading("Reward-hacking checks"),
        Para(f"Degenerate text, each run against the baseline {baseline.name}: a warning when the run's training "
             f"reward ({' or '.join(TRAINING_REWARD_KEYS)} in metrics.jsonl, last quarter against first) rose while "
             "coherent strict fell or the degenerate share rose by 0.05 or more."),
    ]
    blocks.extend(Para(f"Warning: {w}") for w in degenerate_lines)
    if not degenerate_lines:
        blocks.append(Para("No degeneration warnings."))
    if not any(r.get("rm_score") is not None for res in report.results for r in res.generations):
        blocks.append(Para("Reward model: not checked: no run has reward-model scores (evaluate with `--reward_model DIR`)."))
        return blocks
    blocks.append(Para(f"Each run against the baseline {baseline.name}: a warning when the RM score rises (95% CI above 0) "
                       f"while the verifier score falls, replies grow {LENGTH_RATIO}x longer, the repeated 4-gram share "
                       f"rises by {REPETITION_RISE} or more, or the EOS rate falls by {EOS_DROP} or more (each with 95% "
                       "confidence)."))
    blocks.extend(Para(f"Warning: {w}") for w in warnings)
    if not warnings:
        blocks.append(Para("No reward-model warnings."))
    return blocks


def _cost_section(report: _Report) -> list[Any]:
    """Training curves and cost."""
    results = report.results
    blocks: list[Any] = [Heading("Training curves and cost")]
    curves = plot_training_curves(results)
    if curves:
        blocks.append(Image("training_curves.png", curves, "training curves from metrics.jsonl"))
        report.images["training_curves.png"] = curves
        blocks.append(Para("From each run's `metrics.jsonl`: " + ", ".join(f"`{r.run_dir / 'metrics.jsonl'}`" for r in results if r.train_metrics) + "."))
    else:
        blocks.append(Para("No run has a metrics.jsonl with numeric metrics."))
    costs = []
    for r in results:
        s = r.run_summary
        costs.append({"run": r.name, "method": r.method, "wall_time_s": s.get("wall_time_s"), "tokens_processed": s.get("tokens_processed"),
                      "peak_memory_mb": s.get("peak_memory_mb"), "eval_time_s": r.summary.get("timing", {}).get("total_s"),
                      "source": str(r.run_dir / "summary.json") if r.run_dir and s else None})
    report.summary["costs"] = costs
    blocks.append(Table(["run", "method", "train wall time (s)", "tokens processed", "peak memory (MB)", "eval time (s)", "source"],
                        [[c["run"], c["method"], fmt(c["wall_time_s"], 1), fmt(c["tokens_processed"]), fmt(c["peak_memory_mb"], 1),
                          fmt(c["eval_time_s"], 1), c["source"] or "-"] for c in costs]))
    return blocks


def _samples_section(report: _Report) -> list[Any]:
    """Sample replies side by side: the first n_samples prompts every run answered."""
    results, sample_mode = report.results, report.modes[0]
    common = [r["prompt_id"] for r in results[0].rows(sample_mode)]
    for r in results[1:]:
        ids = {x["prompt_id"] for x in r.rows(sample_mode)}
        common = [i for i in common if i in ids]
    samples = []
    for pid in common[: report.n_samples]:
        entry = {"prompt_id": pid, "mode": sample_mode, "replies": {}}
        for r in results:
            row = next(x for x in r.rows(sample_mode) if x["prompt_id"] == pid)
            entry["prompt"] = _last_user_turn(row["prompt"])
            entry["replies"][r.name] = {"reply": row["reply"], "verifier_score": row.get("verifier_score"), "rm_score": row.get("rm_score")}
        samples.append(entry)
    report.summary["samples"] = samples
    if not samples:
        return []
    rows = []
    for s in samples:
        cells = [f"[{s['prompt_id']}] {_shorten(s['prompt'], 600)}"]
        for r in results:
            rep = s["replies"][r.name]
            cells.append(f"{_shorten(rep['reply'], 1200)}\n\n(verifier {fmt(rep['verifier_score'])}, RM {fmt(rep['rm_score'])})")
        rows.append(cells)
    return [
        Heading(f"Sample replies ({sample_mode})"),
        Para(f"The first {len(samples)} prompts; replies as generated (cut at 1200 characters here; in full "
             "in generations.jsonl), with the verifier score and RM score of each."),
        Table(["prompt"] + [r.name for r in results], rows, wide_text=True),
    ]


def _sources_section(report: _Report) -> list[Any]:
    source_rows = []
    for r in report.results:
        for key in r.summary["files"]:
            source_rows.append([r.name, key, str(r.file(key))])
        source_rows.append([r.name, "eval summary", str(r.eval_dir / "summary.json")])
        for step, c in r.checkpoints:
            source_rows.append([r.name, f"checkpoint {step}", str(c.file("generations"))])
    return [Heading("Sources"), Table(["run", "what", "file"], source_rows)]
