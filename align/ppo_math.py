"""PPO math for RLHF as small pure functions: tensors in, tensors out.

The PPO loop (generate, score, estimate advantages, update) calls these; none of them touches a model,
an optimizer or a device. Conventions:

- `batch` is the number of sampled responses, `response_len` the padded response length; responses
  are right-padded, so every `response_mask` row is a prefix of True values.
- Every `*_mask` is True (or 1) where the token counts.
- `logprobs` are the current policy's per-token log-probs of the sampled tokens, `old_logprobs` the
  rollout policy's, `ref_logprobs` the frozen reference model's.

References:
    [Schulman17] Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347.
    [Schulman16] Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
        Estimation", arXiv:1506.02438.
    [Ziegler19] Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
        arXiv:1909.08593.
    [Schulman20] J. Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

# Added to the variance before the inverse square root, as TRL and OpenRLHF do; the reference values
# in tests/reference/ppo_math.json were computed with it.
WHITEN_EPS = 1e-8


# --------------------------------------------------------------------------------------------------
# Log-probs and entropy from logits
# --------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """bf16/fp16 logits are upcast to float32 for log_softmax; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Token log-probs whose backward also works chunk by chunk.

    With plain autograd each chunk's upcast float32 copy would be saved for backward, so the full
    float32 `(positions, vocab)` tensor would exist after all. Here forward saves only the logits (in
    their own dtype), the tokens and one logsumexp per position, and backward rebuilds the softmax one
    chunk at a time: d/dlogits [z_tok / T - logsumexp(z / T)] = (onehot(tok) - softmax(z / T)) / T.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, tokens: Tensor, temperature: float, chunk_size: int) -> Tensor:
        dtype = _compute_dtype(logits.dtype)
        token_logprobs, logsumexps = [], []
        for start in range(0, logits.shape[0], chunk_size):
            chunk = logits[start : start + chunk_size].to(dtype) / temperature
            logsumexp = torch.logsumexp(chunk, dim=-1)
            picked = chunk.gather(-1, tokens[start : start + chunk_size, None]).squeeze(-1)
            token_logprobs.append(picked - logsumexp)
            logsumexps.append(logsumexp)
        ctx.save_for_backward(logits, tokens, torch.cat(logsumexps))
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return torch.cat(token_logprobs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, None, None, None]:
        logits, tokens, logsumexp = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], chunk_size):
            stop = start + chunk_size
            chunk = logits[start:stop].to(logsumexp.dtype) / temperature
            probs = torch.exp(chunk - logsumexp[start:stop, None])
            grad = -probs
            grad.scatter_add_(-1, tokens[start:stop, None], torch.ones_like(probs[:, :1]))
            grad_logits[start:stop] = (grad * (grad_output[start:stop, None] / temperature)).to(logits.dtype)
        return grad_logits, None, None, None


def logprobs_from_logits(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_size: int = 512
) -> Tensor:
    """Log-probability of each sampled token under softmax(logits / temperature).

    The logits are divided by the sampling temperature so that the log-probs are those of the
    distribution the tokens were actually drawn from; PPO's importance ratio is only correct then.
    log_softmax is computed as gather minus logsumexp, `chunk_size` positions at a time, so that neither
    forward nor backward ever holds the float32 log-softmax of all positions over the whole vocabulary
    (bf16 logits for 8 x 1024 positions over a 150k vocabulary would need 4.9 GB as float32).

    Args:
        logits: (batch, seq_len, vocab) any float dtype; logits[:, t] predict tokens[:, t].
        tokens: (batch, seq_len) int64 token ids.
        temperature: the sampling temperature, > 0.
        chunk_size: positions (rows of the flattened batch x seq_len) per chunk.

    Returns:
        (batch, seq_len) log-probs in float32, or float64 if the logits are float64.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}")
    flat = _ChunkedTokenLogprobs.apply(
        logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1), float(temperature), chunk_size
    )
    return flat.view(tokens.shape)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0, chunk_size: int = 512) -> Tensor:
    """Entropy of softmax(logits / temperature) at each position, chunk by chunk.

    H = logsumexp(z) - sum_v softmax(z)_v * z_v with z = logits / temperature. Chunking bounds memory
    under torch.no_grad() (the usual case: entropy is logged, not optimised); under autograd every
    chunk is kept for backward.

    Args:
        logits: (batch, seq_len, vocab) any float dtype.
        temperature: the sampling temperature, > 0.
        chunk_size: positions per chunk.

    Returns:
        (batch, seq_len) entropies in nats, float32 (float64 for float64 logits).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = _compute_dtype(logits.dtype)
    flat = logits.reshape(-1, logits.shape[-1])
    entropies = []
    for start in range(0, flat.shape[0], chunk_size):
        chunk = flat[start : start + chunk_size].to(dtype) / temperature
        logsumexp = torch.logsumexp(chunk, dim=-1)
        probs = torch.exp(chunk - logsumexp[:, None])
        entropies.append(logsumexp - (probs * chunk).sum(-1))
    return torch.cat(entropies).view(logits.shape[:-1])


