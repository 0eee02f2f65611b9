"""Scoring text with a trained reward model: the one call that PPO and evaluation use.

    from align.models.reward_model import load_reward_model, score_texts
    model, tokenizer = load_reward_model("outputs/reward")
    scores = score_texts(model, tokenizer, prompts, replies)   # list[float], higher = preferred

A reward model is a sequence-classification model with one output (Bradley-Terry score), saved by
recipes/reward.py as a PEFT adapter directory (LoRA plus the `score` head in modules_to_save) or as a full
model. Text is formatted exactly as TRL's RewardTrainer formats it in training: the chat template applied
to prompt + [assistant reply], right-padded, the score read at the last real token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from align.errors import AlignError
from align.evaluation.logprobs import pad_rows
from align.models.loading import ModelArgs, load_model, load_tokenizer, resolve_dtype
from align.records import Message


def load_reward_model(path: str, *, dtype: str = "auto", quantization: str = "none"):
    """Load a reward model saved by recipes/reward.py (adapter dir or full model); eval mode, frozen."""
    from transformers import AutoModelForSequenceClassification

    root = Path(path)
    cand = root / "adapter" if (root / "adapter" / "adapter_config.json").is_file() else root
    if (cand / "adapter_config.json").is_file():
        from peft import PeftModel

        base_name = json.loads((cand / "adapter_config.json").read_text())["base_model_name_or_path"]
        base, tokenizer = load_model(ModelArgs(model_name_or_path=base_name, dtype=dtype, quantization=quantization), task="reward", lora=False)
        model = PeftModel.from_pretrained(base, str(cand), is_trainable=False)
    elif (cand / "config.json").is_file():
        tokenizer = load_tokenizer(str(cand))
        model = AutoModelForSequenceClassification.from_pretrained(str(cand), num_labels=1, dtype=resolve_dtype(dtype), use_safetensors=True)
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        raise AlignError(f"reward model {path}: no adapter_config.json or config.json found")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def score_head_in_float32(model) -> int:
    """Keep the trainable score head in float32 and feed it float32; returns the number of head layers changed.

    With a quantized base, TRL's RewardTrainer casts every trainable parameter to bf16 (the QLoRA paper's
    advice for adapters, whose inputs PEFT casts to match), the score head too; but the hidden states that
    reach the head are float32 (float32 compute, or the norms that `prepare_model_for_kbit_training` keeps in
    float32), and the head's matmul refuses the mix. Call after the trainer is built (Float32ScoreHeadMixin).
    """
    changed = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "score" in name.split(".") and not name.endswith("original_module"):
            if not any(p.requires_grad for p in module.parameters()):
                continue
            module.float()
            module.register_forward_pre_hook(lambda m, args: tuple(a.float() if torch.is_tensor(a) else a for a in args))
            changed += 1
    return changed


class Float32ScoreHeadMixin:
    """Mixed into TRL's RewardTrainer (before it): on a quantized model, `score_head_in_float32` right after
    the trainer's own __init__, which is where TRL casts the head to bf16."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from align.models.loading import is_quantized

        if is_quantized(self.model):
            score_head_in_float32(self.model)


def encode_conversations(tokenizer, prompts: list[list[Message]], replies: list[str], max_length: int | None = None) -> list[list[int]]:
    """Token ids of prompt + assistant reply under the chat template (as TRL's RewardTrainer builds them)."""
    out = []
    for prompt, reply in zip(prompts, replies, strict=True):
        ids = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        out.append(list(ids[:max_length] if max_length else ids))
    return out


def _last_token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch,) scores read at each row's last attended token (right padding)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits = out.logits.squeeze(-1)
    if logits.dim() == 2:  # a model that returns per-token scores
        last = attention_mask.sum(-1) - 1
        logits = logits.gather(1, last[:, None]).squeeze(1)
    return logits.float()


@torch.no_grad()
def score_pairs(model, tokenizer, prompts: list[list[Message]], chosen: list[str], rejected: list[str], batch_size: int = 8,
                max_length: int | None = None) -> tuple[list[float], list[float]]:
    """Reward-model scores of (prompt, chosen) and (prompt, rejected), each pair as one row: the two sequences' common
    start computed once (align.trainers.reward_fast; the scores equal `score_texts`' to float rounding). Falls back to
    `score_texts` twice where a pair cannot be one row (align.trainers.reward_fast.pair_scores_unsupported)."""
    from align.trainers.reward_fast import add_pair_scores, pair_rows, pair_scores_unsupported

    if pair_scores_unsupported(model):
        return (score_texts(model, tokenizer, prompts, chosen, batch_size, max_length),
                score_texts(model, tokenizer, prompts, rejected, batch_size, max_length))
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    add_pair_scores(inner)
    device = next(model.parameters()).device
    chosen_ids = encode_conversations(tokenizer, prompts, chosen, max_length)
    rejected_ids = encode_conversations(tokenizer, prompts, rejected, max_length)
    order = sorted(range(len(prompts)), key=lambda i: len(chosen_ids[i]) + len(rejected_ids[i]))  # less padding
    scores: dict[int, tuple[float, float]] = {}
    for start in range(0, len(order), batch_size):
        pairs = order[start:start + batch_size]
        input_ids, attention_mask = pad_rows([chosen_ids[i] for i in pairs] + [rejected_ids[i] for i in pairs],
                                             tokenizer.pad_token_id, "right")
        rows = pair_rows(input_ids.to(device), attention_mask.to(device), inner.config.pad_token_id)
        values = model(align_pair_rows=rows).logits.squeeze(-1).float().tolist()
        for k, i in enumerate(pairs):
            scores[i] = (values[k], values[len(pairs) + k])
    return [scores[i][0] for i in range(len(prompts))], [scores[i][1] for i in range(len(prompts))]


@torch.no_grad()
def score_texts(model, tokenizer, prompts: list[list[Message]], replies: list[str], batch_size: int = 8, max_length: int | None = None) -> list[float]:
    """Reward-model scores of each (prompt, reply): a list of floats, higher = preferred."""
    device = next(model.parameters()).device
    ids = encode_conversations(tokenizer, prompts, replies, max_length)
    scores: list[float] = []
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # group by length: less padding
    by_index: dict[int, float] = {}
    for start in range(0, len(order), batch_size):
        input_ids, attention_mask = pad_rows([ids[i] for i in order[start:start + batch_size]], tokenizer.pad_token_id, "right")
        values = _last_token_scores(model, input_ids.to(device), attention_mask.to(device))
        for i, v in zip(order[start:start + batch_size], values.tolist()):
            by_index[i] = v
    scores = [by_index[i] for i in range(len(ids))]
    return scores
