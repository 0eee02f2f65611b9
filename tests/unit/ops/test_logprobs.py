"""align.ops.logprobs: chunked token log-probs and entropies equal the naive log-softmax, in value, dtype and gradient."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from align.ops.logprobs import entropy_from_logits, logprobs_from_logits


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
