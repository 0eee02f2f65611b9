"""A faster DPOTrainer: the same loss as TRL's, from fewer FLOPs and far less memory.

`FastDPOTrainer` subclasses TRL's DPOTrainer and changes only how the per-token log-probs of the chosen
and rejected completions are computed. The loss, its variants, the metrics and the optimizer step stay
TRL's own code: `_compute_loss` is TRL's, handed a stand-in model that returns TRL's output layout.
Two levers, each with a switch in `FastDPOArgs`:

- `share_prompt`: TRL runs every prompt twice, once in front of the chosen reply and once in front of the
  rejected one. Here a pair is one row, `prompt + chosen + rejected`, with a 4-D attention mask in which
  the rejected tokens see the prompt but not the chosen reply, and position ids that restart the rejected
  reply right after the prompt. The shared part is the two sequences' longest common start: the prompt and any
  identical start of the replies (a rejected reply that leaves an edit out, is cut short or adds a format), whose
  tokens are scored once for both. Every hidden state equals the one TRL computes, so the log-probs agree to
  float rounding, but the prompt and most padding are computed once instead of twice.
- `fast_logprobs`: TRL's fused LM head scores every position, prompt and padding included, on devices
  without Triton (CPU), in tiles of 4096 x 32768 float32 logits. Here the LM head runs only on the hidden
  states that predict completion tokens, `logprob_chunk_size` positions at a time; each chunk's logits
  are recomputed in backward (activation checkpointing): `align.models.lm_head.completion_logprobs`, shared
  with the SFT fast path, so no full-vocabulary float32 logits are ever held for the batch, in forward
  or backward.

Reference log-probs go through the same path (`compute_ref_log_probs`), both when they are computed on
each step's batch (the recipe's default) and when they are precomputed before training, and are summed
in the same order as the policy's: on the same batch, before the first update, the two are bit-equal in
every dtype. Precomputed ones come from other batches, and in bf16 a row's log-probs depend on the
padded shape of its batch (matmul and attention blocking), by ~0.1 nat per sequence on the default model.

The recipe also returns freed activations to the OS (align.models.activations.return_freed_memory_to_os, shared
with SFT, PPO and GRPO); torch's threads are set for every recipe by align.trainers.common.set_cpu_threads.
`python bench/run.py --stage dpo --compare trl-baseline,align` measures all of it against stock TRL.

Where the fast path cannot be exact it is not used and the trainer says so once: truncation that cuts
the prompt differently for chosen and rejected (`truncation_mode="keep_end"`) keeps that pair in two rows;
attention implementations that take no 4-D mask (flash-attention) turn `share_prompt` off; models with
logit soft-capping or scaling, MoE auxiliary losses, WPO weighting, `ld_alpha`, vision inputs and
DeepSpeed ZeRO-3 fall back to TRL's stock path.
"""

from __future__ import annotations

import contextlib
import functools
import types
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from trl import DPOTrainer
from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx

from align.config import arg
from align.log import get_logger
from align.models.activations import FreedMemoryArgs
from align.models.lm_head import completion_logprobs, transforms_logits
from align.ops.logprobs import logprobs_from_logits

logger = get_logger(__name__)

# Per-token branch bits of a shared-prompt row: a query token sees a key token iff the key is not later
# and the key belongs to every branch the query belongs to (query_bits & key_bits == query_bits).
PROMPT, CHOSEN, REJECTED, PAD = 3, 1, 2, 0


@dataclass
class FastDPOArgs(FreedMemoryArgs):
    fast_logprobs: bool = arg(True, "LM head only on completion positions, in chunks, no full-vocabulary logits (align.trainers.dpo_fast); off = TRL's fused head")
    share_prompt: bool = arg(True, "one row per pair: chosen and rejected share one copy of the prompt (exact; needs fast_logprobs)")
    logprob_chunk_size: int = arg(256, "positions per LM-head chunk with fast_logprobs (memory vs. speed)")


