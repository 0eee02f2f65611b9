"""The report's statistics, pure: bootstrap intervals, paired differences, win rates, the
decision table and the reward-hacking checks."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import numpy as np
from align.report.results import EvalResult


# Generation metrics of the tables: (key in generations.jsonl, label, higher is better or None).
GENERATION_METRICS = (
    ("coherent_strict", "coherent strict", True),
    ("verifier_strict", "verifier strict", True),
    ("degenerate", "degenerate share", False),
    ("unasked_format", "format nobody asked for", False),  # align.evaluation.degeneration.unasked_formats
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


def metric_values(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) is not None]


def generation_table(rows: list[dict[str, Any]], n_resamples: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Every generation metric of one run and mode with its bootstrap CI (rows without the metric are left out)."""
    return {key: bootstrap_ci(metric_values(rows, key), n_resamples=n_resamples, seed=seed) for key, _, _ in GENERATION_METRICS}


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
    """align.evaluation.degeneration.hacking_warning for `run` against `baseline` (its start) on the prompts both
    answered: its training reward rose (metrics.jsonl) while coherent strict fell or the degenerate share rose."""
    from align.evaluation.degeneration import hacking_warning

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
    # coherent strict decides (strict AND not degenerate, align.evaluation.degeneration); the degenerate share sits
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
