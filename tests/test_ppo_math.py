"""Tests for the pure math of align.ops and align.rl.ppo (advantages, losses, kl_control, the EOS penalty).

Reference values come from the repo's copy, tests/reference/ppo_math.json (computed by OpenRLHF, TRL
and DeepSpeed-Chat); the tests read only that file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from align.ops.kl import token_kl
from align.ops.logprobs import entropy_from_logits, logprobs_from_logits
from align.ops.masked import masked_mean, masked_var, masked_whiten
from align.ops.responses import truncate_after_eos
from align.rl.ppo.advantages import compute_rewards, gae
from align.rl.ppo.kl_control import AdaptiveKLController, FixedKLController
from align.rl.ppo.losses import policy_loss, value_loss
from align.rl.ppo.rollout import apply_missing_eos_penalty

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_REFERENCE = REPO_ROOT / "tests" / "reference" / "ppo_math.json"
ATOL = 1e-5  # the reference values are rounded to 6 decimals


@pytest.fixture(scope="module")
def ref() -> dict:
    return json.loads(REPO_REFERENCE.read_text())


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(actual, expected) -> None:
    expected = expected if isinstance(expected, torch.Tensor) else t(expected)
    assert_close(actual, expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------- reference


def test_truncation_matches_reference(ref):
    inputs, expected = ref["inputs"], ref["truncation"]
    responses = torch.tensor(inputs["responses"])
    truncated, response_mask, last_token_index, contains_eos = truncate_after_eos(
        responses, inputs["eos_token_id"], inputs["pad_token_id"]
    )
    assert truncated.tolist() == expected["truncated_responses"]
    assert last_token_index.tolist() == expected["last_token_index"]
    assert contains_eos.tolist() == expected["contains_eos"]
    assert response_mask.dtype == torch.bool
    assert response_mask.long().tolist() == inputs["response_mask"]
    penalised = apply_missing_eos_penalty(t(inputs["scores"]), contains_eos, 1.0)
    close(penalised, expected["scores_with_missing_eos_penalty_1.0"])


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_reference(ref, estimator):
    inputs = ref["inputs"]
    kl = token_kl(t(inputs["logprobs"]), t(inputs["ref_logprobs"]), t(inputs["response_mask"]), estimator)
    close(kl, ref["kl_estimators_masked"][estimator])


def test_masked_mean_and_var_match_reference(ref):
    w = ref["whiten"]
    close(masked_mean(t(w["input"]), t(w["mask"])), w["masked_mean"])
    close(masked_var(t(w["input"]), t(w["mask"]), unbiased=True), w["masked_var_unbiased"])


@pytest.mark.parametrize(
    "unbiased, key", [(True, "whitened_unbiased_var_shift_mean"), (False, "whitened_biased_var_shift_mean")]
)
def test_masked_whiten_matches_reference_and_zeroes_padding(ref, unbiased, key):
    w = ref["whiten"]
    mask = torch.tensor(w["mask"], dtype=torch.bool)
    whitened = masked_whiten(t(w["input"]), mask, shift_mean=True, unbiased=unbiased)
    # The reference leaves padding unzeroed, so only masked-in entries are comparable.
    close(whitened[mask], t(w[key])[mask])
    assert torch.equal(whitened[~mask], torch.zeros_like(whitened[~mask]))


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


# ---------------------------------------------------------------------------------------- identities


def _prefix_mask(lengths: list[int], response_len: int) -> torch.Tensor:
    return torch.arange(response_len) < torch.tensor(lengths)[:, None]


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_values():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 7, generator=generator, dtype=torch.float64)
    values = torch.randn(3, 7, generator=generator, dtype=torch.float64)
    mask = _prefix_mask([7, 4, 1], 7)
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


def test_first_minibatch_ratio_is_one_and_loss_is_minus_mean_advantage():
    generator = torch.Generator().manual_seed(1)
    old_logprobs = -torch.rand(2, 5, generator=generator, dtype=torch.float64) * 3
    advantages = torch.randn(2, 5, generator=generator, dtype=torch.float64)
    mask = _prefix_mask([5, 2], 5)
    loss, stats = policy_loss(old_logprobs.clone(), old_logprobs, advantages, mask, cliprange=0.2)
    assert stats["ratio_mean"].item() == 1.0
    assert stats["ratio_max"].item() == 1.0
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    assert loss.item() == -masked_mean(advantages, mask).item()


def test_policy_loss_gradient_only_reaches_masked_in_tokens():
    logprobs = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([[1.0, -2.0, 3.0, 100.0]], dtype=torch.float64)
    loss, _ = policy_loss(logprobs, torch.zeros(1, 4, dtype=torch.float64), advantages, _prefix_mask([3], 4), 0.2)
    loss.backward()
    # d/dlogprob of -A * exp(logprob - old) at ratio 1 is -A, divided by the 3 masked-in tokens.
    assert_close(logprobs.grad, torch.tensor([[-1 / 3, 2 / 3, -1.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("unbiased", [True, False])
def test_whitened_values_have_mean_zero_and_variance_one(unbiased):
    generator = torch.Generator().manual_seed(2)
    values = torch.randn(4, 9, generator=generator, dtype=torch.float64) * 5 + 3
    mask = _prefix_mask([9, 3, 6, 1], 9)
    whitened = masked_whiten(values, mask, unbiased=unbiased)
    assert abs(masked_mean(whitened, mask).item()) < 1e-12
    assert abs(masked_var(whitened, mask, unbiased=unbiased).item() - 1.0) < 1e-6


def test_whiten_without_mean_shift_keeps_the_mean():
    values = t([[1.0, 2.0, 3.0, 50.0]])
    mask = _prefix_mask([3], 4)
    # mean 2, unbiased var ((1)^2 + 0 + (1)^2) / 2 = 1, so (x - 2) / 1 + 2 = x on the masked-in entries.
    assert_close(masked_whiten(values, mask, shift_mean=False), t([[1.0, 2.0, 3.0, 0.0]]))


def test_masked_var_rejects_too_few_entries():
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(t([[1.0, 2.0]]), _prefix_mask([1], 2), unbiased=True)
    assert masked_var(t([[1.0, 2.0]]), _prefix_mask([1], 2), unbiased=False).item() == 0.0


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_is_zero_when_policy_equals_reference(estimator):
    logprobs = -torch.rand(3, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kl = token_kl(logprobs, logprobs.clone(), torch.ones(3, 6), estimator)
    assert torch.equal(kl, torch.zeros_like(kl))


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_k2_and_k3_are_non_negative(estimator):
    generator = torch.Generator().manual_seed(4)
    logprobs = -torch.rand(8, 16, generator=generator, dtype=torch.float64) * 5
    ref_logprobs = -torch.rand(8, 16, generator=generator, dtype=torch.float64) * 5
    assert (token_kl(logprobs, ref_logprobs, torch.ones(8, 16), estimator) >= 0).all()


def test_unknown_kl_estimator_is_rejected():
    with pytest.raises(ValueError, match="k4"):
        token_kl(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), "k4")


def test_compute_rewards_rejects_a_row_without_tokens():
    with pytest.raises(ValueError, match="all False"):
        compute_rewards(t([1.0, 2.0]), torch.zeros(2, 3), torch.zeros(2, 3), _prefix_mask([3, 0], 3), 0.1)


def test_truncation_keeps_an_eos_at_position_zero_and_cuts_at_the_first_eos():
    responses = torch.tensor([[2, 5, 6], [7, 2, 2], [2, 2, 2]])
    truncated, mask, last_token_index, contains_eos = truncate_after_eos(responses, eos_token_id=2, pad_token_id=2)
    assert truncated.tolist() == [[2, 2, 2], [7, 2, 2], [2, 2, 2]]
    assert mask.tolist() == [[True, False, False], [True, True, False], [True, False, False]]
    assert last_token_index.tolist() == [0, 1, 0]
    assert contains_eos.tolist() == [True, True, True]


# ---------------------------------------------------------------------------------------- log-probs


def _naive_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 512])
def test_chunked_logprobs_equal_naive_log_softmax_gather(chunk_size):
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 7, 11, generator=generator, dtype=torch.float64) * 4
    tokens = torch.randint(0, 11, (2, 7), generator=generator)
    actual = logprobs_from_logits(logits, tokens, chunk_size=chunk_size)
    assert actual.dtype == torch.float64
    assert_close(actual, _naive_logprobs(logits, tokens), atol=1e-12, rtol=0)


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5])
def test_temperature_scaling_matches_log_softmax_of_scaled_logits(temperature):
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 5, 13, generator=generator, dtype=torch.float64) * 3
    tokens = torch.randint(0, 13, (3, 5), generator=generator)
    actual = logprobs_from_logits(logits, tokens, temperature=temperature, chunk_size=4)
    assert_close(actual, _naive_logprobs(logits, tokens, temperature), atol=1e-12, rtol=0)
    assert not torch.allclose(actual, _naive_logprobs(logits, tokens))


def test_bf16_logits_are_upcast_to_float32():
    generator = torch.Generator().manual_seed(7)
    logits = (torch.randn(2, 6, 17, generator=generator) * 5).to(torch.bfloat16)
    tokens = torch.randint(0, 17, (2, 6), generator=generator)
    actual = logprobs_from_logits(logits, tokens, chunk_size=5)
    assert actual.dtype == torch.float32
    # bf16 values are exact in float64, so this is the true log-softmax to float32 precision.
    assert_close(actual, _naive_logprobs(logits.double(), tokens).float())


def test_chunked_logprobs_gradient_matches_naive_gradient():
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 5, 9, generator=generator, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 9, (2, 5), generator=generator)
    weights = torch.randn(2, 5, generator=generator, dtype=torch.float64)
    (logprobs_from_logits(logits, tokens, temperature=0.8, chunk_size=3) * weights).sum().backward()
    chunked_grad = logits.grad.clone()
    logits.grad = None
    (_naive_logprobs(logits, tokens, 0.8) * weights).sum().backward()
    assert_close(chunked_grad, logits.grad, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(
        lambda x: logprobs_from_logits(x, tokens, temperature=0.8, chunk_size=4), (logits.detach().requires_grad_(),)
    )


def test_entropy_matches_naive_entropy_and_is_log_vocab_for_uniform_logits():
    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 5, 9, generator=generator, dtype=torch.float64) * 3
    log_probs = torch.log_softmax(logits / 0.7, dim=-1)
    naive = -(log_probs.exp() * log_probs).sum(-1)
    assert_close(entropy_from_logits(logits, temperature=0.7, chunk_size=3), naive, atol=1e-12, rtol=0)
    uniform = entropy_from_logits(torch.zeros(1, 2, 9, dtype=torch.float64))
    assert_close(uniform, torch.full((1, 2), math.log(9), dtype=torch.float64), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------- controllers


def test_adaptive_controller_raises_beta_when_kl_is_above_target():
    """KL 6.6, target 6: e = 6.6 / 6 - 1 = 0.1; beta = 0.1 * (1 + 0.1 * 256 / 10000) = 0.1 * 1.00256."""
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    controller.update(current_kl=6.6, n_steps=256)
    assert controller.value == pytest.approx(0.100256, abs=1e-12)


def test_adaptive_controller_lowers_beta_when_kl_is_below_target():
    """KL 5.4, target 6: e = 5.4 / 6 - 1 = -0.1; beta = 0.1 * (1 - 0.1 * 256 / 10000) = 0.1 * 0.99744."""
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    controller.update(current_kl=5.4, n_steps=256)
    assert controller.value == pytest.approx(0.099744, abs=1e-12)


def test_adaptive_controller_clips_the_proportional_error():
    """KL 30, target 6: e = 4 clipped to 0.2; beta = 0.1 * (1 + 0.2 * 500 / 1000) = 0.11.
    KL 0: e = -1 clipped to -0.2; beta = 0.11 * (1 - 0.2 * 500 / 1000) = 0.099."""
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=1000)
    controller.update(current_kl=30.0, n_steps=500)
    assert controller.value == pytest.approx(0.11, abs=1e-12)
    controller.update(current_kl=0.0, n_steps=500)
    assert controller.value == pytest.approx(0.099, abs=1e-12)


def test_controllers_resume_from_state_dict():
    running = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=1000)
    running.update(current_kl=9.0, n_steps=64)
    resumed = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=1000)
    resumed.load_state_dict(json.loads(json.dumps(running.state_dict())))
    for kl in (3.0, 7.5):
        running.update(kl, 64)
        resumed.update(kl, 64)
    assert resumed.value == running.value != 0.2

    fixed = FixedKLController(0.05)
    fixed.update(current_kl=100.0, n_steps=64)
    assert fixed.value == 0.05
    restored = FixedKLController(0.3)
    restored.load_state_dict(fixed.state_dict())
    assert restored.value == 0.05


# ---------------------------------------------------------------------------------------- properties

_finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False)
_junk = st.floats(allow_nan=True, allow_infinity=True)


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(st.tuples(st.lists(_finite, min_size=6, max_size=6), st.integers(0, 6)), min_size=2, max_size=4),
    junk=_junk,
)
def test_masked_whiten_ignores_values_in_masked_out_positions(rows, junk):
    values = t([row for row, _ in rows])
    mask = _prefix_mask([length for _, length in rows], 6)
    if mask.sum() < 2:
        return  # the unbiased variance needs two entries; masked_var raises then (tested above)
    with_junk = torch.where(mask, values, junk)
    assert torch.equal(masked_whiten(values, mask), masked_whiten(with_junk, mask))
    assert torch.equal(masked_mean(values, mask), masked_mean(with_junk, mask))


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
    mask = _prefix_mask([length for _, _, length in rows], 5)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    junk_advantages, junk_returns = gae(
        torch.where(mask, rewards, junk), torch.where(mask, values, junk), mask, gamma, lam
    )
    assert torch.equal(advantages, junk_advantages)
    assert torch.equal(returns, junk_returns)


@settings(max_examples=50, deadline=None)
@given(responses=st.lists(st.lists(st.integers(0, 4), min_size=5, max_size=5), min_size=1, max_size=4))
def test_truncation_mask_ends_at_the_first_eos(responses):
    tokens = torch.tensor(responses)
    truncated, mask, last_token_index, contains_eos = truncate_after_eos(tokens, eos_token_id=2, pad_token_id=0)
    for row, row_truncated, row_mask, last, has_eos in zip(responses, truncated, mask, last_token_index, contains_eos):
        expected_last = row.index(2) if 2 in row else len(row) - 1
        assert last.item() == expected_last and has_eos.item() == (2 in row)
        assert row_mask.tolist() == [i <= expected_last for i in range(len(row))]
        assert row_truncated.tolist() == row[: expected_last + 1] + [0] * (len(row) - expected_last - 1)
