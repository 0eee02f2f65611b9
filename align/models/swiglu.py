"""The gated MLP of LLaMA-style models (SmolLM2, Llama, Qwen2, Mistral) without a saved copy of silu(gate).

Such an MLP computes `down_proj(silu(gate_proj(x)) * up_proj(x))`. For backward, autograd's silu keeps its input
(gate) and the product keeps both factors, silu(gate) and up: three tensors of the intermediate size per position
and layer. `swiglu` keeps gate and up only and recomputes silu(gate) in backward, an elementwise op: per position and
layer one intermediate-size tensor less (the default model in bf16: 3 KiB of the 27 KiB a layer kept per position,
bench/results/lean_activations_amd_bf16/). Forward and gradients are bit for bit autograd's: backward calls the
same kernels on the same values (tests/unit/models/test_swiglu.py). `fuse_swiglu` gives every such MLP of a model
this forward while gradients are on; without them (inference) the MLP runs its own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, saving gate and up. gate, up: (..., intermediate), one dtype -> (..., intermediate)."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        # autograd's own formulas: mul's (grad * other) and then silu's backward kernel, on the same values
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up; with gradients on, through _SwiGLU (gate and up saved, not silu(gate))."""
    if torch.is_grad_enabled() and gate.dtype == up.dtype and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    return F.silu(gate) * up


def _forward(self, x: Tensor) -> Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    """cls with `_forward` as its forward (one subclass per class, same name), picklable: it pickles as
    (_new_fused, cls), so unpickling finds cls by name and makes the subclass again."""
    if cls not in _FUSED_CLASSES:
        def __reduce_ex__(self, protocol):
            return (_new_fused, (cls,), *super(fused, self).__reduce_ex__(protocol)[2:])

        fused = type(cls.__name__, (cls,), {"forward": _forward, "__reduce_ex__": __reduce_ex__,
                                            "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _FUSED_CLASSES[cls] = fused
    return _FUSED_CLASSES[cls]


def _new_fused(cls: type):
    return object.__new__(_fused_class(cls))


def _replaceable(module: nn.Module) -> bool:
    """A module whose forward is LlamaMLP's code, `down_proj(act_fn(gate_proj(x)) * up_proj(x))` (LlamaMLP and the
    MLPs copied from it: Qwen2MLP, MistralMLP, ...), with SiLU as act_fn and its own forward not replaced."""
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP

    code, llama = getattr(getattr(type(module), "forward", None), "__code__", None), LlamaMLP.forward.__code__
    return (code is not None and code.co_code == llama.co_code and code.co_names == llama.co_names
            and "forward" not in vars(module)
            and type(getattr(module, "act_fn", None)) in (nn.SiLU, SiLUActivation))


def fuse_swiglu(model: nn.Module) -> int:
    """Give every LlamaMLP-like module of `model` (`_replaceable`) the forward through `swiglu`: its class becomes a
    subclass with that forward, so parameters, state dict, hooks, copies and merging are untouched. Returns how many
    modules changed."""
    fused = 0
    for module in model.modules():
        cls = type(module)
        if cls in _FUSED_CLASSES.values() or not _replaceable(module):
            continue
        module.__class__ = _fused_class(cls)
        fused += 1
    return fused
