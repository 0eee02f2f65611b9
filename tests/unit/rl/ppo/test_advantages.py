"""align.rl.ppo.advantages: KL-penalised per-token rewards and GAE against the reference numbers, by hand, and
whatever follows the response; RLOO's leave-one-out baseline by hand."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from align.rl.ppo.advantages import compute_rewards, gae, leave_one_out_baseline
from math_reference import close, prefix_mask, ref, t  # noqa: F401  (ref is a fixture)


def test_rewards_match_reference(ref):
    inputs = ref["inputs"]
    rewards = compute_rewards(
        t(inputs["scores"]),
        t(inputs["logprobs"]),
        t(inputs["ref_logprobs"]),
        t(inputs["response_mask"]),
        inputs["kl_coef"],
        kl_estimator="k1",
    )
    close(rewards, ref["rewards_and_gae_score_on_last_response_token"]["rewards"])


def test_rewards_with_k3_use_the_reference_k3(ref):
    """Same reference, k3 estimator: -kl_coef * k3 everywhere, the score on indices 3 and 5."""
    inputs = ref["inputs"]
    rewards = compute_rewards(
        t(inputs["scores"]),
        t(inputs["logprobs"]),
        t(inputs["ref_logprobs"]),
        t(inputs["response_mask"]),
        inputs["kl_coef"],
        kl_estimator="k3",
    )
    expected = -inputs["kl_coef"] * t(ref["kl_estimators_masked"]["k3"])
    expected[0, 3] += inputs["scores"][0]
    expected[1, 5] += inputs["scores"][1]
    close(rewards, expected)


def test_gae_matches_reference(ref):
    inputs, expected = ref["inputs"], ref["rewards_and_gae_score_on_last_response_token"]
    advantages, returns = gae(
        t(expected["rewards"]), t(inputs["values"]), t(inputs["response_mask"]), inputs["gamma"], inputs["lam"]
    )
    close(advantages, expected["advantages"])
    close(returns, expected["returns"])


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_values():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 7, generator=generator, dtype=torch.float64)
    values = torch.randn(3, 7, generator=generator, dtype=torch.float64)
    mask = prefix_mask([7, 4, 1], 7)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    masked_rewards = torch.where(mask, rewards, 0)
    reward_to_go = masked_rewards.flip(-1).cumsum(-1).flip(-1)
    assert_close(advantages, torch.where(mask, reward_to_go - values, 0))
    assert_close(returns, torch.where(mask, reward_to_go, 0))


def test_gae_with_discount_by_hand():
    """rewards [0, 0, 1], values [0.5, 0.2, 0.4], gamma 0.9, lam 0.8 (gamma * lam = 0.72):
    delta_2 = 1 + 0.9 * 0 - 0.4 = 0.6,  delta_1 = 0 + 0.9 * 0.4 - 0.2 = 0.16,  delta_0 = 0.9 * 0.2 - 0.5 = -0.32
    A_2 = 0.6,  A_1 = 0.16 + 0.72 * 0.6 = 0.592,  A_0 = -0.32 + 0.72 * 0.592 = 0.10624
    returns = A + V = [0.60624, 0.792, 1.0].
    With lam = 1 the returns are the discounted reward-to-go [0.81, 0.9, 1.0]."""
    rewards, values, mask = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.2, 0.4]]), torch.ones(1, 3, dtype=torch.bool)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert_close(advantages, t([[0.10624, 0.592, 0.6]]), atol=1e-12, rtol=0)
    assert_close(returns, t([[0.60624, 0.792, 1.0]]), atol=1e-12, rtol=0)
    _, returns = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    assert_close(returns, t([[0.81, 0.9, 1.0]]), atol=1e-12, rtol=0)


def test_compute_rewards_rejects_a_row_without_tokens():
    with pytest.raises(ValueError, match="all False"):
        compute_rewards(t([1.0, 2.0]), torch.zeros(2, 3), torch.zeros(2, 3), prefix_mask([3, 0], 3), 0.1)


_finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False)


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.lists(_finite, min_size=5, max_size=5), st.lists(_finite, min_size=5, max_size=5), st.integers(1, 5)
        ),
        min_size=1,
        max_size=3,
    ),
    junk=st.floats(-1e6, 1e6),
    gamma=st.floats(0.5, 1.0),
    lam=st.floats(0.5, 1.0),
)
def test_gae_ignores_rewards_and_values_after_the_response(rows, junk, gamma, lam):
    rewards, values = t([r for r, _, _ in rows]), t([v for _, v, _ in rows])
    mask = prefix_mask([length for _, _, length in rows], 5)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    junk_advantages, junk_returns = gae(
        torch.where(mask, rewards, junk), torch.where(mask, values, junk), mask, gamma, lam
    )
    assert torch.equal(advantages, junk_advantages)
    assert torch.equal(returns, junk_returns)


def test_leave_one_out_baseline_by_hand():
    """Groups of 4 adjacent scores: 1 0 0 1 -> 1 - 1/3, 0 - 2/3, ...; 2 4 6 8 -> 2 - 6, 4 - 16/3, 6 - 14/3, 8 - 4;
    and groups of 2: each score minus its partner."""
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 4.0, 6.0, 8.0])
    assert_close(leave_one_out_baseline(scores, 4),
                 torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, -4.0, 4 - 16 / 3, 6 - 14 / 3, 4.0]))
    assert_close(leave_one_out_baseline(scores, 2), torch.tensor([1.0, -1.0, -1.0, 1.0, -2.0, 2.0, -2.0, 2.0]))
    assert torch.equal(leave_one_out_baseline(torch.full((6,), 0.3), 3), torch.zeros(6)), "a prompt every sample meets alike teaches nothing"


@pytest.mark.parametrize("n,group_size", [(8, 1), (8, 3), (6, 4)])
def test_leave_one_out_baseline_rejects_groups_that_do_not_fit(n, group_size):
    with pytest.raises(ValueError, match=f"{n} scores in groups of {group_size}"):
        leave_one_out_baseline(torch.zeros(n), group_size)
