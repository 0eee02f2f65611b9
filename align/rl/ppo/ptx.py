"""PPO-ptx: the negative log-likelihood of demonstrations added to the policy's loss at every optimizer step.

InstructGPT (Ouyang et al. 2022, eq. 2) mixes a likelihood term into the PPO objective so that RL does not unlearn
what the model could already do; OpenRLHF calls it `--pretrain_data` / `--ptx_coef`. Here its data is a
demonstration set in any SFT format (`--ptx_data ifprefs:sft`): the loss is the token mean of -log pi(reply) over the
final assistant turn of each demonstration, under the policy adapter, at temperature 1. The policy's loss is then

    pg_loss + ptx_coef * ptx_nll

with one batch of `ptx_batch_size` demonstrations (over all processes) per optimizer step, in a seeded order that
depends only on the step (so a resumed run sees the same demonstrations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from align.errors import DataError
from align.ops.masked import masked_mean
from align.records import PromptRecord, SFTExample
from align.rl.ppo.rollout import Rollout, chat_ids, left_pad


def ptx_loss(logprobs: Tensor, mask: Tensor) -> Tensor:
    """Token-mean negative log-likelihood of the demonstrations' reply tokens.

    Args:
        logprobs: (batch, reply_width) log pi(token) of each reply token under the policy.
        mask: (batch, reply_width) bool, True on real reply tokens.
    Returns a scalar: -sum(logprobs * mask) / sum(mask).
    """
    return -masked_mean(logprobs, mask)


@dataclass
class Demonstration:
    """One demonstration as token ids: the chat-templated prompt (with the generation prompt) and the reply up to
    and including EOS."""

    prompt_ids: list[int]
    reply_ids: list[int]
    record: PromptRecord


def encode_demonstrations(tokenizer, examples: Sequence[SFTExample], max_length: int) -> tuple[list[Demonstration], int]:
    """Token ids of each example's last assistant turn and the conversation before it, as the policy would see them.

    The prompt is the chat template of the messages before the last assistant turn with the generation prompt (what
    the rollouts are sampled from); the reply is what the template adds for that turn, cut after its first EOS (a
    template that writes none gets EOS appended). Earlier assistant turns are context, not trained on. Returns the
    demonstrations and how many were skipped for being longer than `max_length` tokens in all.
    Raises DataError naming the example when the template does not extend the prompt with the reply.
    """
    eos = tokenizer.eos_token_id
    kept, too_long = [], 0
    for example in examples:
        last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
        context = example.messages[:last]
        if not context or context[-1]["role"] != "user":
            raise DataError(f"{example.source}: field 'messages': the last assistant turn must follow a user turn")
        prompt_ids = chat_ids(tokenizer, context)
        full_ids = chat_ids(tokenizer, example.messages[:last + 1], add_generation_prompt=False)
        if full_ids[:len(prompt_ids)] != prompt_ids:
            raise DataError(f"{example.source}: the chat template does not write the reply after the prompt's generation "
                            "prompt, so the reply's tokens cannot be told apart")
        reply_ids = full_ids[len(prompt_ids):]
        reply_ids = reply_ids[:reply_ids.index(eos) + 1] if eos in reply_ids else reply_ids + [eos]
        if len(prompt_ids) + len(reply_ids) > max_length:
            too_long += 1
            continue
        kept.append(Demonstration(prompt_ids, reply_ids, PromptRecord(prompt=context, source=example.source)))
    return kept, too_long


def demonstration_indices(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Which of `n` demonstrations optimizer step `step` trains on, over all processes: global positions
    [step * batch_size, (step + 1) * batch_size) of a fresh seeded shuffle per pass over the data."""
    picked, orders = [], {}
    for position in range(step * batch_size, (step + 1) * batch_size):
        data_epoch, offset = divmod(position, n)
        if data_epoch not in orders:
            orders[data_epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + 104_729 + data_epoch))
        picked.append(int(orders[data_epoch][offset]))
    return picked


def process_share(items: Sequence, rank: int, world: int) -> list:
    """Process `rank`'s consecutive share of `items` (whose length is a multiple of `world`)."""
    per_rank = len(items) // world
    return list(items[rank * per_rank:(rank + 1) * per_rank])


def demonstration_batch(demos: Sequence[Demonstration], pad_token_id: int, device: torch.device) -> Rollout:
    """The demonstrations as a Rollout (prompts left-padded, replies right-padded), so the policy scores their replies
    with the same pass as its own samples (align.rl.ppo.rollout.policy_forward)."""
    query, query_mask = left_pad([d.prompt_ids for d in demos], pad_token_id, device)
    r_width = max(len(d.reply_ids) for d in demos)
    replies = torch.full((len(demos), r_width), pad_token_id, dtype=torch.long)
    reply_mask = torch.zeros((len(demos), r_width), dtype=torch.bool)
    for row, d in enumerate(demos):
        replies[row, :len(d.reply_ids)] = torch.tensor(d.reply_ids)
        reply_mask[row, :len(d.reply_ids)] = True
    return Rollout([d.record for d in demos], torch.arange(len(demos)), query, query_mask, replies.to(device),
                   reply_mask.to(device), torch.ones(len(demos), dtype=torch.bool), texts=[])
