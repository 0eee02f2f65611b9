"""Evaluate one policy: generate replies to a fixed prompt set with stated sampling settings, score every
reply, and write every generation and every score as JSON lines, so that no number downstream (the
comparison report) is unverifiable.

    align eval outputs/dpo --max_prompts 50 --reward_model outputs/reward
    align eval base --modes greedy                              # the untrained default model
    python eval/evaluate.py outputs/dpo                         # the same command, as a script in a checkout

    from align.evaluation import EvalArgs, evaluate
    summary = evaluate("outputs/dpo", EvalArgs(max_prompts=50))

What is evaluated (the policy) and against what (its reference, for KL and DPO's implicit reward):

    base or a model directory   the model itself; it is its own reference (KL = 0, implicit reward = 0)
    a run with a LoRA adapter   the adapter on its base; the reference is the base with the adapter disabled
    a run with a merged model   the full model; the reference is --ref_model, else the run's
                                config.yaml model_name_or_path (without either, KL is not computed)

Written to OUT (default RUN/eval; for `base`, outputs/base/eval):

    generations.jsonl  one line per (prompt, sampling mode): prompt id and messages, the reply, mode, seed,
                       temperature, the mode's generation settings ("generation"), coherent_strict (the headline: strict pass AND not degenerate),
                       degenerate and its reasons (align.degeneration), unasked_format(s) (formats no
                       constraint asked for: align.degeneration.unasked_formats), the verifier's per-constraint
                       results, score and strict pass, the reward-model score, length in tokens and words, whether it ended with EOS,
                       distinct-1/2, the share of repeated 4-grams, whether it loops to the token limit, and the
                       per-sequence KL estimates
    prefs.jsonl        one line per held-out preference pair: reward-model scores of chosen and rejected,
                       policy and reference log-probs of both, and DPO's implicit rewards
    ppl.jsonl          one line per held-out SFT reply: its token count and summed negative log-likelihood
    summary.json       the settings (what must match for two evaluations to be compared), the prompt
                       fingerprint, the mean of every metric, timing and peak memory

KL(policy || reference) is estimated on the policy's own samples (mode "sample") as the per-sequence sum
over response tokens of k1 = log p - log p_ref (unbiased) and of k3 = (r - 1) - log r with
r = p_ref / p (unbiased, never negative) [Schulman20, see align.ppo_math]. With the default sampling
(temperature 1, no top-p, no top-k) the samples are drawn from the policy itself, so this is the KL of the
RLHF objective. With another temperature both models' logits are divided by it, so it is the KL between
the tempered distributions that were sampled. Greedy replies are not samples of the policy; they carry no
KL.

Repetition follows Welleck et al. 2019 ("Neural Text Generation with Unlikelihood Training",
arXiv:1908.04319): distinct-n is the number of unique n-grams over the number of n-grams of one reply,
and the repeated 4-gram share (their seq-rep-4) is 1 - distinct-4. Words are lower-cased whitespace
tokens, so the numbers do not depend on the policy's tokenizer. A reply loops to the limit when it did not
end with EOS within max_new_tokens AND align.degeneration finds it degenerate: the failure the generation
controls (--repetition_penalty, --no_repeat_ngram_size, --num_beams, sampling) are meant to change.

Generation controls: each mode generates with one `GenerationSettings` record (`settings_for`), written
into every generations.jsonl row ("generation") and each mode's summary block, so every number says how
its replies were generated. Greedy mode takes repetition_penalty, no_repeat_ngram_size and num_beams (beam
search when > 1); sample mode takes temperature, top_p, top_k, repetition_penalty and no_repeat_ngram_size.
bench/generation_settings.py evaluates one model under a list of settings and tabulates the repetition.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
import yaml

from align.config import arg, parse_config
from align.degeneration import Degeneration, check_reply, unasked_formats
from align.errors import AlignError, ConfigError, cli_main
from align.io import atomic_write_json, atomic_write_text
from align.log import get_logger
from align.records import Message

logger = get_logger(__name__, tag="eval")
MODES = ("greedy", "sample")
DEFAULT_BETA = 0.1  # DPO's beta when the run's config.yaml names none (TRL's default)
REPEAT_N = 4

# Settings that must be equal for two evaluations to be compared (align.report checks them).
COMPARABLE_SETTINGS = (
    "prompts", "max_prompts", "modes", "max_new_tokens", "temperature", "top_p", "seed",
    "pref_data", "max_pairs", "ppl_data", "max_ppl_rows",
    "top_k", "repetition_penalty", "no_repeat_ngram_size", "num_beams",
)
# What a summary.json written before these controls existed generated with (align.report compares with these).
SETTING_DEFAULTS = {"top_k": 0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "num_beams": 1}


@dataclass
class EvalArgs:
    prompts: str = arg("ifprefs:eval", "prompts to generate for: a prompt file, a preference test set, or a built-in NAME:SPLIT")
    out: str | None = arg(None, "output directory; none = RUN/eval (outputs/base/eval for base)")
    max_prompts: int = arg(100, "use the first N prompts")
    max_new_tokens: int = arg(128, "longest reply, in tokens")
    generate_batch_size: int = arg(64, "prompts generated for together (larger batches generate faster; mode sample seeds each batch)")
    batch_size: int = arg(16, "rows per scoring batch (log-probs, KL, reward model)")
    merge_adapter: Literal["auto", "true", "false"] = arg(
        "auto", "generate and score with the LoRA adapter folded into a copy of the weights (faster; the reference stays "
                "the base with the adapter off); auto = on a CPU, where it is 1.2x faster, not on a GPU, where the copy "
                "would double the weights' memory")
    modes: list[str] = arg(["greedy", "sample"], "sampling modes: greedy and/or sample (temperature, top_p, seed below)")
    temperature: float = arg(1.0, "sampling temperature of mode 'sample' (1 = the policy's own distribution)")
    top_p: float = arg(1.0, "nucleus sampling of mode 'sample' (1 = off; below 1 the KL estimate is biased)")
    top_k: int = arg(0, "mode 'sample': sample from the k most likely tokens only (0 = off; on, the KL estimate is biased)")
    repetition_penalty: float = arg(1.0, "both modes: divide a repeated token's positive logit by this (CTRL; 1 = off)")
    no_repeat_ngram_size: int = arg(0, "both modes: never generate an n-gram of this many tokens twice in one reply (0 = off)")
    num_beams: int = arg(1, "mode 'greedy': beam search over this many beams (1 = greedy decoding)")
    seed: int = arg(0, "sampling seed; batch i is sampled after torch.manual_seed(seed + i)")
    reward_model: str | None = arg(None, "a reward model directory (recipes/reward.py output) to score replies and pairs")
    ref_model: str | None = arg(None, "reference model for a merged run; none = the run's config.yaml model_name_or_path")
    pref_data: str | None = arg("ifprefs:prefs_test", "held-out preference pairs for preference accuracy; none = skip")
    max_pairs: int = arg(100, "use the first N pairs of pref_data")
    ppl_data: str | None = arg("ifprefs:sft_test", "held-out SFT conversations whose last reply's perplexity is measured; none = skip")
    max_ppl_rows: int = arg(50, "use the first N conversations of ppl_data")
    beta: float | None = arg(None, "DPO beta of the implicit reward; none = the run's config.yaml beta, else 0.1")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = arg("auto", "compute dtype; auto = bf16 where the hardware has it, else fp32")
    overwrite: bool = arg(False, "out holds an earlier evaluation (or report): move it aside to <out>.old-<time> first")

    def validate(self) -> None:
        for name in ("max_prompts", "max_new_tokens", "generate_batch_size", "batch_size", "max_pairs", "max_ppl_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config: {name}: expected a positive number, got {getattr(self, name)}")
        if not self.modes:
            raise ConfigError("config: modes: expected at least one of greedy, sample")
        for mode in self.modes:
            if mode not in MODES:
                raise ConfigError(f"config: modes: unknown mode {mode!r}; expected greedy and/or sample")
        if len(set(self.modes)) != len(self.modes):
            raise ConfigError(f"config: modes: {self.modes} names a mode twice")
        if not self.temperature > 0:
            raise ConfigError(f"config: temperature: expected a number > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"config: top_p: expected a number in (0, 1], got {self.top_p}")
        for name in ("top_k", "no_repeat_ngram_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config: {name}: expected 0 (off) or a positive number, got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"config: repetition_penalty: expected a number > 0 (1 = off), got {self.repetition_penalty}")
        if self.num_beams < 1:
            raise ConfigError(f"config: num_beams: expected 1 (greedy) or more beams, got {self.num_beams}")
        for name in ("prompts", "pref_data", "ppl_data", "reward_model", "ref_model"):
            if getattr(self, name) in ("none", "null", ""):
                setattr(self, name, None)
        if self.prompts is None:
            raise ConfigError("config: prompts: a prompt set is required")


# --------------------------------------------------------------------------------------------------
# Text metrics (pure)
# --------------------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Lower-cased whitespace tokens: the unit of the repetition metrics."""
    return text.lower().split()


