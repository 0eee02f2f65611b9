"""align.ops.kl: the k1, k2 and k3 estimators against the reference numbers, and their identities."""

from __future__ import annotations

import pytest
import torch

from align.ops.kl import token_kl
from math_reference import close, ref, t  # noqa: F401  (ref is a fixture)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_reference(ref, estimator):
    inputs = ref["inputs"]
    kl = token_kl(t(inputs["logprobs"]), t(inputs["ref_logprobs"]), t(inputs["response_mask"]), estimator)
    close(kl, ref["kl_estimators_masked"][estimator])


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
