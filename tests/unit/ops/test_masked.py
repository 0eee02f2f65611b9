"""align.ops.masked: masked mean, variance and whitening against the reference numbers, by hand, and whatever the
masked-out entries hold."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from align.ops.masked import explained_variance, masked_mean, masked_var, masked_whiten
from math_reference import close, prefix_mask, ref, t  # noqa: F401  (ref is a fixture)


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


@pytest.mark.parametrize("unbiased", [True, False])
def test_whitened_values_have_mean_zero_and_variance_one(unbiased):
    generator = torch.Generator().manual_seed(2)
    values = torch.randn(4, 9, generator=generator, dtype=torch.float64) * 5 + 3
    mask = prefix_mask([9, 3, 6, 1], 9)
    whitened = masked_whiten(values, mask, unbiased=unbiased)
    assert abs(masked_mean(whitened, mask).item()) < 1e-12
    assert abs(masked_var(whitened, mask, unbiased=unbiased).item() - 1.0) < 1e-6


def test_whiten_without_mean_shift_keeps_the_mean():
    values = t([[1.0, 2.0, 3.0, 50.0]])
    mask = prefix_mask([3], 4)
    # mean 2, unbiased var ((1)^2 + 0 + (1)^2) / 2 = 1, so (x - 2) / 1 + 2 = x on the masked-in entries.
    assert_close(masked_whiten(values, mask, shift_mean=False), t([[1.0, 2.0, 3.0, 0.0]]))


def test_masked_var_rejects_too_few_entries():
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(t([[1.0, 2.0]]), prefix_mask([1], 2), unbiased=True)
    assert masked_var(t([[1.0, 2.0]]), prefix_mask([1], 2), unbiased=False).item() == 0.0


_finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False)
_junk = st.floats(allow_nan=True, allow_infinity=True)


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(st.tuples(st.lists(_finite, min_size=6, max_size=6), st.integers(0, 6)), min_size=2, max_size=4),
    junk=_junk,
)
def test_masked_whiten_ignores_values_in_masked_out_positions(rows, junk):
    values = t([row for row, _ in rows])
    mask = prefix_mask([length for _, length in rows], 6)
    if mask.sum() < 2:
        return  # the unbiased variance needs two entries; masked_var raises then (tested above)
    with_junk = torch.where(mask, values, junk)
    assert torch.equal(masked_whiten(values, mask), masked_whiten(with_junk, mask))
    assert torch.equal(masked_mean(values, mask), masked_mean(with_junk, mask))


def test_explained_variance_by_hand_and_ignores_padding():
    returns = torch.tensor([[1.0, 2.0, 3.0, float("inf")], [4.0, 5.0, float("nan"), 0.0]])
    mask = prefix_mask([3, 2], 4)
    assert explained_variance(returns, returns, mask) == 1.0  # a perfect critic
    mean = torch.full_like(returns, 3.0)  # the mean return over the 5 tokens: explains nothing
    assert explained_variance(mean, returns, mask) == pytest.approx(0.0, abs=1e-7)
    # residuals (1, 1, 1, 1, 1): a constant offset is variance the critic explains; residuals (0, 0, 0, 2, 2): by hand
    assert explained_variance(returns - 1, returns, mask) == pytest.approx(1.0)
    off = returns.clone()
    off[1, :2] -= 2
    residual_var, returns_var = (4 * 2 - 0.8 ** 2 * 5) / 5, 2.0
    assert explained_variance(off, returns, mask) == pytest.approx(1 - residual_var / returns_var)
    assert explained_variance(returns, torch.ones_like(returns), mask) != explained_variance(returns, torch.ones_like(returns), mask)  # nan