# ------------------------------------------------------------------------------------------ the batch


def preference_rows(
    input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, share_prompt: bool, pad_token_id: int,
    chosen_only: bool = False,
) -> dict[str, Tensor]:
    """Lay out TRL's preference batch as rows for the fast forward, with the index of every log-prob.

    TRL's batch (`DataCollatorForPreference`) holds 2B right-padded rows: B `prompt + chosen`, then B
    `prompt + rejected`; the completion token at column t of row r is predicted by the hidden state at
    column t - 1 of that row, and its log-prob sits at [r, t - 1] of TRL's `(2B, L - 1)` log-prob layout.

    With `share_prompt`, pair b becomes one row `prompt + chosen + rejected` whenever the two prompts are
    token for token the same (always, unless truncation cut them differently); the first rejected token
    is predicted by the last prompt token, the others by the rejected token before them. Otherwise each
    sequence keeps a row of its own.

    Args:
        input_ids, attention_mask, completion_mask: (2B, L) TRL's collated batch.
        share_prompt: put the prompt of a pair in one row once.
        pad_token_id: id written in the padding of the new rows.
        chosen_only: lay out `prompt + chosen` alone, one row a pair (the SFT phase: no rejected reply).

    Returns:
        input_ids, position_ids, branch: (R, T) the rows; `branch` holds the bits PROMPT / CHOSEN /
            REJECTED / PAD that `branch_attention_mask` turns into the attention mask.
        hidden_index: (M,) flat index into (R * T) of the hidden state that predicts each completion token.
        targets: (M,) the completion tokens.
        out_index: (M,) flat index into TRL's (2B * (L - 1)) log-prob layout.
    """
    n_seq, length = input_ids.shape
    batch = n_seq // 2
    ids_cpu, att_cpu, comp_cpu = input_ids.cpu(), attention_mask.cpu().bool(), completion_mask.cpu().bool()
    rows, positions, branches = [], [], []
    hidden_rows, hidden_cols, out_rows, out_cols, targets = [], [], [], [], []

    def add_row(tokens: list[Tensor], pos: list[Tensor], bits: list[Tensor]) -> int:
        rows.append(torch.cat(tokens))
        positions.append(torch.cat(pos))
        branches.append(torch.cat(bits))
        return len(rows) - 1

    def predicted(seq: int) -> tuple[Tensor, Tensor]:
        """Columns t >= 1 of the completion tokens of TRL row `seq` (column 0 has no predictor), and the tokens."""
        cols = torch.nonzero(comp_cpu[seq] & att_cpu[seq]).squeeze(-1)
        cols = cols[cols >= 1]
        return cols, ids_cpu[seq, cols]

    for b in range(batch):
        chosen, rejected = b, batch + b
        n_c = int(att_cpu[chosen].sum())
        c_cols, c_tokens = predicted(chosen)
        if chosen_only:
            row = add_row([ids_cpu[chosen, :n_c]], [torch.arange(n_c)], [torch.full((n_c,), CHOSEN)])
            hidden_rows.append(torch.full_like(c_cols, row))
            hidden_cols.append(c_cols - 1)
            out_rows.append(torch.full_like(c_cols, chosen))
            out_cols.append(c_cols - 1)
            targets.append(c_tokens)
            continue
        n_r = int(att_cpu[rejected].sum())
        r_cols, r_tokens = predicted(rejected)
        # the prompt is everything before the first completion token
        p_c = int(comp_cpu[chosen, :n_c].int().argmax()) if comp_cpu[chosen, :n_c].any() else n_c
        p_r = int(comp_cpu[rejected, :n_r].int().argmax()) if comp_cpu[rejected, :n_r].any() else n_r
        same_prompt = p_c == p_r and p_c > 0 and torch.equal(ids_cpu[chosen, :p_c], ids_cpu[rejected, :p_r])
        if share_prompt and same_prompt:
            # share the longest common start, the prompt and any identical start of the two replies (a rejected reply
            # that leaves an edit out, is cut short or adds a format): causal attention makes its hidden states equal
            p = common_start(ids_cpu[chosen, :n_c], ids_cpu[rejected, :n_r])
            chosen_part, rejected_part = ids_cpu[chosen, p:n_c], ids_cpu[rejected, p:n_r]
            row = add_row(
                [ids_cpu[chosen, :p], chosen_part, rejected_part],
                [torch.arange(p), torch.arange(p, n_c), torch.arange(p, n_r)],
                [torch.full((p,), PROMPT), torch.full((n_c - p,), CHOSEN), torch.full((n_r - p,), REJECTED)],
            )
            hidden_rows += [torch.full_like(c_cols, row), torch.full_like(r_cols, row)]
            hidden_cols.append(c_cols - 1)
            # rejected column t (in TRL's row) sits at t + (n_c - p) here; columns up to p are predicted by the shared start
            r_pred = r_cols - 1
            hidden_cols.append(torch.where(r_pred >= p, r_pred + (n_c - p), r_pred))
        else:
            for seq, n, cols in ((chosen, n_c, c_cols), (rejected, n_r, r_cols)):
                row = add_row([ids_cpu[seq, :n]], [torch.arange(n)], [torch.full((n,), CHOSEN)])
                hidden_rows.append(torch.full_like(cols, row))
                hidden_cols.append(cols - 1)
        for seq, cols, tokens in ((chosen, c_cols, c_tokens), (rejected, r_cols, r_tokens)):
            out_rows.append(torch.full_like(cols, seq))
            out_cols.append(cols - 1)
            targets.append(tokens)

    return _as_batch(rows, positions, branches, (hidden_rows, hidden_cols), (out_rows, out_cols), targets,
                     length - 1, pad_token_id, input_ids.device)


