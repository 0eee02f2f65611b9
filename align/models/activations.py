"""Activations saved for backward, kept in 16 bits while the compute stays in float32.

A LoRA forward in float32 saves, per layer and token, about a dozen hidden-size vectors for its
backward (the inputs of every adapted projection, the MLP's gate and up outputs, the attention's
inputs and outputs). On a CPU without native bf16 matmuls (most x86 CPUs before AVX512-BF16), training
must compute in float32, and those saved tensors are most of the peak memory without gradient
checkpointing. `compressed_saved_activations` stores each of them as bfloat16 and widens it back to
float32 when backward needs it: half the activation memory for two memory-bound casts, instead of
gradient checkpointing's second forward pass.

What changes numerically: the forward pass (loss, logits, metrics) not at all; the gradients are those
of float32 compute with the saved activations rounded to bfloat16 (8 bits of mantissa, the precision
bf16 mixed-precision training keeps all of its activations in). Model weights are never compressed
(neither the parameters nor views of them), nor are integer/bool tensors, float16/bf16 tensors or
tensors under `min_numel` elements, nor tensors with gaps or overlaps in memory (see `dense_layout`): a
tensor comes back with the strides it was saved with. A tensor saved by several operations (the normed hidden state feeds
the q, k and v adapters) is compressed once and shared.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from align.config import arg


class _Packed:
    """A saved activation in 16 bits, with the dtype it is restored to."""

    __slots__ = ("data", "dtype")

    def __init__(self, data: Tensor, dtype: torch.dtype):
        self.data, self.dtype = data, dtype


def dense_layout(t: Tensor) -> bool:
    """Whether `t`'s elements fill its memory exactly, in some order of its dimensions: no gaps (a slice of a
    padded tensor) and no overlap (an expanded tensor, stride 0). Casting such a tensor keeps its strides;
    casting any other makes a contiguous copy with new strides, which kernels may refuse (CUDA's
    memory-efficient attention needs its mask's rows padded to a multiple of 4 elements: seen on an H200)
    and which, for an expanded tensor, is larger than what was saved."""
    expected = 1
    for size, stride in sorted(((n, st) for n, st in zip(t.shape, t.stride()) if n != 1), key=lambda x: x[1]):
        if stride != expected:
            return False
        expected *= size
    return True


@contextlib.contextmanager
def compressed_saved_activations(
    model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16, min_numel: int = 2**14, share_window_bytes: int = 2**27
) -> Iterator[dict[str, int]]:
    """Within this context, float32 tensors that autograd saves for backward are stored as `dtype`.

    Yields a dict of counters, filled as the forward runs: `compressed` (tensors compressed), `shared`
    (saves that reused a compressed copy), `kept` (saves left as they were), `compressed_bytes` (their
    size before compression).

    Args:
        model: its parameters and buffers (and views of them) are never compressed.
        dtype: the storage dtype (bfloat16: float32's range, so no overflow).
        min_numel: smaller tensors are saved as they are (not worth a cast).
        share_window_bytes: a tensor saved again while it is among the most recent saves totalling this many
            float32 bytes reuses its compressed copy. Those originals are held until they leave the window,
            so this bounds the extra memory held during the forward.

    Only the forward must run inside the context; backward (anywhere) unpacks what it saved.
    """
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta"}
    recent: OrderedDict[tuple, tuple[Tensor, _Packed]] = OrderedDict()
    held = 0
    stats = {"compressed": 0, "shared": 0, "kept": 0, "compressed_bytes": 0}

    def pack(t: Tensor):
        nonlocal held
        if (t.dtype != torch.float32 or t.numel() < min_numel or t.untyped_storage().data_ptr() in weights
                or not dense_layout(t)):
            stats["kept"] += 1
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t._version)
        if key in recent:
            stats["shared"] += 1
            return recent[key][1]
        packed = _Packed(t.detach().to(dtype), t.dtype)
        recent[key] = (t, packed)  # holding t keeps its address from being reused by another tensor
        nbytes = t.numel() * t.element_size()
        held += nbytes
        stats["compressed"] += 1
        stats["compressed_bytes"] += nbytes
        while held > share_window_bytes and len(recent) > 1:
            old, _ = recent.popitem(last=False)[1]
            held -= old.numel() * old.element_size()
        return packed

    def unpack(saved):
        return saved.data.to(saved.dtype) if isinstance(saved, _Packed) else saved

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield stats
    finally:
        recent.clear()


class CompressActivationsMixin:
    """Mixed into a transformers Trainer: with `compress_activations` True, the training forward
    (`compute_loss` with gradients on) runs inside `compressed_saved_activations`.

    Off under FSDP and DeepSpeed ZeRO-3, whose parameters are gathered into fresh storage for each forward
    (they would be taken for activations and copied).
    """

    compress_activations: bool = False

    def compute_loss(self, model, inputs, *args, **kwargs):
        if not (self.compress_activations and torch.is_grad_enabled() and model.training) or self._shards_parameters():
            return super().compute_loss(model, inputs, *args, **kwargs)
        with compressed_saved_activations(model):
            return super().compute_loss(model, inputs, *args, **kwargs)

    def _shards_parameters(self) -> bool:
        if getattr(self, "is_fsdp_enabled", False):
            return True
        plugin = getattr(getattr(getattr(self, "accelerator", None), "state", None), "deepspeed_plugin", None)
        return getattr(self, "is_deepspeed_enabled", False) and getattr(plugin, "zero_stage", 0) == 3


# ------------------------------------------------------------------------------------------ selective checkpointing


def _attention_ops() -> set:
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    return {getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)}


def keep_matmul_outputs(min_inner_dim: int = 64):
    """A selective-checkpointing policy (torch.utils.checkpoint.create_selective_checkpoint_contexts): keep the
    outputs of attention and of every matmul that sums over at least `min_inner_dim` terms (a model's projections,
    LoRA's down-projection A); recompute everything else in backward: norms, rotary embeddings, activation
    functions, residual adds, dtype casts, dropout (same masks: checkpointing restores the RNG state) and LoRA's
    rank-r up-projection B, whose float32 output is as wide as the layer's but costs 2 r FLOPs per element.

    What that buys with LoRA: the saved tensors of a decoder layer are the projections' outputs (bf16), instead
    of those plus the float32 copies PEFT makes of every adapter's input; the recompute is memory-bound
    elementwise work, not the second forward of full checkpointing (TRL's `selective=True` keeps attention only
    and recomputes every matmul)."""
    from torch.utils.checkpoint import CheckpointPolicy

    attention = _attention_ops()
    matmuls = {torch.ops.aten.mm.default: 0, torch.ops.aten.addmm.default: 1, torch.ops.aten.bmm.default: 0}

    def policy(ctx, op, *args, **kwargs):
        if op in attention:
            return CheckpointPolicy.MUST_SAVE
        if op in matmuls and args[matmuls[op]].shape[-1] >= min_inner_dim:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def enable_selective_checkpointing(model, min_inner_dim: int = 64) -> None:
    """Whenever activation checkpointing is turned on for `model` (a transformers PreTrainedModel; the Trainer
    does it when training starts), checkpoint each layer with the `keep_matmul_outputs` policy. Idempotent.

    Exact: a recomputed op gives the value it gave in the forward, so losses and gradients are those of no
    checkpointing (tests/unit/trainers/test_sft_fast.py)."""
    if getattr(model.activation_checkpointing_enable, "_align_selective", False):
        return
    from functools import partial

    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    original = model.activation_checkpointing_enable
    context_fn = partial(create_selective_checkpoint_contexts, keep_matmul_outputs(min_inner_dim))

    def activation_checkpointing_enable(activation_checkpointing_kwargs=None, **kwargs):
        # selective checkpointing intercepts saved tensors, which only non-reentrant checkpointing exposes
        activation_checkpointing_kwargs = {**(activation_checkpointing_kwargs or {}), "use_reentrant": False, "context_fn": context_fn}
        return original(activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)

    activation_checkpointing_enable._align_selective = True
    model.activation_checkpointing_enable = activation_checkpointing_enable


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def _malloc_settings(description: str, *settings: tuple[int, int]) -> str:
    """glibc's mallopt(param, value) for each setting, none on a GPU. Returns "malloc: <description>", or why
    nothing changed (a GPU, no glibc, a setting refused)."""
    if torch.cuda.is_available():
        return "malloc: unchanged (GPU)"
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = all(libc.mallopt(param, value) == 1 for param, value in settings)
    except (OSError, AttributeError):
        ok = False
    return f"malloc: {description}" if ok else "malloc: unchanged (no glibc mallopt)"


def return_freed_memory_to_os(threshold_bytes: int = 2**20) -> str:
    """Make glibc serve allocations of `threshold_bytes` and more with mmap, so that freeing them returns
    the memory to the OS at once.

    By default glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
    blocks of activation size come from the heap and, once freed, mostly stay in the process: its resident
    set grows well past the memory it uses. Setting the threshold explicitly turns that adjustment off. On
    SmolLM2-135M, 4 pairs of up to 256 tokens, gradient checkpointing on, the peak RSS of the first
    forward + backward over the RSS before it went from 1.84 GB to 0.91 GB. Cost: the pages of each large
    tensor are faulted in fresh. A no-op off Linux/glibc and on a GPU.

    The trim threshold is set to twice the mmap threshold, the relation glibc's own adjustment keeps (setting
    either one explicitly stops that adjustment, leaving the trim threshold at 128 KiB): otherwise a freed block
    below the mmap threshold that lies at the heap's top is handed back to the OS at once and faulted in again
    when the next one is allocated, so a threshold above 1 MiB would keep blocks on the heap only now and then.
    """
    return _malloc_settings(f"mmap threshold {threshold_bytes // 2**20} MiB, trim threshold {2 * threshold_bytes // 2**20} MiB",
                            (M_TRIM_THRESHOLD, 2 * threshold_bytes), (M_MMAP_THRESHOLD, threshold_bytes))


GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # where glibc's dynamic mmap threshold stops rising (64-bit)


def heap_for_inference() -> str:
    """After training: serve allocations below 32 MiB from the heap again (and trim it only past 64 MiB), where
    `return_freed_memory_to_os` had sent everything from 1 MiB up to mmap.

    Inference after training (a recipe's after-summary) allocates the same activation-sized blocks over and over;
    with a 1 MiB threshold each one is a fresh mmap whose pages fault in anew. glibc's own dynamic threshold cannot
    be switched back on once set, so this sets the values it arrives at on its own (mmap threshold 32 MiB, trim
    threshold twice that). A no-op where `return_freed_memory_to_os` is (no glibc, a GPU).
    """
    return f"{return_freed_memory_to_os(GLIBC_MMAP_THRESHOLD_MAX)} (inference)"


# The mmap threshold of --return_freed_memory (MiB). 1 keeps a training step's peak RSS lowest (below TRL's for DPO),
# at ~0.75x the speed of 4 on the bf16 CPUs (README, "What the 1 MiB threshold costs and buys"). The DPO recipe's
# CPU short run (the main job) takes 4: there the time is the target, and its peak stays a third of the machine's RAM.
LEAN_MMAP_MB, SHORT_RUN_MMAP_MB = 1, 4


@dataclass
class FreedMemoryArgs:
    """The switch for `return_freed_memory_to_os`, shared by the reward, DPO, PPO and GRPO configs."""

    return_freed_memory: bool = arg(True, "CPU, Linux: allocations of freed_memory_mmap_mb MiB and more come from mmap, so freed activations go back to the OS (peak RSS)")
    freed_memory_mmap_mb: int | None = arg(None, "with return_freed_memory: the mmap threshold in MiB; larger = fewer page faults "
                                                 f"(faster) and a higher peak; none = {LEAN_MMAP_MB} (the DPO recipe's CPU short run: "
                                                 f"{SHORT_RUN_MMAP_MB})")

    def check_freed_memory(self) -> None:
        """None -> LEAN_MMAP_MB (a recipe that chooses otherwise sets it first); a threshold below 1 MiB is a
        ConfigError (align.trainers.common.start_run asks before the output folder is written; freed_memory_note
        asks again for callers without it)."""
        if self.freed_memory_mmap_mb is None:
            self.freed_memory_mmap_mb = LEAN_MMAP_MB
        if self.freed_memory_mmap_mb < 1:
            from align.errors import ConfigError
            raise ConfigError(f"config: freed_memory_mmap_mb: expected a number of MiB >= 1, got {self.freed_memory_mmap_mb}")

    def freed_memory_note(self) -> str | None:
        """Apply the setting (return_freed_memory_to_os) and return its line, or None when it is off."""
        self.check_freed_memory()
        return return_freed_memory_to_os(self.freed_memory_mmap_mb * 2**20) if self.return_freed_memory else None


@dataclass
class MemoryArgs:
    """Activation-memory settings of the SFT recipe (put first among a config's bases: its
    gradient_checkpointing default then wins over ModelArgs')."""

    gradient_checkpointing: bool | None = arg(None, "recompute activations in backward: ~0.6x the peak memory of no checkpointing, "
                                                    "~0.65x its speed (SFT bench, CPU); none = hardware default (GPU: on, CPU: off)")
    selective_checkpointing: bool = arg(False, "with gradient_checkpointing: keep the outputs of attention and the big matmuls, "
                                               "recompute only the cheap ops between them (align.models.activations.keep_matmul_outputs); "
                                               "exact, but measured slower than whole-layer recompute with 2 CPU threads")
    mmap_threshold_mb: int = arg(32, "CPU, Linux: allocations of this many MiB and more come from mmap, so freeing them returns the "
                                     "memory to the OS (peak RSS); 1 = DPO's setting, a lower peak for ~40% more step time "
                                     "(page faults); 0 = glibc's own")

    def validate(self) -> None:
        if self.mmap_threshold_mb < 0:
            from align.errors import ConfigError
            raise ConfigError(f"config: mmap_threshold_mb: expected 0 (glibc's own) or a number of MiB, got {self.mmap_threshold_mb}")


def apply_memory_settings(cfg: MemoryArgs, model) -> list[str]:
    """The process's mmap threshold and, with gradient checkpointing, the selective policy on `model` (a PEFT
    wrapper or a transformers model; call before the Trainer turns checkpointing on). Returns lines to print."""
    notes = []
    if cfg.mmap_threshold_mb > 0:
        notes.append(return_freed_memory_to_os(cfg.mmap_threshold_mb * 2**20))
    if cfg.gradient_checkpointing and cfg.selective_checkpointing:
        enable_selective_checkpointing(model.get_base_model() if hasattr(model, "get_base_model") else model)
        notes.append("selective checkpointing (attention and matmul outputs kept)")
    return notes
