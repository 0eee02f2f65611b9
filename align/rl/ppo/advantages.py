"""Phase 3 of a PPO update: per-token rewards (score minus the KL penalty), GAE, and whitening over every
process's rows (a batch split across processes whitens as one batch).

`compute_rewards` and `gae` are pure (tensors in, tensors out); `estimate_advantages` applies them to a
`Rollout`. `batch` is the number of sampled responses, `response_len` the padded response length;
responses are right-padded, so every `response_mask` row is a prefix of True values.

References:
    [Schulman16] Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
        Estimation", arXiv:1506.02438.
    [Ziegler19] Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
        arXiv:1909.08593.
    [Ahmadian24] Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
        from Human Feedback in LLMs", arXiv:2402.14740 (RLOO).
"""

from __future__ import annotations

import torch
from torch import Tensor

from align.ops.kl import token_kl
from align.ops.masked import masked_whiten
from align.rl.ppo.config import PPOArgs
from align.rl.ppo.dist import Dist
from align.rl.ppo.rollout import Rollout


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


def leave_one_out_baseline(scores: Tensor, group_size: int) -> Tensor:
    """Each score minus the mean of the other scores of its group: RLOO's baseline [Ahmadian24, eq. 5].

    The samples of one prompt share its difficulty, so the baseline takes what the prompt alone decides out
    of the score (an unbiased baseline: it does not depend on the sample it is subtracted from).

    Args:
        scores: (batch,) sequence scores, batch = groups * group_size, a group's samples adjacent (rows
            g * group_size ... g * group_size + group_size - 1).
        group_size: samples per prompt, at least 2.

    Returns:
        (batch,) baselined scores; each group's sum to 0 up to rounding.
    """
    if group_size < 2 or scores.shape[0] % group_size:
        raise ValueError(f"leave_one_out_baseline: {scores.shape[0]} scores in groups of {group_size}: "
                         "expected a group size of at least 2 that divides the batch")
    grouped = scores.reshape(-1, group_size)
    others_mean = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others_mean).reshape(scores.shape)


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


def _pad_to(tensor: Tensor, width: int, value: float | bool = 0) -> Tensor:
    if tensor.shape[1] == width:
        return tensor
    pad = torch.full((tensor.shape[0], width - tensor.shape[1]), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, pad], dim=1)


def global_whiten(values: Tensor, mask: Tensor, dist: Dist, width: int, shift_mean: bool = True) -> Tensor:
    """`masked_whiten` over the rows of every process; returns this process's rows.

    Args:
        values, mask: (rows, response_width) on this process; padded to `width` (the same on all) to gather.
    """
    if dist.world == 1:
        return masked_whiten(values, mask, shift_mean=shift_mean)
    all_values = dist.gather_rows(_pad_to(values, width))
    all_mask = dist.gather_rows(_pad_to(mask, width, False))
    whitened = masked_whiten(all_values, all_mask, shift_mean=shift_mean)
    return dist.local_rows(whitened)[:, : values.shape[1]]


@torch.no_grad()
def estimate_advantages(rollout: Rollout, cfg: PPOArgs, kl_coef: float, dist: Dist) -> None:
    """KL-penalised per-token rewards, GAE advantages and returns, advantages whitened globally; with
    samples_per_prompt > 1 the scores are first baselined by their prompt's other samples (over all processes)."""
    mask = rollout.response_mask
    scores = rollout.scores
    if cfg.samples_per_prompt > 1:
        scores = dist.local_rows(leave_one_out_baseline(dist.gather_rows(scores), cfg.samples_per_prompt))
    rewards = compute_rewards(scores, rollout.old_logprobs, rollout.ref_logprobs, mask, kl_coef, cfg.kl_estimator)
    if cfg.whiten_rewards:
        rewards = global_whiten(rewards, mask, dist, cfg.response_length, shift_mean=False)
    advantages, returns = gae(rewards, rollout.old_values, mask, cfg.gamma, cfg.lam)
    rollout.rewards, rollout.returns = rewards, returns
    rollout.advantages = global_whiten(advantages, mask, dist, cfg.response_length)
