"""The PPO update's losses: the clipped policy surrogate and the clipped value loss, token-level means
over the response mask. Pure functions: tensors in, tensors out; `trainer.py` calls them once per
micro-batch.

`logprobs` are the current policy's per-token log-probs of the sampled tokens, `old_logprobs` the
rollout policy's; every `*_mask` is True (or 1) where the token counts.

References:
    [Schulman17] Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347.
    [Schulman20] J. Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.
"""

from __future__ import annotations

import torch
from torch import Tensor

from align.ops.masked import masked_mean


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor, cliprange: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss [Schulman17, eq. 7], a token-level mean over the mask.

        ratio = exp(logprobs - old_logprobs)
        loss  = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))

    Every token weighs the same, so long responses weigh more than short ones (as in TRL and
    OpenRLHF's default; a per-sequence mean would weigh responses equally).

    Args:
        logprobs: (batch, response_len) current-policy log-probs (with grad).
        old_logprobs: (batch, response_len) rollout-policy log-probs.
        advantages: (batch, response_len), usually whitened.
        response_mask: (batch, response_len), True/1 where the token counts.
        cliprange: epsilon.

    Returns:
        loss: scalar.
        stats: detached scalars
            clipfrac: fraction of tokens where the clipped term is the larger one, i.e. tokens that get
                no gradient. A token whose ratio left [1 - eps, 1 + eps] in the direction that hurts the
                objective is not counted: the pessimistic unclipped term still drives it back.
            approx_kl: KL(old || new) by the k3 estimator, (ratio - 1) - log(ratio) [Schulman20].
            ratio_mean, ratio_max: of the ratio over masked-in tokens.
    """
    mask = response_mask.bool()
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(mask, ratio, -torch.inf).max(),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    cliprange_value: float | None,
) -> tuple[Tensor, Tensor]:
    """Clipped value loss, a token-level mean over the mask.

        V_clip = old_V + clip(V - old_V, -eps_v, eps_v)
        loss   = 0.5 * mean_t max((V_t - R_t)^2, (V_clip_t - R_t)^2)

    This is the value clipping of OpenAI baselines' PPO2 and of TRL, not part of [Schulman17]; the
    0.5 is TRL's. `cliprange_value=None` gives the plain 0.5 * mean (V - R)^2.

    Args:
        values: (batch, response_len) current value predictions (with grad).
        old_values: (batch, response_len) value predictions at rollout time.
        returns: (batch, response_len) value targets from `advantages.gae`.
        response_mask: (batch, response_len), True/1 where the token counts.
        cliprange_value: eps_v, or None for no clipping.

    Returns:
        loss: scalar.
        clipfrac: detached scalar, fraction of tokens where the clipped error is the larger one.
    """
    mask = response_mask.bool()
    unclipped = (values - returns) ** 2
    if cliprange_value is None:
        return 0.5 * masked_mean(unclipped, mask), torch.zeros((), dtype=values.dtype, device=values.device)
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(values.dtype), mask).detach()
    return loss, clipfrac
