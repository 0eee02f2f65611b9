"""A leaner SFTTrainer: TRL's loss and metrics, with the LM head only on labelled positions.

`FastSFTTrainer` subclasses TRL's SFTTrainer and changes one thing: the fused LM head TRL patches into the
model (`fused_lm_head=True`) is replaced by `align.models.lm_head.add_label_head`, which runs the head only on
the hidden states whose next token carries a label (with `assistant_only_loss`, the assistant turns),
`chunk_size` positions at a time, each chunk's logits recomputed in backward. TRL's `compute_loss` is
left as it is, so the loss is TRL's own: the summed negative log-likelihood of the labelled tokens over
`num_items_in_batch` (the labelled tokens of the whole optimizer step, on every process, when TRL passes
it; else this micro-batch's), scaled by the number of processes under `average_tokens_across_devices`;
`loss_type="dft"` and the logged `entropy`, `mean_token_accuracy` and `num_tokens` come out the same.
Where TRL's fused head scores every position (CPU: no Triton), prompt and padding included, in float32
tiles, this scores only the labelled ones.

Where it cannot be exact, TRL's head is kept and the trainer says so once: vision inputs, logit soft-capping
or scaling, MoE auxiliary losses, DeepSpeed ZeRO-3 (the recomputed head would see a sharded weight);
per batch, `align.models.lm_head.add_label_head` hands pre-shifted labels (context/sequence parallelism) to TRL.
Packing and padding-free batches take the fast path: TRL shifts their labels the same way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from trl import SFTTrainer

from align.config import arg
from align.models.lm_head import add_label_head, transforms_logits


@dataclass
class FastSFTArgs:
    label_head: bool = arg(True, "LM head only on labelled (assistant) positions, in chunks, no full-vocabulary logits "
                                 "(align.trainers.sft_fast); off = TRL's fused head, which on a CPU scores every position")
    logprob_chunk_size: int = arg(256, "positions per LM-head chunk with label_head (memory vs. speed)")


class FastSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer with the LM head of `align.models.lm_head.add_label_head` (see the module docstring).

    Two extra keyword arguments: `fast` (False: TRL's SFTTrainer exactly) and `chunk_size`.
    """

    def __init__(self, *args, fast: bool = True, chunk_size: int = 256, **kwargs):
        super().__init__(*args, **kwargs)  # patches TRL's fused head into the model
        self.fallback_reason = self._fallback_reason() if fast else None
        if self.fallback_reason:
            warnings.warn(f"align.trainers.sft_fast: {self.fallback_reason}: using TRL's fused LM head", stacklevel=2)
        elif fast:
            inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            add_label_head(inner, chunk_size)

    def _fallback_reason(self) -> str | None:
        if self._is_vision_dataset:
            return "vision inputs"
        if transforms_logits(self.model.config):
            return "logit soft-capping or scaling"
        if self.aux_loss_enabled:
            return "MoE auxiliary loss"
        if self.is_deepspeed_enabled and getattr(self.accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3:
            return "DeepSpeed ZeRO-3 (the recomputed LM head would see a sharded weight)"
        return None
