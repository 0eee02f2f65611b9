"""Phase 5 of a PPO update: the update's metrics, reduced over processes, and the health checks on the run so far.

Every process reaches the same verdicts: the metrics are sums reduced over processes, then divided.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from align.errors import AlignError
from align.ops.kl import token_kl
from align.ops.masked import explained_variance_from_sums, explained_variance_sums, masked_mean
from align.rl.ppo.config import PPOArgs
from align.rl.ppo.dist import Dist
from align.rl.ppo.rollout import Rollout


class HealthStop(AlignError):
    """A health check crossed its threshold under --stop_on_health."""



def rollout_metrics(rollout: Rollout, cfg: PPOArgs, kl_coef: float, dist: Dist) -> dict[str, float]:
    """Per-response statistics averaged over every process's responses (sums reduced, then divided), and
    "perf/new_tokens": the prompt and response tokens of this rollout over all processes."""
    mask = rollout.response_mask
    lengths = mask.sum(-1).float()
    kl = token_kl(rollout.old_logprobs, rollout.ref_logprobs, mask, "k1").sum(-1)
    penalty = -kl_coef * token_kl(rollout.old_logprobs, rollout.ref_logprobs, mask, cfg.kl_estimator).sum(-1)
    per_row = {
        "objective/kl": kl,  # sum over the response of log p - log p_ref (k1), per response
        "objective/non_score_reward": penalty,
        "objective/scores": rollout.raw_scores,
        "objective/rlhf_reward": rollout.scores + penalty,
        "rollout/response_length": lengths,
        "rollout/eos_rate": rollout.contains_eos.float(),
        "rollout/length_saturation": (lengths >= cfg.response_length).float(),
        "values/mean": masked_mean(rollout.old_values, mask, dim=-1),
    }
    if rollout.verifier is not None:
        per_row["objective/verifier"] = rollout.verifier
    per_row["objective/kl_sq"] = kl.square()  # for the standard error of the mean KL (popped below)
    keys = list(per_row)
    local = [float(per_row[k].double().sum()) for k in keys]
    local += [float(len(rollout)), float(rollout.entropy[mask].double().sum()), float(mask.sum()), float(rollout.query_mask.sum())]
    if rollout.returns is not None:  # the critic's explained variance over every process's tokens
        local += explained_variance_sums(rollout.old_values, rollout.returns, mask)
    totals = dist.sum(torch.tensor(local, dtype=torch.float64)).tolist()
    rows, entropy_sum, response_tokens, prompt_tokens = totals[len(keys) : len(keys) + 4]
    explained = explained_variance_from_sums(*totals[len(keys) + 4 :]) if rollout.returns is not None else math.nan
    metrics = {k: totals[i] / rows for i, k in enumerate(keys)}
    kl_variance = max(metrics.pop("objective/kl_sq") - metrics["objective/kl"] ** 2, 0.0) * rows / max(rows - 1, 1)
    metrics["objective/kl_stderr"] = (kl_variance / rows) ** 0.5  # over responses: k1 sums are noisy, can be < 0
    metrics["objective/entropy"] = entropy_sum / response_tokens
    metrics["objective/beta"] = kl_coef
    metrics["perf/new_tokens"] = response_tokens + prompt_tokens
    if not math.isnan(explained):
        metrics["values/explained_variance"] = explained
    if cfg.samples_per_prompt > 1:  # prompts whose samples all scored alike: after the baseline their scores teach nothing
        groups = dist.gather_rows(rollout.scores).reshape(-1, cfg.samples_per_prompt)
        metrics["rollout/groups_without_spread"] = float((groups == groups[:, :1]).all(-1).double().mean())
    return metrics


def mean_of(rows: Sequence[dict[str, float]], key: str) -> float | None:
    """Mean of `key` over the rows that have a finite value for it; None when none has."""
    values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
    return sum(values) / len(values) if values else None


def _trend(history: list[dict[str, float]], key: str, window: int) -> float | None:
    """Mean of `key` over the second half of the last `window` updates minus its mean over the first half."""
    if len(history) < window:
        return None
    half = window // 2
    early, late = mean_of(history[-window:-half], key), mean_of(history[-half:], key)
    return None if early is None or late is None else late - early


def health_checks(history: list[dict[str, float]], cfg: PPOArgs, reward_is_verifier: bool) -> list[str]:
    """Warnings (one line each) about the latest update, `history[-1]`, given the run so far.

    EOS and length are compared with the start of the run (the first health_window / 2 updates), so a base
    model that rarely finishes within response_length is not flagged for what it always did.
    """
    metrics, warnings = history[-1], []
    kl = metrics["objective/kl"]
    # k1 is an unbiased estimate of a KL >= 0, but one response's sum can be well below 0: a mean under the
    # threshold is flagged only when it is also more than two standard errors below 0
    if kl < cfg.health_min_kl and kl + 2 * metrics.get("objective/kl_stderr", 0.0) < 0:
        warnings.append(f"negative mean KL {kl:.4f} (standard error {metrics.get('objective/kl_stderr', 0.0):.4f}): the rollout "
                        "log-probs are not those of the sampling distribution (a top-k/top-p/temperature mismatch or dropout?)")
    if kl > cfg.health_kl_budget:
        warnings.append(f"mean KL {kl:.3f} nats beyond the budget {cfg.health_kl_budget}: the policy is drifting far from the reference")
    if metrics["ppo/ratio_max"] > cfg.health_max_ratio:
        warnings.append(f"ratio explosion: max PPO ratio {metrics['ppo/ratio_max']:.2f} > {cfg.health_max_ratio}")
    window, half = cfg.health_window, cfg.health_window // 2
    if len(history) >= 2 * half:
        start, recent = history[:half], history[-half:]
        eos_then, eos_now = mean_of(start, "rollout/eos_rate"), mean_of(recent, "rollout/eos_rate")
        if eos_then - eos_now > cfg.health_eos_drop:
            warnings.append(f"losing EOS: {eos_now:.2f} of responses end with EOS over the last {half} updates, {eos_then:.2f} at the start")
        sat_then, sat_now = mean_of(start, "rollout/length_saturation"), mean_of(recent, "rollout/length_saturation")
        if sat_now - sat_then > cfg.health_saturation_rise:
            warnings.append(f"responses saturate the length limit: {sat_now:.2f} fill response_length ({cfg.response_length}) "
                            f"over the last {half} updates, {sat_then:.2f} at the start")
    score_trend = _trend(history, "objective/scores", window)
    if score_trend is not None and score_trend > 0:
        verifier_trend = _trend(history, "objective/verifier", window)
        if not reward_is_verifier and verifier_trend is not None and verifier_trend < -0.02:
            warnings.append(f"reward gaming? the score rose by {score_trend:.3f} over the last {window} updates while the verifier fell by {-verifier_trend:.3f}")
        length_trend = _trend(history, "rollout/response_length", window)
        length_then = mean_of(history[-window:-half], "rollout/response_length")
        if length_trend is not None and length_trend > 0.5 * length_then and (verifier_trend is None or verifier_trend <= 0):
            warnings.append(f"length gaming? the score rose while responses grew by {length_trend:.1f} tokens over the last {window} updates")
    return warnings