def distinct_n(tokens: list[str], n: int) -> float | None:
    """Unique n-grams / n-grams of one text; None when it has fewer than n tokens.

    ["a", "b", "a", "b"], n=2: bigrams ab, ba, ab -> 2 unique of 3 = 0.667.
    """
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return None
    return len(set(grams)) / len(grams)


def repeated_ngram_share(tokens: list[str], n: int = REPEAT_N) -> float | None:
    """Share of n-grams that repeat an earlier n-gram of the same text (seq-rep-n = 1 - distinct-n)."""
    d = distinct_n(tokens, n)
    return None if d is None else 1.0 - d


def loops_to_limit(eos: bool, degeneration: Degeneration) -> bool:
    """The reply ran to the token limit (no EOS) and is degenerate text: a loop the budget cut off, not a
    long answer the budget cut off (that is `not eos` alone)."""
    return bool(not eos and degeneration.degenerate)


def coherent_strict(strict: bool | None, degeneration: Degeneration) -> bool | None:
    """The headline pass: every constraint met (IFEval strict) AND the reply is not degenerate text
    (align.degeneration); None when the prompt has no constraints."""
    return None if strict is None else bool(strict and not degeneration.degenerate)


def judge_again(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Saved generation rows (generations.jsonl) judged by today's checks, in place: `degenerate`,
    `degenerate_reasons`, `coherent_strict` and `unasked_format` from the reply, prompt, constraints and EOS;
    so that evaluations made before a check gained a rule compare with new ones. Returns `rows`."""
    from align.degeneration import check_reply, unasked_formats

    for r in rows:
        verdict = check_reply(r["reply"], r["prompt"], r["constraints"], ended=r["eos"])
        r["degenerate"], r["degenerate_reasons"] = verdict.degenerate, list(verdict.reasons)
        r["coherent_strict"] = coherent_strict(r["verifier_strict"], verdict)
        r["unasked_format"] = bool(unasked_formats(r["reply"], r["constraints"]))
    return rows


def pass_rates_by_constraint(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per constraint type, how many of its instances the replies met: {type: {"passed", "total", "rate"}}.

    rows: one per reply, with "constraints" (list of {"type": ...}) and "verifier_passed" (one bool per
    constraint, in the same order; None for a prompt without constraints). Types in order of first
    appearance; a prompt with two constraints of one type counts twice. Shows what a run learned and what
    it did not ("capitals 0/15 -> 9/15") where the strict score moves by a few prompts.
    """
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        passed = row.get("verifier_passed")
        if passed is None:
            continue
        for constraint, ok in zip(row["constraints"], passed, strict=True):
            tally = out.setdefault(constraint["type"], {"passed": 0, "total": 0})
            tally["passed"] += bool(ok)
            tally["total"] += 1
    for tally in out.values():
        tally["rate"] = tally["passed"] / tally["total"]
    return out


def prompt_fingerprint(prompt_ids: list[str], prompts: list[list[Message]]) -> str:
    """sha256 of the prompt ids and messages in order: equal fingerprints mean the same prompt set."""
    blob = json.dumps([[i, p] for i, p in zip(prompt_ids, prompts)], sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------
# The policy and its reference
# --------------------------------------------------------------------------------------------------


@dataclass
class Policy:
    """A model to evaluate and how to get its reference.

    kind: "model" (base or a model directory: its own reference), "adapter" (the reference is the PEFT
    model with the adapter disabled: `reference` when `model` is a merged copy of it, else `model` itself)
    or "merged" (the reference is `reference`, a separate model, or None when unknown).
    """

    model: Any
    tokenizer: Any
    kind: Literal["model", "adapter", "merged"]
    path: str
    reference: Any = None
    reference_name: str | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    method: str = "base"

    @property
    def has_reference(self) -> bool:
        return self.kind in ("model", "adapter") or self.reference is not None

    @property
    def is_own_reference(self) -> bool:
        return self.kind == "model"


@contextlib.contextmanager
def reference_of(policy: Policy) -> Iterator[Any]:
    """Yield the reference model: the policy with its adapter disabled, or the separate reference."""
    if policy.kind == "adapter":
        peft_model = policy.reference if policy.reference is not None else policy.model
        with peft_model.disable_adapter():
            yield peft_model
    elif policy.kind == "merged" and policy.reference is not None:
        yield policy.reference
    else:
        raise RuntimeError(f"reference_of: policy {policy.path} ({policy.kind}) has no separate reference")


def _read_run_file(run: Path, name: str) -> dict[str, Any]:
    path = run / name
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if name.endswith(".yaml") else json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError) as err:
        raise AlignError(f"{path}: cannot be read ({err})") from None
    return data if isinstance(data, dict) else {}


def merged_for_eval(cfg: EvalArgs, model):
    """`model` with its adapter folded into a copy of the weights (align.models.merged_copy) when
    cfg.merge_adapter says so (auto = on a CPU); None when not merged."""
    from align.models import merged_copy

    on_cpu = next(model.parameters()).device.type == "cpu"
    if cfg.merge_adapter == "true" or (cfg.merge_adapter == "auto" and on_cpu):
        return merged_copy(model)
    return None


def is_run_dir(path: Path) -> bool:
    """A directory a recipe wrote: an adapter at its root or in adapter/, or a full model in merged/."""
    return (path / "adapter_config.json").is_file() or (path / "adapter" / "adapter_config.json").is_file() or (
        path / "merged" / "config.json"
    ).is_file()


def default_out_dir(run: str) -> Path:
    return Path("outputs/base/eval") if run == "base" else Path(run) / "eval"


def load_run(run: str, dtype: str = "auto") -> tuple[Any, Any, Literal["model", "adapter", "merged"], str]:
    """(model, tokenizer, kind, path) of `run`, unquantized, in eval mode: `base` (the embedded default), a Hub id in
    the local cache, a model directory (kind "model"), or a run directory (kind "adapter": the PeftModel, or
    "merged": the full model a recipe saved). What `align eval` and `align chat` accept as RUN."""
    from align.models import DEFAULT_MODEL, ModelArgs, load_model, load_trained

    root = Path(run)
    if run == "base" or not root.exists():
        name = DEFAULT_MODEL if run == "base" else run
        if name != DEFAULT_MODEL and "/" not in run:
            raise AlignError(f"{run}: no such run directory or model (expected a run directory, a model directory or 'base')")
    elif is_run_dir(root):
        model, tokenizer = load_trained(str(root), dtype=dtype)
        return model, tokenizer, "adapter" if hasattr(model, "disable_adapter") else "merged", str(root)
    elif not (root / "config.json").is_file():
        raise AlignError(f"{run}: not a run directory (no adapter/ or merged/) and not a model directory (no config.json)")
    else:
        name = str(root)
    model, tokenizer = load_model(ModelArgs(model_name_or_path=name, dtype=dtype, quantization="none"), lora=False)
    model.eval()
    return model, tokenizer, "model", name


def load_policy(run: str, cfg: EvalArgs) -> Policy:
    """Load `run` (base, a model directory or a run directory) with its reference; see the module docstring."""
    from align.models import ModelArgs, load_model

    model, tokenizer, kind, path = load_run(run, cfg.dtype)
    if kind == "model":
        return Policy(model, tokenizer, "model", path, method="base")
    root = Path(run)
    run_config = _read_run_file(root, "config.yaml")
    method = _read_run_file(root, "summary.json").get("method") or run_config.get("method") or "base"
    if kind == "adapter":
        merged = merged_for_eval(cfg, model)
        return Policy(merged if merged is not None else model, tokenizer, "adapter", str(root),
                      reference=model if merged is not None else None,
                      reference_name="the base model with the adapter disabled", run_config=run_config, method=method)
    ref_name = cfg.ref_model or run_config.get("model_name_or_path")
    reference = None
    if ref_name:
        reference, _ = load_model(ModelArgs(model_name_or_path=str(ref_name), dtype=cfg.dtype, quantization="none"), lora=False)
        reference.eval()
    else:
        logger.warning(f"{run}: merged model with no --ref_model and no model_name_or_path in config.yaml: "
                       "KL and implicit rewards are not computed")
    return Policy(model, tokenizer, "merged", str(root), reference=reference, reference_name=ref_name,
                  run_config=run_config, method=method)


# --------------------------------------------------------------------------------------------------
# Log-probs of the last tokens of left-padded rows
# --------------------------------------------------------------------------------------------------


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
    from align.ppo_math import logprobs_from_logits

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


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


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
        ids, mask = _left_pad([p + r for p, r in batch], tokenizer.pad_token_id)
        n_last = max(len(r) for _, r in batch)
        token_logps = last_token_logps(model, ids.to(device), mask.to(device), n_last)
        for row, (i, (_, r)) in enumerate(zip(rows, batch)):
            out[i] = (float(token_logps[row, n_last - len(r) :].sum()), len(r))
    return out


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


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
    generation batch size, prompt order) give the same replies.
    """
    from align.ppo_math import token_kl, truncate_after_eos

    model, tokenizer = policy.model, policy.tokenizer
    device = next(model.parameters()).device
    gen_config = settings_for(mode, cfg).generation_config(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    results: list[Generation] = []
    start_time = time.time()
    for batch_index, start in enumerate(range(0, len(prompts), cfg.generate_batch_size)):
        batch = prompts[start : start + cfg.generate_batch_size]
        prefixes = [tokenizer(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False)["input_ids"] for p in batch]
        ids, mask = _left_pad(prefixes, pad)
        ids, mask = ids.to(device), mask.to(device)
        seed = cfg.seed + batch_index if mode == "sample" else None
        if seed is not None:
            torch.manual_seed(seed)
        sequences = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)
        responses, response_mask, _, contains_eos = truncate_after_eos(sequences[:, ids.shape[1] :], eos, pad)
        kl_k1 = kl_k3 = [None] * len(batch)
        if mode == "sample" and policy.has_reference:
            if policy.is_own_reference:
                kl_k1 = kl_k3 = [0.0] * len(batch)  # the policy is its reference: KL is exactly 0
            else:
                full_ids = torch.cat([ids, responses], dim=1)
                full_mask = torch.cat([mask, response_mask.long()], dim=1)
                n = responses.shape[1]
                kl_k1, kl_k3 = [], []
                for rows in torch.arange(len(batch)).split(cfg.batch_size):  # logits are rows x n x vocab
                    logps = last_token_logps(model, full_ids[rows], full_mask[rows], n, cfg.temperature)
                    with reference_of(policy) as reference:
                        ref_logps = last_token_logps(reference, full_ids[rows], full_mask[rows], n, cfg.temperature)
                    kl_k1 += token_kl(logps, ref_logps, response_mask[rows], "k1").sum(-1).tolist()
                    kl_k3 += token_kl(logps, ref_logps, response_mask[rows], "k3").sum(-1).tolist()
        for row in range(len(batch)):
            n_tokens = int(response_mask[row].sum()) - int(contains_eos[row])
            text = tokenizer.decode(responses[row, :n_tokens].tolist(), skip_special_tokens=True)
            results.append(Generation(text, n_tokens, bool(contains_eos[row]), seed, kl_k1[row], kl_k3[row]))
        if log:
            log(f"generate {mode}: {len(results)}/{len(prompts)} prompts, {time.time() - start_time:.1f} s")
    return results


# --------------------------------------------------------------------------------------------------
# Evaluate: generate, score, write
# --------------------------------------------------------------------------------------------------


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def generation_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over one mode's generation rows (align.report adds confidence intervals)."""
    return {
        "n": len(rows),
        "coherent_strict": _mean([r["coherent_strict"] for r in rows]),
        "verifier_strict": _mean([r["verifier_strict"] for r in rows]),
        "degenerate_share": _mean([r["degenerate"] for r in rows]),
        "unasked_format_share": _mean([r.get("unasked_format") for r in rows]),
        "verifier_score": _mean([r["verifier_score"] for r in rows]),
        "n_with_constraints": sum(r["verifier_score"] is not None for r in rows),
        "rm_score": _mean([r["rm_score"] for r in rows]),
        "length_tokens": _mean([r["length_tokens"] for r in rows]),
        "eos_rate": _mean([r["eos"] for r in rows]),
        "distinct_1": _mean([r["distinct_1"] for r in rows]),
        "distinct_2": _mean([r["distinct_2"] for r in rows]),
        "repeated_4gram_share": _mean([r["repeated_4gram_share"] for r in rows]),
        "loops_to_limit_share": _mean([r.get("loops_to_limit") for r in rows]),
        "kl_k1": _mean([r["kl_k1"] for r in rows]),
        "kl_k3": _mean([r["kl_k3"] for r in rows]),
        "by_constraint": pass_rates_by_constraint(rows),
    }