def _as_batch(rows: list[Tensor], positions: list[Tensor], branches: list[Tensor], hidden: tuple[list[Tensor], list[Tensor]],
              out: tuple[list[Tensor], list[Tensor]], targets: list[Tensor], out_width: int, pad_token_id: int, device) -> dict[str, Tensor]:
    """preference_rows' pieces as right-padded (R, T) tensors and flat indices: hidden (row, column) pairs into
    (R * T), out (row, column) pairs into TRL's (2B * out_width) log-prob layout."""
    width = max(len(r) for r in rows)

    def pad(seqs: list[Tensor], value: int) -> Tensor:
        return torch.stack([torch.nn.functional.pad(s, (0, width - len(s)), value=value) for s in seqs])

    return {
        "input_ids": pad(rows, pad_token_id).to(device),
        "position_ids": pad(positions, 0).to(device),
        "branch": pad(branches, PAD).to(torch.uint8).to(device),
        "hidden_index": (torch.cat(hidden[0]) * width + torch.cat(hidden[1])).to(device),
        "targets": torch.cat(targets).to(device),
        "out_index": (torch.cat(out[0]) * out_width + torch.cat(out[1])).to(device),
    }


def common_start(a: Tensor, b: Tensor) -> int:
    """Length of the longest common prefix of two 1-D token tensors."""
    shortest = min(len(a), len(b))
    differs = torch.nonzero(a[:shortest] != b[:shortest])
    return int(differs[0]) if len(differs) else shortest


def branch_mask_for(model, branch: Tensor) -> Tensor:
    """`branch_attention_mask` in the form `model`'s attention takes: bool for sdpa, additive float for eager."""
    mask = branch_attention_mask(branch)
    if model.config._attn_implementation == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill(~mask, torch.finfo(model.dtype).min)
    return mask


