"""Phases 1 and 2 of a PPO update: sample one response per prompt, then score the rollout.

    query, query_mask, responses, response_mask, contains_eos = sample_responses(models, records, seeds, ...)
    rollout = Rollout(records, global_rows, query, query_mask, responses, response_mask, contains_eos, texts)
    score_rollout(models, rollout, reward_fn, cfg, verifier_fn)   # old/ref log-probs, values, entropy, scores

Sampling is reproducible per row (`row_seed`, `GumbelSampler`: see align.rl.ppo); scoring runs once per
rollout, without gradients and with dropout off, so the update's first ratio is exactly 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from align.errors import AlignError
from align.models.generation import decode_ids, decodes_alone, merged_adapter, packed_linear_weights
from align.models.loading import eval_mode
from align.ops.logprobs import entropy_from_logits, logprobs_from_logits
from align.ops.responses import truncate_after_eos
from align.records import PromptRecord
from align.rl.ppo.config import CRITIC, POLICY, PPOArgs, RewardFn
from align.rl.ppo.models import PPOModels

# --------------------------------------------------------------------------------------------------
# Phase 1: generate
# --------------------------------------------------------------------------------------------------


def row_seed(seed: int, update: int, index: int) -> int:
    """The sampling seed of row `index` of update `update`'s global batch."""
    return (((seed & 0xFFFFFFFF) * 1_000_003 + update) * 1_000_033 + index) % (2**62)


class GumbelSampler:
    """A logits processor that samples each row's token from softmax(logits / T) with its own generator.

    Gumbel-max: argmax(z / T + g), g ~ Gumbel(0, 1) i.i.d. over the vocabulary, is distributed as
    softmax(z / T). The returned scores are 0 at the chosen token and -inf elsewhere, so generate()'s own
    multinomial draw can only pick it; its warpers are no-ops (top_k=0, top_p=1.0).
    """

    def __init__(self, seeds: Sequence[int], temperature: float):
        self.temperature = temperature
        # CPU generators: the draws do not depend on the device the model runs on
        self.generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]

    def pick(self, scores: Tensor, rows: Tensor) -> Tensor:
        """(len(rows),) tokens drawn for the given rows of the batch (scores: (len(rows), vocab)); only those rows'
        generators advance, so a row's draws do not depend on which others are still writing."""
        vocab = scores.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=self.generators[int(r)], dtype=torch.float64) for r in rows])
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-300))).to(scores.device)
        return (scores.double() / self.temperature + gumbel).argmax(-1)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        choice = self.pick(scores, torch.arange(len(self.generators)))
        out = torch.full_like(scores, -math.inf)
        out.scatter_(-1, choice[:, None], 0.0)
        return out


def chat_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    """The chat template's token ids for `messages` (with the assistant's generation prompt unless told otherwise)."""
    tokens = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False)
    return list(tokens["input_ids"] if hasattr(tokens, "keys") else tokens)