def _verdict(reply: str, constraints: list[dict] | None, where: str) -> tuple[list[bool] | None, float | None, bool | None]:
    if not constraints:
        return None, None, None
    from align.verifier import verify

    verdict = verify(reply, constraints, where)
    return [bool(p) for p in verdict.passed], float(verdict.score), bool(verdict.strict)


def _beta(policy: Policy, cfg: EvalArgs) -> float:
    if cfg.beta is not None:
        return cfg.beta
    beta = policy.run_config.get("beta")
    return float(beta) if isinstance(beta, (int, float)) and not isinstance(beta, bool) else DEFAULT_BETA


def _preference_rows(policy: Policy, cfg: EvalArgs, rm, log) -> list[dict[str, Any]]:
    from align.data.load import load_preferences

    pairs = load_preferences(cfg.pref_data, max_rows=cfg.max_pairs)
    prompts = [p.prompt for p in pairs]
    beta = _beta(policy, cfg)
    log(f"preferences: {len(pairs)} pairs from {cfg.pref_data} (beta {beta})")
    rows = [{"pair_id": p.id if p.id is not None else str(i), "source": p.source} for i, p in enumerate(pairs)]
    if rm is not None:
        rm_model, rm_tokenizer = rm
        chosen = _rm_scores(rm_model, rm_tokenizer, prompts, [p.chosen for p in pairs], cfg.batch_size)
        rejected = _rm_scores(rm_model, rm_tokenizer, prompts, [p.rejected for p in pairs], cfg.batch_size)
        for row, c, r in zip(rows, chosen, rejected):
            row.update(rm_chosen=c, rm_rejected=r)
    if policy.is_own_reference:
        # log pi - log pi_ref is 0 for every reply; no forward pass needed to know that.
        for row in rows:
            row.update(implicit_chosen=0.0, implicit_rejected=0.0)
    elif policy.has_reference:
        both = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        logps = reply_logps(policy.model, policy.tokenizer, prompts + prompts, both, cfg.batch_size)
        with reference_of(policy) as reference:
            ref_logps = reply_logps(reference, policy.tokenizer, prompts + prompts, both, cfg.batch_size)
        n = len(pairs)
        for i, row in enumerate(rows):
            lc, lr = logps[i][0], logps[n + i][0]
            rc, rr = ref_logps[i][0], ref_logps[n + i][0]
            # DPO's implicit reward [Rafailov et al. 2023, eq. 5 without the partition term, which cancels
            # between the two replies of one prompt]: beta * (log pi(y|x) - log pi_ref(y|x)).
            row.update(
                logp_chosen=lc, logp_rejected=lr, ref_logp_chosen=rc, ref_logp_rejected=rr,
                implicit_chosen=beta * (lc - rc), implicit_rejected=beta * (lr - rr),
            )
    return rows


