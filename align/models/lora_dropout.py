"""LoRA dropout that keeps no copy of its input for backward.

PEFT computes a LoRA module's update as `lora_B(lora_A(dropout(x)))`. With dropout on, autograd saves, for
every adapted module, the dropped-out input (what lora_A's weight gradient needs) and the dropout mask (a
float32 one on CPUs): two tensors the size of the input, per module, per layer. Modules that read the same
tensor (q, k and v; gate and up) each keep their own pair. Without dropout they would share one saved input.

`fuse_lora_dropout` moves the dropout into lora_A: `DroppedLoraA` draws the mask from a seed, saves the
input itself (the same tensor object the other modules reading it save, so it is stored once) and the
seed, and draws the same mask again in backward. The result is the same function as PEFT's: every input
element kept with probability 1 - p and scaled by 1 / (1 - p), independently per module and per call; only
the random draws differ from nn.Dropout's. What a layer saves is then what it saves without dropout
(align.plan models it so; tests/unit/models/test_lora_dropout.py checks both).

The seed comes from torch's default CPU generator, so runs are reproducible under torch.manual_seed and
gradient checkpointing's recomputation (which restores the RNG state) draws the same masks.

`share_lora_inputs` does the same for mixed precision: PEFT casts each LoRA module's input to its adapter weights'
dtype (float32) and autocast casts it back to bf16 for the matmul, a bf16 copy per module that autograd saves, so
q, k, v, o, gate and up each keep their own copy of what they read. Under autocast PEFT's cast is skipped: the
modules read and save the input itself, shared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dropout_scale(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """keep / (1 - p) for every element of x, in x's dtype: keep ~ Bernoulli(1 - p), drawn from `seed`.

    x: (..., d_in) -> (..., d_in). The same (x.shape, p, seed) always gives the same mask."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32) >= p
    return keep.to(x.dtype) / (1.0 - p)


def draw_seed() -> int:
    """A mask seed from torch's default CPU generator (replayed by checkpointing's RNG-state restore)."""
    return int(torch.randint(0, 2**62, (1,)))


class _DroppedLinear(torch.autograd.Function):
    """h = (x * dropout_scale(x, p, seed)) @ weight.T, saving x and weight (not the dropped-out x, not the mask).

    x: (..., d_in), weight: (r, d_in) -> h: (..., r). Under autocast the matmul runs in the autocast dtype, as
    nn.Linear's does; backward computes in grad_h's dtype and returns gradients in x's and weight's dtypes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.p, ctx.seed = p, seed
        return F.linear(x * dropout_scale(x, p, seed), weight)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        x, weight = ctx.saved_tensors
        scale = dropout_scale(x, ctx.p, ctx.seed).to(grad_h.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = ((grad_h @ weight.to(grad_h.dtype)) * scale).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dropped = (x.to(grad_h.dtype) * scale).reshape(-1, x.shape[-1])
            grad_w = (grad_h.reshape(-1, grad_h.shape[-1]).T @ dropped).to(weight.dtype)
        return grad_x, grad_w, None, None


class DroppedLoraA(nn.Linear):
    """PEFT's lora_A with the adapter's dropout inside (the class `fuse_lora_dropout` gives lora_A modules).

    Same parameters and state-dict keys as the nn.Linear it replaces; in eval mode (or p = 0) it is that
    nn.Linear. `dropout` is the adapter's nn.Dropout, kept as a child module and read at every call, so what
    turns dropout off still works: TRL's trainers (DPO, reward, GRPO with disable_dropout) set every
    nn.Dropout's p to 0."""

    dropout: nn.Dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout.p
        if not (self.training and p > 0):  # like nn.Dropout: on in training mode, with or without grad
            return super().forward(x)
        device = x.device.type
        if torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))  # what nn.Linear saves under autocast: its input in that dtype
        elif x.dtype != self.weight.dtype:
            x = x.to(self.weight.dtype)
        return _DroppedLinear.apply(x, self.weight, p, draw_seed())


def fuse_lora_dropout(model: nn.Module) -> int:
    """Move every vanilla LoRA module's dropout into its lora_A (see the module docstring); returns how many.

    DoRA and other variants (PEFT's `lora_variant`) and modules without dropout are left as they are. Only the
    modules change place and class: parameters, state dict, saving and merging are untouched."""
    fused = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict) or not isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            lora_a = module.lora_A[name] if name in module.lora_A else None
            if (not isinstance(dropout, nn.Dropout) or dropout.p <= 0 or name in getattr(module, "lora_variant", {})
                    or type(lora_a) is not nn.Linear):
                continue
            lora_a.__class__ = DroppedLoraA
            lora_a.dropout = dropout
            dropouts[name] = nn.Identity()
            fused += 1
    return fused


def _cast_only_without_autocast(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a LoRA layer: PEFT's input cast on, unless autocast is on for the input's device and every
    active adapter is vanilla LoRA (a variant, DoRA, computes outside the autocast-covered matmuls)."""
    x = args[0] if args else None
    autocast = isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)
    module.cast_input_dtype_enabled = not (autocast and not any(a in module.lora_variant for a in module.active_adapters))


def share_lora_inputs(model: nn.Module) -> int:
    """Under autocast (a Trainer with bf16=True or fp16=True) let every LoRA layer's adapter read its input as it is,
    without PEFT's cast to the adapter weights' dtype, which autocast undoes for the matmul anyway: the matmuls get
    the same bf16 values (the loss the same to the bit; gradients to bf16 rounding: summed over the modules in
    another order), and the modules that read one tensor save it once instead of a copy each. Per layer and position
    with LoRA on all linear layers, four hidden-size bf16 tensors less (q, k, v, o, gate and up saved a copy each;
    then the two normed inputs and the attention output, which the attention saves anyway); align.plan models it,
    tests/unit/models/test_lora_dropout.py checks it. Without autocast (PPO's engine, inference) PEFT casts as before.
    A quantized base's norms are float32 (prepare_model_for_kbit_training): there autocast's own cast still copies.
    Returns how many layers got the hook."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        layer.register_forward_pre_hook(_cast_only_without_autocast)
    return len(layers)