# --------------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------------


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` where `mask` is True.

    Masked-out entries are selected away (not multiplied by 0), so inf or nan there cannot leak in.
    An all-False mask gives nan.

    Args:
        values: (batch, response_len) or any shape.
        mask: same shape as `values`, True/1 where the entry counts.
        dim: reduce over this dim only; None reduces over everything (a token-level mean).

    Returns:
        A scalar, or `values` with `dim` removed.
    """
    mask = mask.bool()
    total = torch.where(mask, values, 0).sum() if dim is None else torch.where(mask, values, 0).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `values` over all entries where `mask` is True.

    Args:
        values: (batch, response_len) or any shape.
        mask: same shape as `values`, True/1 where the entry counts.
        unbiased: divide by n - 1 (Bessel's correction, as TRL does) instead of n (as OpenRLHF does).

    Returns:
        A scalar.
    """
    mask = mask.bool()
    count = int(mask.sum())
    if count < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} masked-in entries, got {count}")
    mean = masked_mean(values, mask)
    var = masked_mean((torch.where(mask, values, 0) - mean) ** 2, mask)
    return var * count / (count - 1) if unbiased else var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, unbiased: bool = True) -> Tensor:
    """Normalise `values` to zero mean and unit variance over the masked-in entries.

    Used on advantages before the policy update. Departs from TRL and OpenRLHF in one way: masked-out
    entries are 0 in the output (they leave whatever the arithmetic produced there), so padding never
    carries a value into a later sum.

    Args:
        values: (batch, response_len).
        mask: (batch, response_len), True/1 where the token counts.
        shift_mean: if False, add the mean back (rescale only), as TRL does when whitening rewards.
        unbiased: use the n - 1 variance (see `masked_var`).

    Returns:
        (batch, response_len), zero where `mask` is False.
    """
    mask = mask.bool()
    values = torch.where(mask, values, 0)
    mean = masked_mean(values, mask)
    var = masked_var(values, mask, unbiased=unbiased)
    whitened = (values - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0)


# --------------------------------------------------------------------------------------------------
# Responses, KL and rewards
# --------------------------------------------------------------------------------------------------


def truncate_after_eos(
    responses: Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cut each sampled response after its first EOS.

    The EOS itself stays in the response (it is a token the policy chose, and it carries the score).
    A response without EOS ran into the length limit; it keeps all its tokens.

    Args:
        responses: (batch, response_len) int64 sampled token ids.
        eos_token_id: end-of-sequence id.
        pad_token_id: id written after the first EOS (may equal eos_token_id).

    Returns:
        truncated: (batch, response_len) `responses` with every token after the first EOS set to pad.
        response_mask: (batch, response_len) bool, True up to and including the first EOS.
        last_token_index: (batch,) int64 index of the first EOS, or response_len - 1 without one.
        contains_eos: (batch,) bool.
    """
    response_len = responses.shape[-1]
    positions = torch.arange(response_len, device=responses.device)
    is_eos = responses == eos_token_id
    contains_eos = is_eos.any(dim=-1)
    first_eos = torch.where(is_eos, positions, response_len).amin(dim=-1)
    last_token_index = torch.where(contains_eos, first_eos, response_len - 1)
    response_mask = positions <= last_token_index[:, None]
    truncated = torch.where(response_mask, responses, pad_token_id)
    return truncated, response_mask, last_token_index, contains_eos


def apply_missing_eos_penalty(scores: Tensor, contains_eos: Tensor, penalty: float) -> Tensor:
    """Subtract `penalty` from the score of every response that never emitted EOS (TRL's
    `missing_eos_penalty`), so that running into the length limit is never the best strategy.

    Args:
        scores: (batch,) reward-model scores.
        contains_eos: (batch,) bool, from `truncate_after_eos`.
        penalty: a non-negative amount.

    Returns:
        (batch,) penalised scores.
    """
    return torch.where(contains_eos.bool(), scores, scores - penalty)


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


def compute_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> Tensor:
    """Per-token rewards: a KL penalty on every token and the sequence score on the last one.

    r_t = -kl_coef * KL_t, plus the reward-model score at the last real response token [Ziegler19,
    eq. 2, with the KL term spread over tokens as in their implementation and in TRL / OpenRLHF].

    Args:
        scores: (batch,) reward-model score per response.
        logprobs: (batch, response_len) rollout-policy log-probs of the sampled tokens.
        ref_logprobs: (batch, response_len) reference-model log-probs of the same tokens.
        response_mask: (batch, response_len), True/1 where the token counts; each row needs at least
            one True (a response that is just EOS has one).
        kl_coef: the KL coefficient beta (from a KL controller).
        kl_estimator: "k1", "k2" or "k3" (see `token_kl`).

    Returns:
        (batch, response_len) rewards, zero where `response_mask` is False.
    """
    mask = response_mask.bool()
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last_token_index = torch.where(mask, positions, -1).amax(dim=-1)
    if bool((last_token_index < 0).any()):
        raise ValueError("compute_rewards: a response_mask row is all False, so its score has no token")
    rewards = -kl_coef * token_kl(logprobs, ref_logprobs, mask, kl_estimator)
    score_on_last = torch.zeros_like(rewards).scatter_(-1, last_token_index[:, None], scores[:, None].to(rewards))
    return rewards + score_on_last


# --------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------


def gae(
    rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation [Schulman16, eq. 16], backwards over the response.

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V

    Values (and rewards) are zeroed outside the mask, so the value after the last real token is 0:
    the episode ends there. `returns` use the advantages before any whitening; whiten the advantages
    afterwards with `masked_whiten`. Call under torch.no_grad(): these are targets.

    Args:
        rewards: (batch, response_len) per-token rewards from `compute_rewards`.
        values: (batch, response_len) rollout value estimates V_t.
        response_mask: (batch, response_len), True/1 where the token counts (right padding only).
        gamma: discount factor.
        lam: GAE lambda.

    Returns:
        advantages: (batch, response_len), zero where the mask is False.
        returns: (batch, response_len), the value targets, zero where the mask is False.
    """
    mask = response_mask.bool()
    values = torch.where(mask, values, 0)
    rewards = torch.where(mask, rewards, 0)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    for t in reversed(range(values.shape[-1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        next_value = values[:, t]
        advantages_reversed.append(next_advantage)
    advantages = torch.where(mask, torch.stack(advantages_reversed[::-1], dim=-1), 0)
    return advantages, advantages + values


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


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
        returns: (batch, response_len) value targets from `gae`.
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


# --------------------------------------------------------------------------------------------------
# KL coefficient controllers
# --------------------------------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; present so the loop can call either controller the same way."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller that steers the measured KL towards `target` [Ziegler19, section 2.2].

        e    = clip(KL / target - 1, -0.2, 0.2)
        beta = beta * (1 + e * n_steps / horizon)

    `n_steps` is the number of samples (responses) the KL was measured on, so `horizon` is in samples,
    as in the paper's code (lm-human-preferences) and TRL. On resume the config gives target and
    horizon; the checkpoint gives the current beta.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