def branch_attention_mask(branch: Tensor) -> Tensor:
    """Boolean attention mask (True = attend) for rows laid out by `preference_rows`.

    Query i sees key j iff j <= i and branch[j] has every bit of branch[i]: prompt tokens see the prompt,
    chosen tokens the prompt and the chosen reply, rejected tokens the prompt and the rejected reply.
    Padding (no bits) sees everything before it, so no row of the mask is empty (an empty row gives NaN
    in softmax, and a NaN times a zero gradient is still NaN in the weight gradients).

    Args:
        branch: (R, T) uint8 branch bits.

    Returns:
        (R, 1, T, T) bool.
    """
    length = branch.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=branch.device).tril()
    q, k = branch[:, :, None], branch[:, None, :]
    return (causal & ((q & k) == q))[:, None]


# ------------------------------------------------------------------------------------------ the LM head


def add_completion_head(model) -> None:
    """Patch `model.forward` (a transformers causal LM, not its PEFT wrapper) to also accept
    `align_rows=<preference_rows output>`: it then runs the backbone on the rows and returns the
    `completion_logprobs` of the completion tokens, instead of logits.

    The work happens inside the model's own forward, so DDP and FSDP hooks fire as for any forward.
    Without `align_rows` the forward is the original one. Idempotent.
    """
    if getattr(model, "_align_completion_head", False):
        return
    inner_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, align_rows=None, align_chunk_size=256, align_stats=True, **kwargs):
        if align_rows is None:
            return inner_forward(*args, **kwargs)
        rows = align_rows
        if self.config._attn_implementation in ("sdpa", "eager"):
            mask = branch_mask_for(self, rows["branch"])
        else:  # only plain causal rows reach here (see FastDPOTrainer._fast_ok)
            mask = (rows["branch"] != PAD).long()
        hidden = getattr(self, "base_model")(
            input_ids=rows["input_ids"], attention_mask=mask, position_ids=rows["position_ids"], use_cache=False
        ).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows["hidden_index"])
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        with maybe_gather_lm_head_ctx(weight, bias):
            out = completion_logprobs(hidden.to(weight.dtype), weight, bias, rows["targets"], align_chunk_size, align_stats)
        if not align_stats:
            return FusedCausalLMOutput(log_probs=out[0])
        return FusedCausalLMOutput(log_probs=out[0], entropy=out[1], mean_logits=out[2], is_top1=out[3])

    model.forward = types.MethodType(forward, model)
    model._align_completion_head = True


def _scatter(values: Tensor, out_index: Tensor, shape: torch.Size) -> Tensor:
    """(M,) values into a zero tensor of `shape` at the flat positions `out_index` (differentiable)."""
    flat = values.new_zeros(shape.numel()).index_put((out_index,), values)
    return flat.view(shape)


class _TRLLayoutModel:
    """Stands in for the model inside DPOTrainer._compute_loss: asked for TRL's fused LM head output, it
    runs the fast forward on the batch's rows and scatters the log-probs into TRL's (2B, L - 1) layout."""

    def __init__(self, model, rows: dict[str, Tensor], shape: torch.Size, chunk_size: int):
        self.model, self.rows, self.shape, self.chunk_size = model, rows, shape, chunk_size

    def __call__(self, fused_lm_head: bool = False, labels=None, **kwargs):
        if not fused_lm_head:  # `return_outputs=True` asks for plain logits: the real model
            return self.model(**kwargs)
        out = self.model(align_rows=self.rows, align_chunk_size=self.chunk_size)
        index = self.rows["out_index"]
        is_top1 = torch.zeros(self.shape.numel(), dtype=torch.bool, device=index.device).index_put((index,), out.is_top1)
        return FusedCausalLMOutput(
            log_probs=_scatter(out.log_probs, index, self.shape),
            entropy=_scatter(out.entropy, index, self.shape),
            mean_logits=_scatter(out.mean_logits, index, self.shape),
            is_top1=is_top1.view(self.shape),
            label_mask=is_top1.new_zeros(self.shape.numel()).index_fill(0, index, True).view(self.shape),
        )


# ------------------------------------------------------------------------------------------ the trainer


