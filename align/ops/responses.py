"""Sampled responses as tensors: cut each one after its first EOS.

Used by the PPO rollout and by evaluation's sampled replies. `responses` are right-padded
`(batch, response_len)` token ids; the masks returned are True where the token counts.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