def left_pad(ids: Sequence[Sequence[int]], pad_token_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token id lists left-padded to the longest: (batch, width) ids and a long mask, 1 on real tokens."""
    width = max(len(x) for x in ids)
    query = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, tokens in enumerate(ids):
        query[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        mask[row, width - len(tokens):] = 1
    return query.to(device), mask.to(device)


def encode_prompts(tokenizer, records: Sequence[PromptRecord], device: torch.device) -> tuple[Tensor, Tensor]:
    """Chat-templated prompts (with the generation prompt), left-padded: (batch, query_width) ids and mask."""
    return left_pad([chat_ids(tokenizer, record.prompt) for record in records], tokenizer.pad_token_id, device)


@torch.no_grad()
def sample_responses(models: PPOModels, records: Sequence[PromptRecord], seeds: Sequence[int], *, temperature: float, max_new_tokens: int):
    """Sample one response per prompt with the policy adapter (merged into the base weights for the sampling where
    align.models.generation.merged_adapter allows: the same function up to the weights' rounding).

    Returns:
        query: (batch, query_width) left-padded prompt ids; query_mask: same, 1 on real tokens.
        responses: (batch, response_width) sampled ids, after the first EOS set to pad (response_width <=
            max_new_tokens: generation stops when every row has ended).
        response_mask: (batch, response_width) bool, True up to and including the first EOS.
        contains_eos: (batch,) bool.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    tokenizer = models.tokenizer
    query, query_mask = encode_prompts(tokenizer, records, models.device)
    # The model's own generation_config may carry top_k/top_p/repetition_penalty: every field is set here.
    config = GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, min_p=None, typical_p=1.0, repetition_penalty=1.0,
        no_repeat_ngram_size=0, max_new_tokens=max_new_tokens, min_new_tokens=0, num_beams=1,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True,
    )
    sampler = GumbelSampler(seeds, temperature)
    # merged where that is faithful: one matmul a linear layer instead of three (merged_adapter); the old
    # log-probs come from score_rollout's unmerged pass, so the update's first ratio is still exactly 1; then the
    # bf16 weights prepacked for oneDNN, bit for bit the same outputs (packed_linear_weights)
    with models.phase(POLICY), eval_mode(models.model), merged_adapter(models.model), packed_linear_weights(models.model):
        if decodes_alone(models.model):  # rows stop computing at their EOS; the same draws as generate's
            sequences = decode_ids(models.model, query, query_mask, max_new_tokens, tokenizer.eos_token_id,
                                   tokenizer.pad_token_id, pick=sampler.pick)
        else:
            sequences = models.model.generate(input_ids=query, attention_mask=query_mask, generation_config=config,
                                              logits_processor=LogitsProcessorList([sampler]))
    responses = sequences[:, query.shape[1]:]
    responses, response_mask, _, contains_eos = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return query, query_mask, responses, response_mask, contains_eos


def decode_responses(tokenizer, responses: Tensor, response_mask: Tensor) -> list[str]:
    """The text of each response's kept tokens (response_mask: (batch, response_width), True up to EOS)."""
    return [tokenizer.decode(row[mask].tolist(), skip_special_tokens=True) for row, mask in zip(responses, response_mask.bool())]


# --------------------------------------------------------------------------------------------------
# Phase 2: score (no grad, once per rollout)
# --------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One update's samples on this process. Shapes: (rows, query_width), (rows, response_width), (rows,)."""

    records: list[PromptRecord]
    global_rows: Tensor  # (rows,) index of each row in the global batch
    query: Tensor
    query_mask: Tensor
    responses: Tensor
    response_mask: Tensor
    contains_eos: Tensor
    texts: list[str]
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    old_values: Tensor | None = None
    entropy: Tensor | None = None
    raw_scores: Tensor | None = None  # reward before the missing-EOS penalty
    scores: Tensor | None = None
    verifier: Tensor | None = None
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.query, self.responses], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.query_mask, self.response_mask.long()], dim=1)

    def __len__(self) -> int:
        return len(self.records)


def policy_forward(models: PPOModels, rollout: Rollout, rows: Tensor, temperature: float, with_entropy: bool = False):
    """Token log-probs of the sampled responses under the active adapter (policy, or none = reference).

    Returns (rows, response_width) log-probs, and per-token entropies when asked.
    """
    logprobs, entropy, _ = _policy_pass(models, rollout, rows, temperature, with_entropy)
    return logprobs, entropy


def policy_and_values_forward(models: PPOModels, rollout: Rollout, rows: Tensor, temperature: float, with_entropy: bool = False):
    """--critic shared: one pass of the policy gives its token log-probs (and entropies when asked) and, from the
    same last hidden state, the values V_t: (rows, response_width) each."""
    logprobs, entropy, hidden = _policy_pass(models, rollout, rows, temperature, with_entropy)
    return logprobs, entropy, values_from_hidden(models, hidden)


