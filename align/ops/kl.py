"""Per-token estimators of KL(policy || reference) from samples of the policy.

Used by the PPO reward (a KL penalty per token), its health metrics and evaluation's KL column.
`logprobs` are the policy's per-token log-probs of the sampled tokens, `ref_logprobs` the frozen
reference model's; `response_mask` is True (or 1) where the token counts.

References:
    [Schulman20] J. Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def _kl_k1(log_ratio: Tensor) -> Tensor:
    return -log_ratio


def _kl_k2(log_ratio: Tensor) -> Tensor:
    return log_ratio**2 / 2


def _kl_k3(log_ratio: Tensor) -> Tensor:
    return torch.expm1(log_ratio) - log_ratio


_KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3}
KL_ESTIMATORS = tuple(_KL_ESTIMATORS)


def token_kl(logprobs: Tensor, ref_logprobs: Tensor, response_mask: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy [Schulman20].

    With logr = ref_logprobs - logprobs = log(p_ref / p_policy) at the sampled token:
        k1 = -logr                   unbiased, can be negative per token
        k2 = logr^2 / 2              biased, >= 0, low variance
        k3 = exp(logr) - 1 - logr    unbiased, >= 0, low variance

    Args:
        logprobs: (batch, response_len) policy log-probs of the sampled tokens.
        ref_logprobs: (batch, response_len) reference-model log-probs of the same tokens.
        response_mask: (batch, response_len), True/1 where the token counts.
        estimator: one of "k1", "k2", "k3".

    Returns:
        (batch, response_len), zero where `response_mask` is False.
    """
    if estimator not in _KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    kl = _KL_ESTIMATORS[estimator](ref_logprobs - logprobs)
    return torch.where(response_mask.bool(), kl, 0)