REF_ADAPTER = "ref"  # the adapter TRL's DPOTrainer adds as the reference when given a PeftModel and no ref_model
LORA_KINDS, ZERO_UPDATE_KINDS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}, {"lora_B", "lora_embedding_B"}


def drop_idle_ref_adapter(model) -> bool:
    """Delete TRL's "ref" adapter where it is a fresh LoRA adapter; returns whether it did.

    TRL's DPOTrainer, given a PeftModel and no ref_model, adds "ref", a copy of the "default" adapter as it is at the
    start, and runs every reference forward through it. A fresh LoRA adapter (peft's default initialisation: every B
    matrix zero) adds exactly zero to each layer, so that reference is the base model: computed with the adapter
    disabled (TRL's own path where there is no "ref"), it gives the same log-probs to the bit without the adapter's
    matmuls and float32 casts: the recipe's DPO step 1.04-1.08x faster on the default model (bf16, 2 threads, AMD EPYC
    family 25; bench/results/dpo_ref_adapter_amd_bf16/), and the saved adapter holds no copy. Kept: a "ref" that is
    not plain LoRA (DoRA's magnitudes, a variant) or that has a non-zero B (DPO from a trained SFT adapter: the
    reference is that SFT model).
    """
    config = getattr(model, "peft_config", {}).get(REF_ADAPTER)
    if config is None or getattr(config, "peft_type", None) != "LORA" or getattr(config, "use_dora", False):
        return False
    if any(REF_ADAPTER in getattr(m, "lora_variant", {}) for m in model.modules()):
        return False
    # parameter names: ...q_proj.lora_B.ref.weight, ...embed_tokens.lora_embedding_B.ref
    ref = [(name.removesuffix(".weight").removesuffix(".bias").split(".")[-2], p) for name, p in model.named_parameters()
           if f".{REF_ADAPTER}." in name or name.endswith(f".{REF_ADAPTER}")]
    if not ref or any(kind not in LORA_KINDS or p.numel() == 0 for kind, p in ref):  # numel 0: sharded (ZeRO-3), unknown
        return False
    if any(kind in ZERO_UPDATE_KINDS and bool(p.detach().any()) for kind, p in ref):
        return False
    model.delete_adapter(REF_ADAPTER)
    return True


class FastDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer with the log-probs of `align.trainers.dpo_fast` (see the module docstring).

    Takes the model as an instance (a PEFT model or a plain causal LM) and extra keyword arguments,
    `share_prompt`, `chunk_size`, `reference_free` and `sft_steps`; `fast=False` (and the others at their
    defaults) makes it TRL's DPOTrainer exactly.

    `sft_steps` > 0: the first `sft_steps` optimizer steps train TRL's "sft" loss alone (the mean NLL of the
    chosen replies' tokens) on `prompt + chosen` only, with no rejected reply and no reference forward, at a
    constant learning rate after warmup; the remaining steps are the configured DPO loss with the configured
    schedule (and warmup) over them, as if SFT and DPO were two runs on the same adapter.
    """

    def __init__(self, *args, fast: bool = True, share_prompt: bool = True, chunk_size: int = 256,
                 reference_free: bool = False, sft_steps: int = 0, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, str):
            raise TypeError("FastDPOTrainer: pass the model as a loaded instance, not a name")
        self._fast, self._share_prompt, self._chunk_size = fast, share_prompt, chunk_size
        self._reference_free = reference_free
        self._sft_steps = sft_steps
        self._fallback_reason: str | None = None
        # prompt tuning, p-tuning, prefix tuning: the PEFT wrapper adds virtual tokens (or key/value prefixes) in its
        # own forward, which the fast forward (the inner model's decoder, called directly) would skip
        self._prompt_learning = bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))
        if fast:
            inner = model.get_base_model() if hasattr(model, "get_base_model") else model
            add_completion_head(inner)
        super().__init__(*args, **kwargs)  # precomputes reference log-probs through compute_ref_log_probs
        if fast and self.ref_model is None and drop_idle_ref_adapter(self.accelerator.unwrap_model(self.model)):
            logger.info("dpo: reference = the base model (adapter disabled): TRL's \"ref\" copy of the fresh LoRA adapter "
                        "adds exactly zero, at the cost of its matmuls (align.trainers.dpo_fast.drop_idle_ref_adapter)")
        if fast and self.ref_model is not None:
            add_completion_head(self.accelerator.unwrap_model(self.ref_model))

    # -------------------------------------------------------------- when the fast path applies

    def _fast_ok(self) -> bool:
        if not self._fast:
            return False
        reason = None
        if self._prompt_learning:
            reason = "a prompt-learning adapter (its virtual tokens are added by the PEFT wrapper, which the fast forward bypasses)"
        elif self._is_vision_dataset:
            reason = "vision inputs"
        elif self.aux_loss_enabled:
            reason = "MoE auxiliary loss"
        elif self.use_weighting:
            reason = "WPO weighting (use_weighting)"
        elif self.ld_alpha is not None:
            reason = "ld_alpha"
        elif transforms_logits(self.model.config):
            reason = "logit soft-capping or scaling"
        elif self.is_deepspeed_enabled and getattr(self.accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3:
            reason = "DeepSpeed ZeRO-3 (the recomputed LM head would see a sharded weight)"
        if reason and self._fallback_reason is None:
            self._fallback_reason = reason
            warnings.warn(f"align.trainers.dpo_fast: {reason}: using TRL's stock log-probs", stacklevel=2)
        return reason is None

    def _rows(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        share = self._share_prompt and self.model.config._attn_implementation in ("sdpa", "eager")
        return preference_rows(
            inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"], share, self._tokenizer.pad_token_id
        )

    def _sequence_logps(self, model, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Summed completion log-probs (chosen (B,), rejected (B,)) through the fast forward, without stats."""
        rows = self._rows(inputs)
        out = model(align_rows=rows, align_chunk_size=self._chunk_size, align_stats=False)
        n_seq, length = inputs["input_ids"].shape
        # summed as TRL's loss sums the policy's: over its (2B, L - 1) layout, so that equal per-token
        # log-probs give bit-equal sums (a reduction in another order rounds differently)
        logps = _scatter(out.log_probs, rows["out_index"], torch.Size((n_seq, length - 1))).sum(dim=1)
        return logps.chunk(2)

    # -------------------------------------------------------------- TRL's hooks

    def compute_ref_log_probs(self, model, inputs):
        if not self._fast_ok():
            return super().compute_ref_log_probs(model, inputs)
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        adapter = contextlib.nullcontext()
        if self.ref_model is None and hasattr(self.accelerator.unwrap_model(self.model), "peft_config"):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), adapter, self.accelerator.autocast():
            return self._sequence_logps(model, inputs)

    def _compute_loss(self, model, inputs, return_outputs):
        if self._in_sft_phase() and not return_outputs:
            return self._sft_phase_loss(model, inputs)
        fast = self._fast_ok()
        inputs = dict(inputs)
        supplied_ref = False
        if self._reference_free:
            # TRL 0.x's reference_free: a reference that gives every reply the same probability, so the implicit
            # reward is beta * log pi(reply) itself; no reference forward at all
            zeros = torch.zeros(inputs["input_ids"].shape[0] // 2, dtype=torch.float32, device=inputs["input_ids"].device)
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = zeros, zeros.clone()
            supplied_ref = True
        elif fast and not self.precompute_ref_logps:
            # the reference through the fast path too; TRL then reads it from the batch as if precomputed
            ref_model = self.ref_model if self.ref_model is not None else self.model
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = self.compute_ref_log_probs(ref_model, inputs)
            supplied_ref = True
        if fast:
            n_seq, length = inputs["input_ids"].shape
            model = _TRLLayoutModel(model, self._rows(inputs), torch.Size((n_seq, length - 1)), self._chunk_size)
        with _temporarily(self, precompute_ref_logps=True) if supplied_ref else contextlib.nullcontext():
            return super()._compute_loss(model, inputs, return_outputs)

    # -------------------------------------------------------------- the SFT phase (sft_steps)

    def _in_sft_phase(self) -> bool:
        return self.model.training and self.state.global_step < self._sft_steps

    def _sft_phase_loss(self, model, inputs: dict[str, Tensor]) -> Tensor:
        """TRL's "sft" loss alone, -mean log pi(token) over the chosen replies' tokens, from `prompt + chosen` only."""
        ids, attention, completion = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        if self._fast_ok():
            rows = preference_rows(ids, attention, completion, False, self._tokenizer.pad_token_id, chosen_only=True)
            token_logps = model(align_rows=rows, align_chunk_size=self._chunk_size, align_stats=False).log_probs
        else:  # TRL's path: the chosen half of the batch through the model, every position's logits
            chosen = slice(0, ids.shape[0] // 2)
            logits = model(input_ids=ids[chosen], attention_mask=attention[chosen], use_cache=False).logits[:, :-1]
            labelled = (completion[chosen, 1:] * attention[chosen, 1:]).bool()
            token_logps = logprobs_from_logits(logits, ids[chosen, 1:])[labelled]
        loss = -token_logps.mean()
        self._metrics["train"]["sft_phase/nll"].append(self.accelerator.gather(loss.detach()).mean().item())
        return loss

    def _track_num_input_tokens(self, inputs):
        """The SFT phase reads only `prompt + chosen`: count the chosen half of the batch (tokens_seen and the summary's
        tokens per second are then the tokens the model ran, not the rejected replies it skipped)."""
        if self._in_sft_phase():
            half = inputs["input_ids"].shape[0] // 2
            inputs = {k: v[:half] for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        return super()._track_num_input_tokens(inputs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Without sft_steps, the Trainer's. With them: warmup then constant over the SFT phase, then the configured
        schedule, with its own warmup, over the DPO steps (each phase shaped as its own run would be)."""
        if not self._sft_steps or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        from torch.optim.lr_scheduler import LambdaLR
        from transformers import get_scheduler

        if num_training_steps <= self._sft_steps:
            raise ValueError(f"sft_steps: {self._sft_steps} SFT steps leave none of the run's {num_training_steps} for DPO")
        optimizer = self.optimizer if optimizer is None else optimizer
        sft_steps, dpo_steps = self._sft_steps, num_training_steps - self._sft_steps
        sft_warmup = self.args.get_warmup_steps(sft_steps)
        dpo = get_scheduler(self.args.lr_scheduler_type, optimizer, num_warmup_steps=self.args.get_warmup_steps(dpo_steps),
                            num_training_steps=dpo_steps, scheduler_specific_kwargs=self.args.lr_scheduler_kwargs)
        if not isinstance(dpo, LambdaLR):
            raise ValueError(f"sft_steps: lr_scheduler_type {self.args.lr_scheduler_type!r} is not a per-step schedule; "
                             "use linear, cosine, constant_with_warmup or another LambdaLR schedule")
        for group in optimizer.param_groups:  # building `dpo` set each group's lr to its step-0 value
            group["lr"] = group["initial_lr"]

        def phase_lambda(dpo_lambda):
            return lambda step: min(1.0, (step + 1) / (sft_warmup + 1)) if step < sft_steps else dpo_lambda(step - sft_steps)

        self.lr_scheduler = LambdaLR(optimizer, [phase_lambda(f) for f in dpo.lr_lambdas])
        self._created_lr_scheduler = True
        return self.lr_scheduler


@contextlib.contextmanager
def _temporarily(obj: Any, **values: Any):
    old = {k: getattr(obj, k) for k in values}
    for k, v in values.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)
