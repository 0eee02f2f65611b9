"""Log-probs of replies: left-padded rows, position ids as generate() uses them, the last tokens' log-probs."""

from __future__ import annotations


import torch

from align.errors import AlignError
from align.records import Message


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding), as generate() uses.

    Args:
        attention_mask: (batch, seq_len), 1 on real tokens.

    Returns:
        (batch, seq_len) int64; padding positions get 0 (they are masked out anyway).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def last_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_last: int, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of the last `n_last` tokens of each row under `model` (logits divided by temperature).

    Only the logits of those positions are computed (`logits_to_keep`), so memory is
    batch x n_last x vocab, not batch x seq_len x vocab.

    Args:
        input_ids: (batch, seq_len) left-padded rows; their last n_last tokens are scored.
        attention_mask: (batch, seq_len), 1 where the token is real.
        n_last: number of final positions to score, < seq_len.

    Returns:
        (batch, n_last) float32 log-probs; entries at masked-out positions are meaningless.
    """
    from align.ops.logprobs import logprobs_from_logits

    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=left_padded_positions(attention_mask),
        logits_to_keep=n_last + 1, use_cache=False,
    )
    logits = out.logits[:, -(n_last + 1) : -1]
    return logprobs_from_logits(logits, input_ids[:, -n_last:], temperature).float()


def encode_reply(tokenizer, prompt: list[Message], reply: str) -> tuple[list[int], list[int]]:
    """(prompt ids with the generation prompt, reply ids) under the chat template.

    The reply ids are what the template puts after the prompt, cut after the first EOS (kept): for ChatML
    the content and `<|im_end|>`, without the template's trailing newline, the tokens the policy emits.
    """
    prefix_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=False)
    prefix = tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
    full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if full[: len(prefix)] != prefix:
        raise AlignError("the chat template does not render the prompt as a prefix of prompt + reply; cannot score replies")
    reply_ids = full[len(prefix) :]
    eos = tokenizer.eos_token_id
    if eos in reply_ids:
        reply_ids = reply_ids[: reply_ids.index(eos) + 1]
    return prefix, reply_ids


def pad_rows(rows: list[list[int]], pad_id: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one (len(rows), longest) int64 batch and its attention mask (1 on real tokens).

    side "left" puts the padding before each row (prompts to continue), "right" after it (continuations of a cache).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side: expected 'left' or 'right', got {side!r}")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols] = torch.tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_rows(rows, pad_id, "left")


@torch.no_grad()
def reply_logps(model, tokenizer, prompts: list[list[Message]], replies: list[str], batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed log-prob, token count) of each reply given its prompt, teacher-forced (see `encode_reply`)."""
    device = next(model.parameters()).device
    encoded = [encode_reply(tokenizer, p, r) for p, r in zip(prompts, replies, strict=True)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))  # little padding
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = [encoded[i] for i in rows]
        ids, mask = left_pad([p + r for p, r in batch], tokenizer.pad_token_id)
        n_last = max(len(r) for _, r in batch)
        token_logps = last_token_logps(model, ids.to(device), mask.to(device), n_last)
        for row, (i, (_, r)) in enumerate(zip(rows, batch)):
            out[i] = (float(token_logps[row, n_last - len(r) :].sum()), len(r))
    return out




@torch.no_grad()
def pair_logps(model, tokenizer, prompts: list[list[Message]], chosen: list[str], rejected: list[str],
               batch_size: int = 8) -> tuple[list[tuple[float, int]], list[tuple[float, int]]]:
    """reply_logps of the chosen and of the rejected replies, each prompt run once for both.

    A batch of pairs runs its left-padded prompts with a KV cache, then both replies of every pair as one
    continuation of that cache (rows chosen, rejected, chosen, ... after `batch_repeat_interleave(2)`, right-padded,
    positions continuing the prompt's): the same conditional log-probs as two reply_logps calls up to float
    rounding, from ~3/4 of their tokens (a prompt is about as long as a reply on ifprefs). `batch_size` counts
    rows of logits, as in reply_logps: batch_size // 2 pairs at a time.

    Returns:
        (chosen, rejected): per pair (summed log-prob, token count) of the reply given its prompt.
    """
    from align.models.generation import virtual_token_method
    from align.ops.logprobs import logprobs_from_logits

    if virtual_token_method(model) is not None:  # peft puts its virtual tokens in front of every call: no shared cache
        return (reply_logps(model, tokenizer, prompts, chosen, batch_size),
                reply_logps(model, tokenizer, prompts, rejected, batch_size))
    device = next(model.parameters()).device
    encoded = []
    for prompt, c, r in zip(prompts, chosen, rejected, strict=True):
        prefix, c_ids = encode_reply(tokenizer, prompt, c)
        encoded.append((prefix, c_ids, encode_reply(tokenizer, prompt, r)[1]))
    # batched by the longer reply first: replies vary more than prompts and are padded twice per pair (on the
    # default model's held-out pairs 20,192 computed positions against 24,488 batched by prompt length)
    order = sorted(range(len(encoded)), key=lambda i: (max(len(encoded[i][1]), len(encoded[i][2])), len(encoded[i][0])))
    out_c: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    out_r: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    pairs_per_batch = max(1, batch_size // 2)
    for start in range(0, len(order), pairs_per_batch):
        rows = order[start : start + pairs_per_batch]
        ids, mask = left_pad([encoded[i][0] for i in rows], tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        prefill = model(input_ids=ids, attention_mask=mask, position_ids=left_padded_positions(mask), use_cache=True,
                        logits_to_keep=1)
        first = torch.log_softmax(prefill.logits[:, -1].float(), dim=-1).repeat_interleave(2, dim=0)  # (2b, vocab)
        cache = prefill.cache  # transformers 5: the KV cache (past_key_values before)
        cache.batch_repeat_interleave(2)
        replies = [reply for i in rows for reply in (encoded[i][1], encoded[i][2])]
        reply_ids, reply_mask = pad_rows(replies, tokenizer.pad_token_id, "right")
        reply_ids, reply_mask = reply_ids.to(device), reply_mask.to(device)
        width = reply_ids.shape[1]
        prompt_mask = mask.repeat_interleave(2, dim=0)
        positions = prompt_mask.sum(-1, keepdim=True) + torch.arange(width, device=device)
        rest = model(input_ids=reply_ids, attention_mask=torch.cat([prompt_mask, reply_mask], dim=1), position_ids=positions,
                     cache=cache, use_cache=True).logits[:, :-1]  # position j predicts reply token j + 1
        token_logps = torch.cat([first.gather(-1, reply_ids[:, :1]),
                                 logprobs_from_logits(rest, reply_ids[:, 1:]).float()], dim=1) * reply_mask
        for j, i in enumerate(rows):
            c, r = 2 * j, 2 * j + 1
            out_c[i] = (float(token_logps[c].sum()), int(reply_mask[c].sum()))
            out_r[i] = (float(token_logps[r].sum()), int(reply_mask[r].sum()))
    return out_c, out_r
