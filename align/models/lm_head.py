"""The LM head on the positions that are scored, in chunks: token log-probs without full-vocabulary logits.

A causal LM's head turns every hidden state into `vocab` logits. Training only needs the log-prob of the
next token at the positions that carry a label (SFT: assistant tokens; DPO: completion tokens), and only
one chunk of those logits at a time. `completion_logprobs` runs the head on chosen hidden states,
`chunk_size` rows at a time, and recomputes each chunk's logits in backward, so no `(positions, vocab)`
float32 tensor, and no logits at all for unscored positions, is ever held. The DPO fast path
(align/trainers/dpo_fast.py) and the SFT fast path (align/trainers/sft_fast.py, through `add_label_head`) both use it.

TRL's own fused head (`trl.trainer.utils.add_fused_lm_head`) scores only labelled positions where Triton
runs (CUDA); elsewhere (CPU) it scores every position, prompt and padding included, in float32 tiles of
up to 4096 x 32768 logits.
"""

from __future__ import annotations

import functools
import types
import warnings
from typing import Any

import torch
from torch import Tensor


class _HeadChunkLogprobs(torch.autograd.Function):
    """One chunk of `completion_logprobs`: the head's matmul and the log-softmax at the targets in one function.

    Forward keeps only what backward needs besides the inputs, one logsumexp per position; backward
    recomputes the chunk's logits with one matmul and turns them into their gradient in place:
    d token_logp / d logits = onehot(target) - softmax(logits) = onehot(target) - exp(logits - logsumexp).
    Autograd over the same ops (the function before December 7: a checkpointed chunk through
    `align.ops.logprobs.logprobs_from_logits`) recomputed the logsumexp as well and made about twice as many
    float32 (positions, vocab) passes: 1.8x slower on the default model's head (bench/results/
    lm_head_fused_amd_bf16/), the same log-probs and gradients.

    Logits are computed in the dtype the forward's matmul gives (the weight's, or autocast's) and the
    log-softmax in float32 (float64 stays float64); backward casts to that dtype itself, so it needs no
    autocast state. Under DeepSpeed ZeRO-3 the head's weight is gathered again for the recompute
    (trl's `maybe_gather_lm_head_ctx`, a null context otherwise).
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, stats: bool):
        logits = torch.nn.functional.linear(hidden, weight, bias)
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logsumexp = torch.logsumexp(z, dim=-1)
        token_logps = z.gather(-1, targets[:, None]).squeeze(-1) - logsumexp
        ctx.save_for_backward(hidden, weight, bias, targets, logsumexp)
        ctx.logits_dtype = logits.dtype
        if not stats:
            return token_logps
        # TRL's logged metrics: entropy, mean logit, top-1 accuracy (no gradient)
        entropy = logsumexp - (torch.softmax(z, dim=-1) * z).sum(-1)
        mean_logits, is_top1 = z.mean(-1), z.argmax(-1) == targets
        ctx.mark_non_differentiable(entropy, mean_logits, is_top1)
        return token_logps, entropy, mean_logits, is_top1

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_logps: Tensor, *_stats_grads: Tensor):
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        hidden, weight, bias, targets, logsumexp = ctx.saved_tensors
        dtype = ctx.logits_dtype
        with maybe_gather_lm_head_ctx(weight, bias):
            w = weight.to(dtype)
            logits = torch.nn.functional.linear(hidden.to(dtype), w, None if bias is None else bias.to(dtype))
        # (onehot(target) - softmax) * grad in the float32 copy of the logits, in the order of the autograd version
        # (the same gradients to the bit)
        probs = logits.to(logsumexp.dtype, copy=True).sub_(logsumexp[:, None]).exp_()
        ones = torch.ones_like(probs[:, :1])
        grad_logits = probs.neg_().scatter_add_(-1, targets[:, None], ones).mul_(grad_logps[:, None]).to(dtype)
        grad_hidden = (grad_logits @ w).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad_logits.t() @ hidden.to(dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = grad_logits.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None


def completion_logprobs(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_size: int, stats: bool = True
) -> tuple[Tensor, ...]:
    """Log-probs of `targets` under softmax(hidden @ weight.T + bias), `chunk_size` positions at a time.

    Each chunk's logits live only while that chunk is processed: in backward they are recomputed
    (`_HeadChunkLogprobs`), which costs one more LM-head matmul per chunk and saves holding
    (positions, vocab) logits and their gradient.

    Args:
        hidden: (M, H) hidden states of the positions to score.
        weight: (V, H) LM-head weight; bias: (V,) or None.
        targets: (M,) int64 token ids.
        chunk_size: positions per chunk.
        stats: also return, without gradient, the entropy, mean logit and whether the target is the
            argmax, at every position.

    Returns:
        token_logps (M,) float32 with gradient, then (if stats) entropy (M,), mean_logits (M,), is_top1 (M,).
    """
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        stop = start + chunk_size
        out = _HeadChunkLogprobs.apply(hidden[start:stop], weight, bias, targets[start:stop], stats)
        pieces.append(out if stats else (out,))
    if not pieces:  # no completion token at all: keep the result connected to the graph
        empty = hidden.new_zeros(0, dtype=torch.float32) + hidden.sum() * 0
        return (empty,) + ((empty.detach(), empty.detach(), empty.detach().bool()) if stats else ())
    return tuple(torch.cat(parts) for parts in zip(*pieces))


# Config fields that change the logits after the head's matmul (soft-capping, scaling); the label head
# computes plain logits, so a model with any of them set keeps TRL's head.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])


def contiguous_head_input(model) -> None:
    """Give the LM head a contiguous input (a forward pre-hook; a no-op for an input that already is one).

    transformers slices the last position, hidden[:, -1:, :], before the head in every generation prefill
    (logits_to_keep=1), a non-contiguous (batch, 1, hidden) view. With a frozen head weight (a PEFT base, a
    loaded model for evaluation) torch's matmul then does not fold the batch into one matrix product: it
    expands the (vocab, hidden) weight to every row and copies it, batch x vocab x hidden elements. On the
    default model a 64-prompt prefill spent 15.5 s of 21.7 s in that copy and raised peak RSS by 3.4 GB
    (bf16, 2 threads); with a contiguous input it is one matrix product. Once per head (a deep copy keeps it).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_align_contiguous_input", False):
        return
    head.register_forward_pre_hook(_contiguous_input)
    head._align_contiguous_input = True