def _rm_scores(model, tokenizer, prompts: list[list[Message]], replies: list[str], batch_size: int) -> list[float]:
    from align.reward_model import score_texts

    return [float(s) for s in score_texts(model, tokenizer, prompts, replies, batch_size=batch_size)]


def preference_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy = share of pairs whose chosen reply scores strictly higher; ties are counted apart."""
    out: dict[str, Any] = {"n": len(rows)}
    for name, a, b in (("rm", "rm_chosen", "rm_rejected"), ("implicit", "implicit_chosen", "implicit_rejected")):
        scored = [r for r in rows if r.get(a) is not None]
        if not scored:
            continue
        out[f"{name}_accuracy"] = sum(r[a] > r[b] for r in scored) / len(scored)
        out[f"{name}_ties"] = sum(r[a] == r[b] for r in scored)
        out[f"{name}_margin"] = _mean([r[a] - r[b] for r in scored])
    return out


def _perplexity_rows(policy: Policy, cfg: EvalArgs, log) -> list[dict[str, Any]]:
    from align.data.load import load_sft

    examples = load_sft(cfg.ppl_data, max_rows=cfg.max_ppl_rows)
    prompts, replies = [], []
    for ex in examples:
        last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        prompts.append(ex.messages[:last])
        replies.append(ex.messages[last]["content"])
    log(f"perplexity: {len(examples)} held-out replies from {cfg.ppl_data}")
    scored = reply_logps(policy.model, policy.tokenizer, prompts, replies, cfg.batch_size)
    return [
        {"row_id": ex.id if ex.id is not None else str(i), "source": ex.source, "tokens": n, "nll_sum": -logp}
        for i, (ex, (logp, n)) in enumerate(zip(examples, scored))
    ]


def perplexity_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Token-level perplexity over all replies: exp(sum of NLL / sum of tokens)."""
    tokens = sum(r["tokens"] for r in rows)
    nll = sum(r["nll_sum"] for r in rows)
    return {"n": len(rows), "tokens": tokens, "perplexity": _finite(math.exp(nll / tokens)) if tokens else None}


