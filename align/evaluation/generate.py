"""Generation settings (greedy, sampling, beams, repetition controls) and batched generation of replies."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from align.log import get_logger
from align.models.generation import decode_ids, decodes_alone, generate_ids
from align.records import Message
from align.evaluation.args import EvalArgs
from align.evaluation.logprobs import left_pad, last_token_logps
from align.evaluation.policy import Policy, reference_of

logger = get_logger(__name__, tag="eval")


@dataclass
class Generation:
    reply: str
    length_tokens: int  # generated tokens before EOS
    eos: bool
    seed: int | None
    kl_k1: float | None = None
    kl_k3: float | None = None


@dataclass(frozen=True)
class GenerationSettings:
    """How one mode's replies are generated: the record a summary and every generations.jsonl row carry.

    Fields that do not apply to the mode are None (greedy: temperature, top_p, top_k; sample: num_beams).
    """

    mode: str
    max_new_tokens: int
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_beams: int | None = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """'greedy', 'greedy + repetition_penalty 1.2', 'beam search 4', 'sample (temperature 0.7, top_p 0.9)'."""
        if self.mode == "sample":
            parts = [f"{k} {getattr(self, k):g}" for k, off in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0))
                     if getattr(self, k) != off]
            head = f"sample ({', '.join(parts)})" if parts else "sample"
        else:
            head = f"beam search {self.num_beams}" if self.num_beams and self.num_beams > 1 else "greedy"
        extras = [f"{k} {getattr(self, k):g}" for k, off in (("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0))
                  if getattr(self, k) != off]
        return " + ".join([head, *extras])

    def generation_config(self, tokenizer):
        from transformers import GenerationConfig

        common = dict(max_new_tokens=self.max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      repetition_penalty=self.repetition_penalty, no_repeat_ngram_size=self.no_repeat_ngram_size)
        if self.mode == "greedy":
            # early_stopping: a beam that emitted EOS ends the search once num_beams such beams exist (the
            # replies are then as long as the best one needs, not always the token limit)
            beams = dict(num_beams=self.num_beams, early_stopping=True) if self.num_beams and self.num_beams > 1 else {}
            return GenerationConfig(do_sample=False, **beams, **common)
        # top_k=0 switches off generate()'s default top-k of 50: the samples must come from the whole
        # (tempered) distribution for the KL estimate to be unbiased.
        return GenerationConfig(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, **common)


def settings_for(mode: str, cfg: EvalArgs) -> GenerationSettings:
    """The generation settings of `mode` under `cfg` (see GenerationSettings for which fields apply)."""
    common = dict(max_new_tokens=cfg.max_new_tokens, repetition_penalty=cfg.repetition_penalty,
                  no_repeat_ngram_size=cfg.no_repeat_ngram_size)
    if mode == "greedy":
        return GenerationSettings("greedy", num_beams=cfg.num_beams, **common)
    return GenerationSettings("sample", num_beams=None, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, **common)


@torch.no_grad()
def generate(policy: Policy, prompts: list[list[Message]], mode: str, cfg: EvalArgs, log=None) -> list[Generation]:
    """Replies to `prompts` in batches of cfg.generate_batch_size with left padding; KL per reply in mode
    'sample', scored in chunks of cfg.batch_size rows.

    Batch i of mode 'sample' is drawn after torch.manual_seed(cfg.seed + i), so the same settings (seed,
    generation batch size, prompt order) give the same replies. Plain greedy decoding (one beam, no repetition
    controls) batches the prompts by length and stops computing each row at its EOS (`decode_ids`); the replies come
    back in the prompts' order.
    """
    from align.ops.kl import token_kl
    from align.ops.responses import truncate_after_eos

    model, tokenizer = policy.model, policy.tokenizer
    device = next(model.parameters()).device
    settings = settings_for(mode, cfg)
    gen_config = settings.generation_config(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = [tokenizer(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for p in prompts]
    # Plain greedy decoding runs prompts of similar length together (less padding) and drops each row once it ends
    # (decode_ids); its replies do not depend on the batching. Sampling keeps the given order: its batches are seeded.
    plain_greedy = (settings.mode == "greedy" and (settings.num_beams or 1) == 1 and settings.repetition_penalty == 1.0
                    and settings.no_repeat_ngram_size == 0 and decodes_alone(model))
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i])) if plain_greedy else list(range(len(prompts)))
    results: list[Generation | None] = [None] * len(prompts)
    done = 0
    start_time = time.time()
    for batch_index, start in enumerate(range(0, len(prompts), cfg.generate_batch_size)):
        indices = order[start : start + cfg.generate_batch_size]
        ids, mask = left_pad([encoded[i] for i in indices], pad)
        ids, mask = ids.to(device), mask.to(device)
        seed = cfg.seed + batch_index if mode == "sample" else None
        if seed is not None:
            torch.manual_seed(seed)
        if plain_greedy:
            sequences = decode_ids(model, ids, mask, settings.max_new_tokens, eos, pad)
        else:
            sequences = generate_ids(model, ids, mask, generation_config=gen_config)
        responses, response_mask, _, contains_eos = truncate_after_eos(sequences[:, ids.shape[1] :], eos, pad)
        kl_k1 = kl_k3 = [None] * len(indices)
        if mode == "sample" and policy.has_reference:
            if policy.is_own_reference:
                kl_k1 = kl_k3 = [0.0] * len(indices)  # the policy is its reference: KL is exactly 0
            else:
                full_ids = torch.cat([ids, responses], dim=1)
                full_mask = torch.cat([mask, response_mask.long()], dim=1)
                n = responses.shape[1]
                kl_k1, kl_k3 = [], []
                for rows in torch.arange(len(indices)).split(cfg.batch_size):  # logits are rows x n x vocab
                    logps = last_token_logps(model, full_ids[rows], full_mask[rows], n, cfg.temperature)
                    with reference_of(policy) as reference:
                        ref_logps = last_token_logps(reference, full_ids[rows], full_mask[rows], n, cfg.temperature)
                    kl_k1 += token_kl(logps, ref_logps, response_mask[rows], "k1").sum(-1).tolist()
                    kl_k3 += token_kl(logps, ref_logps, response_mask[rows], "k3").sum(-1).tolist()
        for row, i in enumerate(indices):
            n_tokens = int(response_mask[row].sum()) - int(contains_eos[row])
            text = tokenizer.decode(responses[row, :n_tokens].tolist(), skip_special_tokens=True)
            results[i] = Generation(text, n_tokens, bool(contains_eos[row]), seed, kl_k1[row], kl_k3[row])
        done += len(indices)
        if log:
            log(f"generate {mode}: {done}/{len(prompts)} prompts, {time.time() - start_time:.1f} s")
    return results