def transforms_logits(config) -> bool:
    """Whether the model's config asks for logit soft-capping or scaling (see LOGIT_TRANSFORMS)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return any(getattr(config, k, None) not in (None, 1.0) for k in LOGIT_TRANSFORMS)


def add_label_head(model, chunk_size: int = 256) -> None:
    """Make `model(..., labels=labels, fused_lm_head=True)` run the LM head only on labelled positions.

    `model` is a transformers causal LM (not its PEFT wrapper) whose forward TRL has already patched with
    `add_fused_lm_head` (SFTTrainer does that in its __init__). The call keeps TRL's contract: the same
    arguments, and a `FusedCausalLMOutput` with `loss`, `log_probs`, `entropy`, `mean_logits`, `is_top1`
    and `label_mask` laid out `(batch, seq_len - 1)`, zero where the shifted label is -100; only the
    hidden states whose next label is not -100 go through the head (`completion_logprobs`), `chunk_size`
    at a time. Calls this path cannot serve exactly go to TRL's head, with a warning the first time:
    pre-shifted `shift_labels` (context or sequence parallelism), MoE router logits, a sharded (DTensor)
    head. Without `fused_lm_head` the forward is the original one. Idempotent.
    """
    if getattr(model, "_align_label_head", False):
        return
    from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx

    trl_forward = model.forward  # TRL's fused forward, which falls through to the model's own without fused_lm_head
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    warned: set[str] = set()

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        reason = None
        if not fused_lm_head or labels is None:
            pass
        elif shift_labels is not None:
            reason = "pre-shifted labels (context or sequence parallelism)"
        elif getattr(text_config, "output_router_logits", False) or kwargs.get("output_router_logits"):
            reason = "MoE router logits (auxiliary loss)"
        elif type(weight).__name__ == "DTensor":
            reason = "a sharded LM head (FSDP2)"
        if not fused_lm_head or labels is None or reason:
            if reason and reason not in warned:
                warned.add(reason)
                warnings.warn(f"align.models.lm_head: {reason}: this batch goes through TRL's fused LM head", stacklevel=2)
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)

        kwargs["use_cache"] = False
        hidden = getattr(self, "base_model")(*args, **kwargs).last_hidden_state[:, :-1]
        targets = labels[:, 1:].to(weight.device)
        label_mask = targets != -100
        with maybe_gather_lm_head_ctx(weight, bias):
            token_logps, entropy, mean_logits, is_top1 = completion_logprobs(
                hidden.to(weight.device)[label_mask].to(weight.dtype), weight, bias, targets[label_mask], chunk_size
            )

        def laid_out(values: Tensor) -> Tensor:
            # masked_scatter keeps an all-ignored micro-batch connected to the graph (a differentiable zero)
            return values.new_zeros(label_mask.shape).masked_scatter(label_mask, values)

        log_probs = laid_out(token_logps)
        count = label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / count, log_probs=log_probs, entropy=laid_out(entropy),
            mean_logits=laid_out(mean_logits), is_top1=laid_out(is_top1), label_mask=label_mask,
        )

    model.forward = types.MethodType(forward, model)
    model._align_label_head = True