def settings_of(cfg: EvalArgs, prompt_ids: list[str], prompts: list[list[Message]]) -> dict[str, Any]:
    return {
        "prompts": cfg.prompts, "max_prompts": cfg.max_prompts, "n_prompts": len(prompts),
        "prompts_sha256": prompt_fingerprint(prompt_ids, prompts),
        "modes": list(cfg.modes), "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k, "seed": cfg.seed,
        "repetition_penalty": cfg.repetition_penalty, "no_repeat_ngram_size": cfg.no_repeat_ngram_size, "num_beams": cfg.num_beams,
        "generate_batch_size": cfg.generate_batch_size, "batch_size": cfg.batch_size, "merge_adapter": cfg.merge_adapter,
        "reward_model": str(Path(cfg.reward_model).resolve()) if cfg.reward_model else None,
        "pref_data": cfg.pref_data, "max_pairs": cfg.max_pairs, "ppl_data": cfg.ppl_data, "max_ppl_rows": cfg.max_ppl_rows,
        "beta": cfg.beta, "dtype": cfg.dtype, "ref_model": cfg.ref_model,
    }


def evaluate(run: str, cfg: EvalArgs, log=None) -> dict[str, Any]:
    """Evaluate `run` (see the module docstring) and write its outputs; returns summary.json's content.

    An out directory holding an earlier evaluation is refused before anything is loaded, or moved aside under
    --overwrite true; one evaluation at a time writes there (align.runs)."""
    from align.runs import EVAL_ARTEFACTS, check_folder, release_lock, take_folder

    log = log or logger.info
    out = Path(cfg.out) if cfg.out else default_out_dir(run)
    found = check_folder(out, resume=False, overwrite=cfg.overwrite, names=EVAL_ARTEFACTS, dir_flag="--out", resumable=False,
                         what="an earlier evaluation")
    for note in take_folder(out, found, overwrite=cfg.overwrite):
        log(note)
    try:
        return _evaluate(run, cfg, out, log)
    finally:
        release_lock(out)


