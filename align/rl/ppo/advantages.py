"""Phase 3 of a PPO update: per-token rewards (score minus the KL penalty), GAE, and whitening over every
process's rows (a batch split across processes whitens as one batch)."""

from __future__ import annotations

import torch
from torch import Tensor

from align import ppo_math
from align.rl.ppo.config import PPOArgs
from align.rl.ppo.dist import Dist
from align.rl.ppo.rollout import Rollout


def _pad_to(tensor: Tensor, width: int, value: float | bool = 0) -> Tensor:
    if tensor.shape[1] == width:
        return tensor
    pad = torch.full((tensor.shape[0], width - tensor.shape[1]), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, pad], dim=1)


def global_whiten(values: Tensor, mask: Tensor, dist: Dist, width: int, shift_mean: bool = True) -> Tensor:
    """`ppo_math.masked_whiten` over the rows of every process; returns this process's rows.

    Args:
        values, mask: (rows, response_width) on this process; padded to `width` (the same on all) to gather.
    """
    if dist.world == 1:
        return ppo_math.masked_whiten(values, mask, shift_mean=shift_mean)
    all_values = dist.gather_rows(_pad_to(values, width))
    all_mask = dist.gather_rows(_pad_to(mask, width, False))
    rows = values.shape[0]
    whitened = ppo_math.masked_whiten(all_values, all_mask, shift_mean=shift_mean)
    return whitened[dist.rank * rows : (dist.rank + 1) * rows, : values.shape[1]]


@torch.no_grad()
def estimate_advantages(rollout: Rollout, cfg: PPOArgs, kl_coef: float, dist: Dist) -> None:
    """KL-penalised per-token rewards, GAE advantages and returns, advantages whitened globally."""
    mask = rollout.response_mask
    rewards = ppo_math.compute_rewards(rollout.scores, rollout.old_logprobs, rollout.ref_logprobs, mask, kl_coef, cfg.kl_estimator)
    if cfg.whiten_rewards:
        rewards = global_whiten(rewards, mask, dist, cfg.response_length, shift_mean=False)
    advantages, returns = ppo_math.gae(rewards, rollout.old_values, mask, cfg.gamma, cfg.lam)
    rollout.rewards, rollout.returns = rewards, returns
    rollout.advantages = global_whiten(advantages, mask, dist, cfg.response_length)
