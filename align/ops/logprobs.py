"""Per-token log-probs and entropies from logits, chunk by chunk so the float32 log-softmax of every
position over the whole vocabulary never exists at once.

Used wherever a model's log-probs of given tokens are needed: the DPO fast path (through align.models.lm_head),
evaluation and the PPO engine. Pure functions: tensors in, tensors out.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


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