def _eval_prompts(cfg: EvalArgs) -> tuple[list[Any], list[str]]:
    """The held-out prompt records and their ids (unique: replies are matched across runs by id); an unknown
    constraint fails here, not after the generation."""
    from align.data.load import load_prompts
    from align.verifier import check_constraints

    records = load_prompts(cfg.prompts, max_rows=cfg.max_prompts)
    if not records:
        raise AlignError(f"{cfg.prompts}: no prompts")
    prompt_ids = [r.id if r.id is not None else str(i) for i, r in enumerate(records)]
    if len(set(prompt_ids)) != len(prompt_ids):
        dup = next(i for i in prompt_ids if prompt_ids.count(i) > 1)
        raise AlignError(f"{cfg.prompts}: prompt id {dup!r} appears twice; ids must be unique to match replies across runs")
    for record in records:
        if record.constraints:
            check_constraints(record.constraints, f"{record.source}: field 'constraints'")
    return records, prompt_ids


def _reply_row(record, prompt_id: str, gen: Generation, rm_score: float | None, mode: str, cfg: EvalArgs,
               generation: dict[str, Any]) -> dict[str, Any]:
    """One line of generations.jsonl: the reply and every judgement of it."""
    passed, score, strict = _verdict(gen.reply, record.constraints, f"{record.source}: field 'constraints'")
    degeneration = check_reply(gen.reply, record.prompt, record.constraints, ended=gen.eos)
    unasked = unasked_formats(gen.reply, record.constraints)
    tokens = words(gen.reply)
    return {
        "prompt_id": prompt_id, "prompt": record.prompt, "constraints": record.constraints,
        "mode": mode, "seed": gen.seed, "temperature": cfg.temperature if mode == "sample" else None,
        "top_p": cfg.top_p if mode == "sample" else None,
        "reply": gen.reply, "length_tokens": gen.length_tokens, "length_words": len(tokens), "eos": gen.eos,
        "coherent_strict": coherent_strict(strict, degeneration),
        "degenerate": degeneration.degenerate, "degenerate_reasons": list(degeneration.reasons),
        "unasked_format": bool(unasked), "unasked_formats": unasked,
        "verifier_passed": passed, "verifier_score": score, "verifier_strict": strict, "rm_score": rm_score,
        "distinct_1": distinct_n(tokens, 1), "distinct_2": distinct_n(tokens, 2),
        "repeated_4gram_share": repeated_ngram_share(tokens), "loops_to_limit": loops_to_limit(gen.eos, degeneration),
        "kl_k1": gen.kl_k1, "kl_k3": gen.kl_k3, "generation": generation,
    }


