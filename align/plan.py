"""Will it fit? Expected peak memory of one training stage, from the model's architecture numbers.

    align plan --model meta-llama/Llama-3.1-8B-Instruct --stage dpo --quantization 4bit --gpu_gb 24
    align plan --model path/to/model_dir --stage ppo --seq_len 512 --micro_batch 4 --json
    python -m align.plan ...                                  # the same command

    from align.plan import PlanArgs, estimate
    est = estimate(PlanArgs(model="Qwen2.5-7B", stage="sft", quantization="4bit"))
    est.peak_bytes, est.verdict, est.components

The model (align.models.architecture) is a preset (`--list_models`), a directory with a config.json, or a Hub id whose config.json is
already in the local Hugging Face cache. Nothing is ever downloaded: only the config is needed.

What is counted follows the code paths this project runs (align.models.loading, align.trainers.common over TRL, align.rl.ppo):

- weights: the frozen base. 4-bit is NF4 with double quantization (0.5 byte + 1/64 byte of 8-bit block
  scales + 4 bytes per 256 blocks per weight); 8-bit is LLM.int8 (1 byte + one fp32 scale per output row).
  Only the seven projections of each layer are quantized; embeddings, lm_head and norms are cast to fp32
  by peft's prepare_model_for_kbit_training.
- adapters, gradients, optimizer: LoRA weights are fp32 (peft's autocast_adapter_dtype), so they are their
  own fp32 master copy; each trainable parameter costs 4 (weight) + 4 (gradient) + 8 (AdamW m and v) bytes.
- activations: what autograd saves per layer and per token, term by term (see `layer_activation_bytes`);
  with gradient checkpointing one layer input per layer plus one recomputed layer.
- logits: SFT and DPO use TRL's fused LM head (no (batch, seq, vocab) logits: one tile of at most 4096
  positions x 32768 vocabulary entries); PPO keeps the response logits and their gradient
  (align.ops.logprobs.logprobs_from_logits computes the float32 log-softmax in chunks of 512 positions);
  the reward model has a one-output score head and no vocabulary logits.
- PPO: one shared base with policy, critic and reward adapters plus value and reward heads; the peak is the
  largest of generation (KV cache; on a CPU in bf16 also the oneDNN-packed copy of the linear weights and the LM
  head that sampling runs through), scoring (no-grad forwards) and the update (policy and critic are
  backpropagated one after the other, so their activations do not add up).
- GRPO/RLOO (TRL): one policy adapter, no critic; a reward model (`--grpo_reward_model`) is its own frozen
  copy of the base (no LM head) with the reward adapter and score head, loaded beside the policy
  (align.trainers.grpo.load_reward), scoring ppo_forward_batch replies at a time.
- DPO: chosen and rejected are concatenated (the batch doubles); reference log-probs come from an
  adapter-disabled no-grad forward in each step (the recipe's default) or are precomputed (no memory
  during training).

bf16/fp16 training under TRL runs under autocast (Trainer bf16=True); the PPO engine runs the bf16 model
without autocast. Both are modelled (they save different copies of the LoRA inputs).

On a GPU the total adds `cuda_overhead_gb` (CUDA context and caching-allocator slack, which
torch.cuda.max_memory_allocated does not see). With `--target cpu` the estimate is of process RSS over its
starting RSS and adds the constants calibrated by bench/validate_planner.py (see CPU_CALIBRATION).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Literal

from align.config import arg, parse_config
from align.errors import ConfigError, cli_main
from align.models.architecture import PRESETS, PROJECTIONS, Arch, resolve_arch

GiB = 2**30
GPU_SIZES_GB = (8, 12, 16, 24, 48, 80)

# NF4 with double quantization: 4 bits, one 8-bit absmax per 64 weights, one fp32 scale per 256 blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_BYTES_PER_PARAM = 1.0
ADAMW_STATE_BYTES = 8  # exp_avg and exp_avg_sq, fp32
FUSED_HEAD_TOKENS = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE
FUSED_HEAD_VOCAB = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
PPO_LOGPROB_CHUNK = 512  # align.ops.logprobs.logprobs_from_logits chunk_size

# Only for --target cpu (process RSS); measured on this project's CPU machine, see bench/validate_planner.py.
#   fixed_bytes: RSS a training step adds beyond its tensors (oneDNN/MKL scratch and thread buffers,
#     autograd and PEFT bookkeeping, small-block heaps): measured minus predicted of the calibration setting
#     (sft T=64 mb=1: 880168960 - 823710362 bytes, bench/results/planner_cpu.json).
#   fused_tile_fp32_copies: float32 tile-sized temporaries alive at once in TRL's torch (non-Triton) fused
#     LM head, next to the tile itself (y, z, log_p, p, grad, the target mask as float, two products):
#     bench/calibrate_fused_head.py measured 8.34 to 8.44 tile-sized buffers in all (510 and 1022 positions, two runs).
CPU_CALIBRATION = {"fixed_bytes": 56_458_598, "fused_tile_fp32_copies": 7.35}


# ------------------------------------------------------------------------------------------ config


@dataclass
class PlanArgs:
    model: str = arg("SmolLM2-135M-Instruct", "a preset (--list_models), a directory with config.json, or a Hub id whose config.json is in the local HF cache")
    stage: Literal["sft", "reward", "dpo", "ppo", "grpo"] = arg("dpo", "training stage (grpo: GRPO and RLOO, one policy adapter, no critic)")
    quantization: Literal["none", "8bit", "4bit"] = arg("4bit", "bitsandbytes quantization of the frozen base")
    dtype: Literal["bf16", "fp16", "fp32"] = arg("bf16", "compute dtype of the base and the activations")
    lora_r: int = arg(16, "LoRA rank (the planner models LoRA training; full fine-tuning is not modelled)")
    lora_targets: list[str] = arg(["all-linear"], "LoRA target modules: all-linear, or a list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    lora_dropout: float = arg(0.05, "LoRA dropout (the recipes draw it inside lora_A and save no extra activations for it: align.models.lora_dropout)")
    seq_len: int = arg(1024, "tokens per sequence, padded (PPO: prompt + response)")
    micro_batch: int = arg(1, "rows per forward/backward: sequences (SFT), pairs (reward, DPO) or rollouts (PPO)")
    gradient_checkpointing: bool = arg(True, "recompute activations in backward")
    fused_swiglu: bool = arg(True, "the recipes' gated MLP, silu(gate) recomputed in backward instead of saved (their fused_swiglu)")
    dpo_reference: Literal["precomputed", "adapter_disabled"] = arg("adapter_disabled", "DPO reference log-probs: by an adapter-disabled forward every step (the recipe's default), or computed once before training")
    ppo_response_len: int = arg(256, "PPO and GRPO: generated tokens per reply (part of seq_len)")
    ppo_rollout_batch: int = arg(8, "PPO: prompts generated at once per process; GRPO: replies generated at once per process "
                                    "(prompts x num_generations; the KV cache batch)")
    ppo_forward_batch: int = arg(8, "PPO: rows per no-grad scoring forward; GRPO: replies per reward-model forward")
    grpo_beta: float = arg(0.05, "GRPO: KL coefficient (recipes/grpo.py's default); > 0 adds the reference forward (adapter disabled)")
    grpo_reward_model: bool = arg(False, "GRPO: the reward is a model (recipes/grpo.py --reward outputs/reward): a second copy of the "
                                         "base with the reward adapter and score head, loaded beside the policy; the verifier or a "
                                         "Python function costs nothing")
    gpu_gb: float = arg(24.0, "GPU memory in GB as sold (a 24 GB card has 24 GiB)")
    cuda_overhead_gb: float = arg(1.0, "CUDA context plus caching-allocator slack, outside max_memory_allocated (an assumed margin, not measured here)")
    target: Literal["cuda", "cpu"] = arg("cuda", "cuda: GPU memory; cpu: process RSS over its start (with the CPU calibration)")
    json: bool = arg(False, "print the estimate as JSON")
    list_models: bool = arg(False, "list the presets and exit")

    def validate(self) -> None:
        for name in ("lora_r", "seq_len", "micro_batch", "ppo_rollout_batch", "ppo_forward_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config: {name}: expected a positive integer, got {getattr(self, name)}")
        if self.gpu_gb <= 0:
            raise ConfigError(f"config: gpu_gb: expected a positive number, got {self.gpu_gb}")
        if self.cuda_overhead_gb < 0:
            raise ConfigError(f"config: cuda_overhead_gb: expected >= 0, got {self.cuda_overhead_gb}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"config: lora_dropout: expected a number in [0, 1), got {self.lora_dropout}")
        if self.grpo_beta < 0:
            raise ConfigError(f"config: grpo_beta: expected >= 0, got {self.grpo_beta}")
        if self.stage in ("ppo", "grpo") and not 1 <= self.ppo_response_len < self.seq_len:
            raise ConfigError(
                f"config: ppo_response_len: expected 1 <= ppo_response_len < seq_len ({self.seq_len}), got {self.ppo_response_len}"
            )
        self.target_modules()

    def target_modules(self) -> tuple[str, ...]:
        if self.lora_targets == ["all-linear"]:
            return PROJECTIONS
        unknown = [m for m in self.lora_targets if m not in PROJECTIONS]
        if unknown or not self.lora_targets:
            raise ConfigError(
                f"config: lora_targets: unknown module {unknown[0] if unknown else '(empty)'!r}; expected all-linear or "
                f"names from {', '.join(PROJECTIONS)}"
            )
        return tuple(m for m in PROJECTIONS if m in self.lora_targets)


# ------------------------------------------------------------------------------------------ the model


@dataclass
class Numerics:
    """Which tensor is stored in which precision along the code path of a stage."""

    act: int  # bytes per element of the layer activations (q, k, v, MLP)
    resid: int  # bytes per element of the residual stream (the layer input kept by checkpointing)
    lora_in: int  # bytes per element of the copy of its input that a LoRA module saves
    lora_out: int  # bytes per element of lora_A's output
    lora_in_shared: bool  # True: modules reading the same tensor share it (no cast); False: one copy each
    head: int  # bytes per element of the LM-head matmul (logits tile or PPO logits)
    autocast: bool


def numerics(args: PlanArgs) -> Numerics:
    quantized = args.quantization != "none"
    if args.dtype == "fp32":
        return Numerics(act=4, resid=4, lora_in=4, lora_out=4, lora_in_shared=True, head=4, autocast=False)
    # prepare_model_for_kbit_training casts embeddings, norms and lm_head to fp32: the residual stream is fp32
    resid = 4 if quantized else 2
    if args.stage == "ppo":  # the bf16 model without autocast: fp32 LoRA weights make peft cast each input to fp32
        return Numerics(act=2, resid=resid, lora_in=4, lora_out=4, lora_in_shared=quantized,
                        head=4 if quantized else 2, autocast=False)
    # TRL with bf16=True: autocast runs every LoRA matmul in bf16. Under autocast PEFT's input cast is skipped
    # (align.models.lora_dropout.share_lora_inputs), so on a bf16 base the modules share their bf16 input; a
    # quantized base's fp32 normed input is cast to bf16 by autocast, a copy per module
    return Numerics(act=2, resid=resid, lora_in=2, lora_out=2, lora_in_shared=not quantized, head=2, autocast=True)


def layer_activation_bytes(arch: Arch, targets: tuple[str, ...], r: int, num: Numerics, fused_mlp: bool = True) -> float:
    """Bytes autograd saves for one decoder layer per token (LoRA training, frozen base, SDPA attention).

    Term by term (h hidden, q = heads*head_dim, kv = kv_heads*head_dim, I intermediate, r LoRA rank):
      two RMSNorms: a float32 copy of the input (4h) and rsqrt (4), each
      SDPA: q, k, v, output (act * (2q + 2kv)) and the float32 logsumexp (4 * heads)
      SwiGLU MLP: gate and up outputs (2 * act * I; silu(gate) too, 3 * act * I, where the MLP is not fused:
        fused_swiglu false, or an MLP align.models.swiglu does not replace)
      each LoRA module: lora_A's output (lora_out * r) and its input: shared by modules that read the same
        tensor when no cast is needed (q/k/v read the normed input, gate/up too, o reads the SDPA output
        already counted), else one copy per module. LoRA dropout adds nothing: the recipes draw it inside
        lora_A from a seed and save the undropped input (align.models.lora_dropout.fuse_lora_dropout).
    The frozen base projections save no activations (their weight gradient is never needed).
    Checked exactly against autograd's saved tensors on tiny models in tests/unit/test_plan.py.
    """
    h, I = arch.hidden, arch.intermediate
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    total = 2 * (4 * h + 4)
    total += num.act * (2 * q + 2 * kv) + 4 * arch.heads
    total += (2 if fused_mlp else 3) * num.act * I
    shapes = arch.linear_shapes()
    total += sum(num.lora_out * r for _ in targets)
    if not num.lora_in_shared:
        return total + sum(num.lora_in * shapes[m][0] for m in targets)
    # shared (no cast: the normed inputs are already fp32): one saved tensor per group of modules that read it
    if any(m in targets for m in ("q_proj", "k_proj", "v_proj")):
        total += num.lora_in * h
    if "o_proj" in targets and num.act != num.lora_in:
        total += num.lora_in * q  # the SDPA output (saved by SDPA in its own dtype) is cast for the adapter
    if any(m in targets for m in ("gate_proj", "up_proj")):
        total += num.lora_in * h
    if "down_proj" in targets:
        total += num.lora_in * I  # the gated product, saved only for the adapter
    return total


def base_weight_bytes(arch: Arch, quantization: str, dtype_bytes: int, with_lm_head: bool) -> float:
    """Frozen base weights. Quantized: the projections per the scheme, the rest fp32 (prepare_model_for_kbit_training)."""
    linear = arch.layers * arch.linear_params_per_layer()
    rest = arch.layers * arch.bias_params_per_layer() + arch.embedding_params(with_lm_head) + arch.norm_params()
    if quantization == "none":
        return (linear + rest) * dtype_bytes
    if quantization == "4bit":
        return linear * NF4_BYTES_PER_PARAM + rest * 4
    out_rows = arch.layers * sum(out for _, out in arch.linear_shapes().values())
    return linear * INT8_BYTES_PER_PARAM + out_rows * 4 + rest * 4


def lora_params(arch: Arch, targets: tuple[str, ...], r: int) -> int:
    shapes = arch.linear_shapes()
    return arch.layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in targets)


@dataclass
class Estimate:
    """Expected peak memory in bytes. `components` add up to `peak_bytes` (the peak phase's view)."""

    args: dict
    arch: dict
    components: dict[str, float]
    phases: dict[str, float]  # total bytes at the peak of each phase
    peak_phase: str
    peak_bytes: float
    capacity_bytes: float
    verdict: str  # "fits", "tight" (over 90% of the GPU) or "does not fit"
    notes: list[str] = field(default_factory=list)
    trainable_params: int = 0

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.capacity_bytes

    def to_dict(self) -> dict:
        out = asdict(self)
        out["fits"] = self.fits
        return out


def _activations(arch: Arch, args: PlanArgs, num: Numerics, tokens: int) -> tuple[float, float]:
    """(training activations, one no-grad forward's working set) in bytes for `tokens` positions."""
    targets = args.target_modules()
    layer = layer_activation_bytes(arch, targets, args.lora_r, num, args.fused_swiglu) * tokens
    final_norm = (4 * arch.hidden + 4) * tokens
    # Backward holds one layer's gradients while its saved tensors are still alive: about one layer more.
    if args.gradient_checkpointing:
        train = arch.layers * num.resid * arch.hidden * tokens + 2 * layer + final_norm
    else:
        train = (arch.layers + 1) * layer + final_norm
    # Without grad only one layer's intermediates live at a time, next to the residual stream.
    no_grad = layer + 2 * num.resid * arch.hidden * tokens
    return train, no_grad


def _fused_head_bytes(arch: Arch, num: Numerics, positions: int, target: str) -> float:
    """TRL's fused LM head: the saved hidden states, an fp32 gradient for them, and one logits tile."""
    tile = min(positions, FUSED_HEAD_TOKENS) * min(arch.vocab, FUSED_HEAD_VOCAB)
    per_tile = num.head if target == "cuda" else num.head + 4 * CPU_CALIBRATION["fused_tile_fp32_copies"]
    return tile * per_tile + positions * arch.hidden * (num.resid + 4)


def _generation(arch: Arch, args: PlanArgs, num: Numerics) -> dict[str, float]:
    """Generation (PPO rollouts, GRPO replies): the KV cache of prompt + response for the ppo_rollout_batch rows
    generated at once, the prefill's no-grad working set and the last-position logits (fp32 in the sampler)."""
    G, T, R = args.ppo_rollout_batch, args.seq_len, args.ppo_response_len
    return {"kv_cache": 2 * arch.layers * arch.kv_heads * arch.head_dim * num.act * G * T,
            "activations": _activations(arch, args, num, G * (T - R))[1],
            "logits": G * arch.vocab * 4 * 3}


def estimate(args: PlanArgs) -> Estimate:
    """Expected peak memory of one training step of `args.stage` (see the module docstring for the model)."""
    args.validate()
    arch = resolve_arch(args.model)
    num = numerics(args)
    components, trainable = _persistent_bytes(arch, args, num)
    phases, notes = _phase_bytes(arch, args, num, components)
    mapped = 0.0
    if args.target == "cpu" and args.quantization != "none":
        # On a CPU the loader keeps the safetensors file memory-mapped (the unquantized embeddings alias it), so
        # the pages read to quantize the projections stay resident: clean file pages, counted in RSS.
        mapped = arch.layers * arch.linear_params_per_layer() * float(arch.checkpoint_bytes)
    for parts in phases.values():
        for key in ("activations", "logits", "transient", "kv_cache"):
            parts.setdefault(key, 0.0)
        if mapped:
            parts["mapped_checkpoint"] = mapped
        parts["runtime_overhead"] = args.cuda_overhead_gb * GiB if args.target == "cuda" else float(CPU_CALIBRATION["fixed_bytes"])
    totals = {name: sum(parts.values()) for name, parts in phases.items()}
    peak_phase = max(totals, key=totals.get)
    peak = totals[peak_phase]
    capacity = args.gpu_gb * GiB
    verdict = "does not fit" if peak > capacity else ("tight" if peak > 0.9 * capacity else "fits")
    if args.gradient_checkpointing is False and args.stage != "ppo":
        notes.append("gradient checkpointing is off: activations are kept for every layer")
    return Estimate(
        args=asdict(args), arch=asdict(arch), components=phases[peak_phase], phases=totals, peak_phase=peak_phase,
        peak_bytes=peak, capacity_bytes=capacity, verdict=verdict, notes=notes, trainable_params=trainable,
    )


def _persistent_bytes(arch: Arch, args: PlanArgs, num: Numerics) -> tuple[dict[str, float], int]:
    """({weights, adapters, gradients, optimizer}: bytes held for the whole run, trainable parameter count)."""
    dtype_bytes = {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype]
    weights = base_weight_bytes(arch, args.quantization, dtype_bytes, with_lm_head=args.stage != "reward")
    adapter = lora_params(arch, args.target_modules(), args.lora_r)
    head = arch.hidden + 1  # a one-output linear head (reward score, PPO value)
    if args.stage == "ppo":
        # policy and critic adapters train; the reward adapter and its head are frozen
        trainable, frozen_extra = 2 * adapter + head, adapter + head
    elif args.stage == "reward":
        trainable = adapter + head
        frozen_extra = head  # modules_to_save keeps the original score head next to the trained copy
    else:
        trainable, frozen_extra = adapter, 0
    components = {
        "weights": weights,
        "adapters": (trainable + frozen_extra) * 4.0,
        "gradients": trainable * 4.0,
        "optimizer": trainable * float(ADAMW_STATE_BYTES),
    }
    if args.stage == "grpo" and args.grpo_reward_model:
        # align.models.reward_model.load_reward_model: the base again, as a sequence classifier, with the frozen
        # reward adapter (fp32) and its one-output score head
        components["reward_model"] = base_weight_bytes(arch, args.quantization, dtype_bytes, with_lm_head=False) + (adapter + head) * 4.0
    if num.autocast:
        components["adapters"] += trainable * 2.0  # autocast keeps a bf16 copy of each trainable weight in its cache
    return components, trainable


def _phase_bytes(arch: Arch, args: PlanArgs, num: Numerics, components: dict[str, float]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Per-step working memory, per phase of `args.stage`: each phase lists everything alive at its peak."""
    B, T = args.micro_batch, args.seq_len
    notes: list[str] = []
    dequant = 0.0
    if args.quantization != "none":
        # bitsandbytes dequantizes one projection at a time to the compute dtype (forward and backward)
        dequant = max(a * b for a, b in arch.linear_shapes().values()) * (4 if args.dtype == "fp32" else 2)
    no_grads = {**components, "gradients": 0.0}  # gradients are freed (set to None) between steps
    phases: dict[str, dict[str, float]] = {}
    if args.stage in ("sft", "dpo"):
        rows = B * (2 if args.stage == "dpo" else 1)
        act, no_grad = _activations(arch, args, num, rows * T)
        logits = _fused_head_bytes(arch, num, rows * (T - 1), args.target)
        phases["train step"] = {**components, "activations": act, "logits": logits, "transient": dequant}
        if args.stage == "dpo" and args.dpo_reference == "adapter_disabled":
            phases["reference forward"] = {**no_grads, "activations": no_grad, "logits": logits, "transient": dequant}
        if args.stage == "dpo":
            notes.append("DPO: chosen and rejected are one concatenated batch of 2 x micro_batch rows")
    elif args.stage == "reward":
        tokens = 2 * B * T
        act, _ = _activations(arch, args, num, tokens)
        score_in = tokens * arch.hidden * num.resid  # the trainable score head saves its input
        phases["train step"] = {**components, "activations": act + score_in, "transient": dequant}
        notes.append("reward: chosen and rejected are one batch of 2 x micro_batch rows; no vocabulary logits (an upper "
                     "bound: the recipe computes a pair's common start once, --share_prompt)")
    elif args.stage == "ppo":
        R = args.ppo_response_len
        # update: policy then critic, each backpropagated on its own; the policy (with logits) is the larger
        act, _ = _activations(arch, args, num, B * T)
        chunk = min(B * R, PPO_LOGPROB_CHUNK) * arch.vocab * 4 * 3  # a float32 chunk, its exp and its gradient
        logits = 2 * B * R * arch.vocab * num.head + chunk  # the response logits saved for backward, their gradient
        phases["update"] = {**components, "activations": act, "logits": logits, "transient": dequant}
        phases["generation"] = {**no_grads, **_generation(arch, args, num), "transient": dequant}
        if args.target == "cpu" and args.dtype == "bf16" and args.quantization == "none":
            # align.models.generation.packed_linear_weights: a oneDNN-packed bf16 copy of every linear weight and of
            # the LM head while sampling (on CPUs with oneDNN's bf16 matmul, where dtype auto gives bf16)
            phases["generation"]["packed_weights"] = (arch.layers * arch.linear_params_per_layer() + arch.vocab * arch.hidden) * 2.0
        # scoring: old and reference log-probs, values; no grad, ppo_forward_batch rows at a time
        F = args.ppo_forward_batch
        _, no_grad = _activations(arch, args, num, F * T)
        score_logits = F * R * arch.vocab * num.head + min(F * R, PPO_LOGPROB_CHUNK) * arch.vocab * 4 * 3
        phases["scoring"] = {**no_grads, "activations": no_grad, "logits": score_logits, "transient": dequant}
        notes.append("PPO: one base with policy, critic and reward adapters; value and reward heads")
    else:  # grpo: TRL's GRPOTrainer/RLOOTrainer, one policy adapter; its log-probs use the fused LM head like SFT
        act, no_grad = _activations(arch, args, num, B * T)
        logits = _fused_head_bytes(arch, num, B * args.ppo_response_len, args.target)
        phases["train step"] = {**components, "activations": act, "logits": logits, "transient": dequant}
        phases["generation"] = {**no_grads, **_generation(arch, args, num), "transient": dequant}
        if args.grpo_beta > 0:
            phases["reference forward"] = {**no_grads, "activations": no_grad, "logits": logits, "transient": dequant}
        if args.grpo_reward_model:
            _, scoring = _activations(arch, args, num, args.ppo_forward_batch * T)
            phases["reward scoring"] = {**no_grads, "activations": scoring, "transient": dequant}
            notes.append("GRPO/RLOO: the reward model is a second frozen copy of the base beside the policy")
        notes.append("GRPO/RLOO: one policy adapter, no critic or value head; micro_batch counts replies")
    return phases, notes


# ------------------------------------------------------------------------------------------ searches


def _largest(args: PlanArgs, name: str, upper: int) -> int:
    """Largest value of the integer field `name` in [1, upper] whose estimate fits (0 if even 1 does not).

    Memory grows monotonically with micro_batch and seq_len, so a binary search is exact.
    """
    def fits(value: int) -> bool:
        trial = PlanArgs(**{**asdict(args), name: value})
        return estimate(trial).fits

    lo = 1 if args.stage not in ("ppo", "grpo") or name != "seq_len" else args.ppo_response_len + 1
    if not fits(lo):
        return 0
    hi = upper
    if fits(hi):
        return hi
    while hi - lo > 1:  # invariant: fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def largest_micro_batch(args: PlanArgs, upper: int = 4096) -> int:
    return _largest(args, "micro_batch", upper)


def largest_seq_len(args: PlanArgs) -> int:
    return _largest(args, "seq_len", resolve_arch(args.model).max_positions)


# ------------------------------------------------------------------------------------------ output


def _gib(x: float) -> str:
    return f"{x / GiB:7.2f}"


def plan_report(args: PlanArgs) -> dict:
    """The estimate plus the GPU-size table and the largest fitting micro-batch and sequence length."""
    est = estimate(args)
    by_gpu = {}
    for size in GPU_SIZES_GB:
        trial = PlanArgs(**{**asdict(args), "gpu_gb": float(size)})
        by_gpu[str(size)] = estimate(trial).verdict
    out = est.to_dict()
    out["verdict_by_gpu_gb"] = by_gpu
    out["largest_micro_batch"] = largest_micro_batch(args)
    out["largest_seq_len"] = largest_seq_len(args)
    return out


COMPONENT_HELP = {
    "weights": "frozen base",
    "adapters": "LoRA weights (fp32) and heads",
    "gradients": "fp32, trainable parameters",
    "optimizer": "AdamW m and v, fp32",
    "activations": "saved for backward",
    "logits": "LM head (fused tile / PPO response logits)",
    "transient": "dequantized projection",
    "kv_cache": "KV cache of generation (PPO, GRPO)",
    "reward_model": "GRPO: frozen reward model beside the policy",
    "runtime_overhead": "CUDA context + allocator slack (assumed margin)",
    "mapped_checkpoint": "cpu only: checkpoint pages still mapped",
}


def format_report(report: dict) -> str:
    a, arch = report["args"], report["arch"]
    unit = "GPU" if a["target"] == "cuda" else "CPU RSS"
    lines = [
        f"model {arch['name']}: {arch['layers']} layers, hidden {arch['hidden']}, heads {arch['heads']}/{arch['kv_heads']} (q/kv), "
        f"intermediate {arch['intermediate']}, vocab {arch['vocab']}, {'tied' if arch['tied_embeddings'] else 'untied'} embeddings",
        f"stage {a['stage']}, {a['quantization']} base, {a['dtype']}, LoRA r={a['lora_r']} on {','.join(a['lora_targets'])}, "
        f"seq_len {a['seq_len']}, micro_batch {a['micro_batch']}, gradient checkpointing {'on' if a['gradient_checkpointing'] else 'off'}"
        + (f", response {a['ppo_response_len']}, rollout batch {a['ppo_rollout_batch']}" if a["stage"] in ("ppo", "grpo") else ""),
        f"trainable parameters: {report['trainable_params'] / 1e6:.2f} M",
        "",
        f"{'component':<18}{'GiB':>8}   what",
    ]
    for key, value in report["components"].items():
        if value == 0 and key in ("transient", "kv_cache", "logits"):
            continue  # not part of this stage's peak
        what = "calibrated RSS constant (CPU_CALIBRATION)" if key == "runtime_overhead" and a["target"] == "cpu" else COMPONENT_HELP.get(key, "")
        lines.append(f"{key:<18}{_gib(value):>8}   {what}")
    lines.append(f"{'peak':<18}{_gib(report['peak_bytes']):>8}   during: {report['peak_phase']}")
    if len(report["phases"]) > 1:
        lines.append("phase peaks (GiB): " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in report["phases"].items()))
    lines += [
        "",
        f"verdict for a {a['gpu_gb']:g} GB {unit}: {report['verdict'].upper()} ({report['peak_bytes'] / GiB:.2f} of {report['capacity_bytes'] / GiB:.2f} GiB)",
        "by GPU size: " + "  ".join(f"{k} GB {v}" for k, v in report["verdict_by_gpu_gb"].items()),
        f"largest micro_batch that fits at seq_len {a['seq_len']}: {report['largest_micro_batch']}",
        f"largest seq_len that fits at micro_batch {a['micro_batch']}: {report['largest_seq_len']}",
    ]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


@cli_main
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print("\n".join(__doc__.splitlines()[:5]) + "\n")  # what it does and two examples, then every option
    args = parse_config(PlanArgs, argv)
    if args.list_models:
        for name, arch in PRESETS.items():
            print(f"{name:<24}{arch.total_params() / 1e9:6.2f} B parameters")
        return
    report = plan_report(args)
    print(json.dumps(report, indent=2) if args.json else format_report(report))


if __name__ == "__main__":
    main(sys.argv[1:])
