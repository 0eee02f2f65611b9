"""align.rl.ppo.losses: the clipped policy and value losses against the reference numbers, and the first
minibatch's identities."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from align.ops.masked import masked_mean
from align.rl.ppo.losses import policy_loss, value_loss
from math_reference import close, prefix_mask, ref, t  # noqa: F401  (ref is a fixture)


def test_policy_loss_matches_reference(ref):
    losses = ref["losses"]
    x = losses["inputs"]
    loss, stats = policy_loss(
        t(x["new_logprobs"]), t(x["old_logprobs"]), t(x["advantages"]), t(x["mask"]), x["cliprange"]
    )
    close(loss, losses["policy_loss_token_mean"])
    close(stats["clipfrac"], losses["policy_clipfrac"])
    # Largest masked-in ratio: row 1, token 3, exp(-1.2 - (-1.6)) = exp(0.4).
    close(stats["ratio_max"], math.exp(0.4))


def test_value_loss_matches_reference(ref):
    losses = ref["losses"]
    x = losses["inputs"]
    args = (t(x["new_values"]), t(x["old_values"]), t(x["returns"]), t(x["mask"]))
    loss, clipfrac = value_loss(*args, cliprange_value=x["cliprange_value"])
    close(loss, losses["value_loss_clipped"])
    close(clipfrac, losses["value_clipfrac"])
    loss, clipfrac = value_loss(*args, cliprange_value=None)
    close(loss, losses["value_loss_unclipped"])
    assert clipfrac.item() == 0.0


def test_first_minibatch_ratio_is_one_and_loss_is_minus_mean_advantage():
    generator = torch.Generator().manual_seed(1)
    old_logprobs = -torch.rand(2, 5, generator=generator, dtype=torch.float64) * 3
    advantages = torch.randn(2, 5, generator=generator, dtype=torch.float64)
    mask = prefix_mask([5, 2], 5)
    loss, stats = policy_loss(old_logprobs.clone(), old_logprobs, advantages, mask, cliprange=0.2)
    assert stats["ratio_mean"].item() == 1.0
    assert stats["ratio_max"].item() == 1.0
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    assert loss.item() == -masked_mean(advantages, mask).item()


def test_policy_loss_gradient_only_reaches_masked_in_tokens():
    logprobs = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([[1.0, -2.0, 3.0, 100.0]], dtype=torch.float64)
    loss, _ = policy_loss(logprobs, torch.zeros(1, 4, dtype=torch.float64), advantages, prefix_mask([3], 4), 0.2)
    loss.backward()
    # d/dlogprob of -A * exp(logprob - old) at ratio 1 is -A, divided by the 3 masked-in tokens.
    assert_close(logprobs.grad, torch.tensor([[-1 / 3, 2 / 3, -1.0, 0.0]], dtype=torch.float64))