def _evaluate(run: str, cfg: EvalArgs, out: Path, log) -> dict[str, Any]:
    from align.train import peak_memory_mb

    t0 = time.time()
    records, prompt_ids = _eval_prompts(cfg)
    prompts = [r.prompt for r in records]
    log(f"{len(prompts)} prompts from {cfg.prompts}; modes {', '.join(cfg.modes)}; loading {run}")

    policy = load_policy(run, cfg)
    rm = None
    if cfg.reward_model:
        from align.reward_model import load_reward_model

        rm_model, rm_tokenizer = load_reward_model(cfg.reward_model, dtype=cfg.dtype)
        merged = merged_for_eval(cfg, rm_model)
        rm_model = rm_model if merged is None else merged
        rm = (rm_model, rm_tokenizer)

    # Phase 1: generate.
    t_gen = time.time()
    generations = {mode: generate(policy, prompts, mode, cfg, log) for mode in cfg.modes}
    generate_s = time.time() - t_gen

    # Phase 2: score every reply.
    t_score = time.time()
    rows: list[dict[str, Any]] = []
    generation = {mode: settings_for(mode, cfg).as_dict() for mode in cfg.modes}
    for mode in cfg.modes:
        replies = [g.reply for g in generations[mode]]
        rm_scores = _rm_scores(rm[0], rm[1], prompts, replies, cfg.batch_size) if rm else [None] * len(replies)
        rows += [_reply_row(record, pid, gen, rm_score, mode, cfg, generation[mode])
                 for record, pid, gen, rm_score in zip(records, prompt_ids, generations[mode], rm_scores)]
    pref_rows = _preference_rows(policy, cfg, rm, log) if cfg.pref_data else None
    ppl_rows = _perplexity_rows(policy, cfg, log) if cfg.ppl_data else None
    score_s = time.time() - t_score

    # Phase 3: write.
    files = {"generations": "generations.jsonl"}
    atomic_write_text(out / "generations.jsonl", _jsonl(rows))
    metrics: dict[str, Any] = {mode: {**generation_summary([r for r in rows if r["mode"] == mode]), "generation": generation[mode],
                                      "generation_name": settings_for(mode, cfg).describe()} for mode in cfg.modes}
    if pref_rows is not None:
        files["preferences"] = "prefs.jsonl"
        atomic_write_text(out / "prefs.jsonl", _jsonl(pref_rows))
        metrics["preferences"] = preference_summary(pref_rows)
    if ppl_rows is not None:
        files["perplexity"] = "ppl.jsonl"
        atomic_write_text(out / "ppl.jsonl", _jsonl(ppl_rows))
        metrics["perplexity"] = perplexity_summary(ppl_rows)
    summary = {
        "run": str(Path(run).resolve()) if Path(run).exists() else run,
        "method": policy.method,
        "policy": {
            "kind": policy.kind, "path": policy.path,
            "reference": "the policy itself" if policy.is_own_reference else policy.reference_name,
            "beta": _beta(policy, cfg),
        },
        "settings": settings_of(cfg, prompt_ids, prompts),
        "metrics": metrics,
        "files": files,
        "timing": {
            "generate_s": round(generate_s, 2), "score_s": round(score_s, 2), "total_s": round(time.time() - t0, 2),
            "generated_tokens": sum(r["length_tokens"] + r["eos"] for r in rows),
            "torch_threads": torch.get_num_threads(),
        },
        "peak_memory_mb": round(peak_memory_mb(), 1),
    }
    atomic_write_json(out / "summary.json", summary)
    log(f"wrote {out}/summary.json ({summary['timing']['total_s']} s)")
    return summary


# --------------------------------------------------------------------------------------------------
# align eval RUN [--option value ...]
# --------------------------------------------------------------------------------------------------

USAGE = """Evaluate one policy on a fixed prompt set; write every generation and score as JSON lines.

    align eval outputs/dpo                                  # -> outputs/dpo/eval/
    align eval base --modes greedy --max_prompts 50         # the untrained default model
    align eval outputs/ppo --reward_model outputs/reward --prompts my_prompts.jsonl

RUN is a run directory (adapter/ or merged/), a model directory, or `base`. `python eval/evaluate.py ...` in a
checkout is the same command. See align/evaluation.py for what is measured and the files written
(generations.jsonl, prefs.jsonl, ppl.jsonl, summary.json).
"""


@cli_main
def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        parse_config(EvalArgs, ["--help"])
    if not argv or argv[0].startswith("--"):
        raise ConfigError("command line: expected RUN first (a run directory, a model directory or 'base'); see --help")
    evaluate(argv[0], parse_config(EvalArgs, argv[1:]))