def _policy_pass(models: PPOModels, rollout: Rollout, rows: Tensor, temperature: float, with_entropy: bool):
    """(log-probs, entropies or None, the response positions' hidden states (rows, response_width, hidden))."""
    hidden = _rows_response_hidden(models, rollout, rows)
    logits = models.lm_head(hidden)
    logprobs = logprobs_from_logits(logits, rollout.responses[rows], temperature)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach(), temperature)
    return logprobs, entropy, hidden


def critic_forward(models: PPOModels, rollout: Rollout, rows: Tensor) -> Tensor:
    """(rows, response_width) value estimates V_t, read where the policy's logits for token t are."""
    return values_from_hidden(models, _rows_response_hidden(models, rollout, rows))


def _rows_response_hidden(models: PPOModels, rollout: Rollout, rows: Tensor) -> Tensor:
    """(rows, response_width, hidden): the active adapter's hidden states where response tokens are predicted."""
    ids, mask = rollout.input_ids[rows], rollout.attention_mask[rows]
    return models.response_hidden(ids, mask, rollout.query.shape[1], rollout.responses.shape[1])


def values_from_hidden(models: PPOModels, hidden: Tensor) -> Tensor:
    """(rows, response_width, hidden) -> (rows, response_width) values from the value head."""
    return models.value_head(hidden.to(models.value_head.weight.dtype)).squeeze(-1)


def _batches(n: int, size: int, device: torch.device) -> Iterator[Tensor]:
    for start in range(0, n, size):
        yield torch.arange(start, min(n, start + size), device=device)


def apply_missing_eos_penalty(scores: Tensor, contains_eos: Tensor, penalty: float) -> Tensor:
    """Subtract `penalty` from the score of every response that never emitted EOS (TRL's
    `missing_eos_penalty`), so that running into the length limit is never the best strategy.

    Args:
        scores: (batch,) reward-model scores.
        contains_eos: (batch,) bool, from `align.ops.responses.truncate_after_eos`.
        penalty: a non-negative amount.

    Returns:
        (batch,) penalised scores.
    """
    return torch.where(contains_eos.bool(), scores, scores - penalty)


@torch.no_grad()
def score_rollout(models: PPOModels, rollout: Rollout, reward_fn: RewardFn, cfg: PPOArgs, verifier_fn: RewardFn | None) -> None:
    """Fill old/ref log-probs, values, entropy and scores of `rollout` (dropout off, no grad)."""
    n, size = len(rollout), cfg.forward_batch_size
    old, ref, values, entropy = [], [], [], []
    with eval_mode(models.model):
        with models.phase(POLICY):
            for rows in _batches(n, size, models.device):
                if models.shared_critic:  # the values come from the policy's own pass
                    lp, ent, v = policy_and_values_forward(models, rollout, rows, cfg.temperature, with_entropy=True)
                    values.append(v)
                else:
                    lp, ent = policy_forward(models, rollout, rows, cfg.temperature, with_entropy=True)
                old.append(lp)
                entropy.append(ent)
        with models.phase(None):
            for rows in _batches(n, size, models.device):
                ref.append(policy_forward(models, rollout, rows, cfg.temperature)[0])
        if not models.shared_critic:
            with models.phase(CRITIC):
                for rows in _batches(n, size, models.device):
                    values.append(critic_forward(models, rollout, rows))
    rollout.old_logprobs, rollout.ref_logprobs = torch.cat(old), torch.cat(ref)
    rollout.old_values, rollout.entropy = torch.cat(values).float(), torch.cat(entropy)
    raw = torch.tensor(reward_fn(rollout.records, rollout.texts), dtype=torch.float32, device=models.device).reshape(-1)
    if raw.numel() != n:
        raise AlignError(f"reward: returned {raw.numel()} scores for {n} responses")
    rollout.raw_scores = raw
    rollout.scores = raw if cfg.missing_eos_penalty is None else apply_missing_eos_penalty(raw, rollout.contains_eos, cfg.missing_eos_penalty)
    if verifier_fn is not None:
        rollout.verifier = torch.tensor(verifier_fn(rollout.records, rollout.texts), dtype=torch.float32, device=models.device)
