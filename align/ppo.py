"""The PPO engine: one base model carries the policy, the critic and the reward model as LoRA adapters.

    models, plan = build_models(cfg, dist=dist)           # the base once + adapters, heads, tokenizer
    reward_fn = reward_function(cfg, plan, models)        # shared adapter, separate model or a function
    trainer = PPOTrainer(cfg, models, prompts, reward_fn, dist=dist)
    summary = trainer.train()                             # recipes/ppo.py is the runnable version

One base, several adapters (the base is the SFT model; 4-bit on a GPU):
    policy      LoRA adapter "policy" and the base's lm_head; trained
    critic      LoRA adapter "critic" and a value head; trained. Initialised from the reward model when the
                reward model shares the base (same LoRA weights, value head = score head), else fresh
    reward      LoRA adapter "reward" and the score head of the reward recipe's output; frozen
    reference   the base with every adapter disabled
`adapter_phase` is the only way the engine switches between them: inside it exactly one adapter is
active (none for the reference) and only a trainable phase's own parameters have requires_grad.

The reward can also be a separate reward model (another checkpoint, even another tokenizer: responses
are decoded to text and re-encoded with its tokenizer) or a Python function
`fn(prompt_records, responses) -> list[float]`; the built-in verifier (align.verifier) is one.

Each update (PPOTrainer.train) runs five phases; the math is a call into align.ppo_math:
    1. generate              one sampled response per prompt (pure sampling at `temperature`)
    2. score                 old and reference log-probs and values once per rollout (no grad); reward
    3. estimate advantages   KL-penalised rewards, GAE, whitening over the global batch
    4. update                `ppo_epochs` epochs of shuffled minibatches, gradient accumulation, clipping
    5. log                   metrics.jsonl, TensorBoard, health checks, checkpoints

Sampling. Each response is a function of (seed, update, its index in the global batch) alone:
`GumbelSampler` draws every row's next token as argmax(logits / T + Gumbel noise) with that row's own
generator, which samples exactly from softmax(logits / T) (the Gumbel-max trick). A batch split across
two processes therefore samples the same tokens as one process, and resuming needs no sampler state.

Several processes (`accelerate launch --multi_gpu --num_processes N`, gloo on CPU). Each process rolls out
rollout_batch_size / N prompts. Advantages are whitened over the global batch (all_gather); minibatches
are drawn from one global permutation and each process works on the rows it holds; every loss is a sum
over tokens divided by the minibatch's global token count and gradients are summed across processes. An
update therefore equals the one-process update up to float summation order (OpenRLHF's invariant:
per-rank token sums over the global token count add up to the global token mean).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from align import ppo_math
from align.config import arg
from align.errors import AlignError, ConfigError
from align.io import append_jsonl, atomic_dir, atomic_write_json
from align.models import (
    ModelArgs,
    check_peft_supported,
    eval_mode,
    load_model,
    load_tokenizer,
    lora_config,
    resolve_model_path,
    resolve_quantization,
)
from align.publish import PublishArgs
from align.records import PromptRecord
from align.train import NonFiniteError, peak_memory_mb

POLICY, CRITIC, REWARD = "policy", "critic", "reward"
RewardFn = Callable[[list[PromptRecord], list[str]], list[float]]


class HealthStop(AlignError):
    """A health check crossed its threshold under --stop_on_health."""


@dataclass
class PPOArgs(ModelArgs, PublishArgs):
    # ---- where the models come from
    sft_dir: str | None = arg("outputs/sft", "the SFT run: a merged model is the base, an adapter is merged into its base in memory; missing = model_name_or_path")
    reward: str = arg("auto", "auto (reward_model if it exists, else verifier) | model | verifier | module.path:function | file.py:function")
    reward_model: str = arg("outputs/reward", "the reward recipe's output (a SEQ_CLS adapter + score head) or any reward model directory")
    reward_placement: Literal["auto", "shared", "separate"] = arg(
        "auto", "auto: the reward adapter goes on the policy's base when it was trained on the same base, else a separate model"
    )
    # ---- data
    prompts: str = arg("ifprefs:sft", "training prompts (the prompt part of any supported data)")
    max_prompts: int | None = arg(None, "use at most this many training prompts; none = all")
    max_prompt_length: int = arg(256, "prompts longer than this many tokens (with the chat template) are skipped and counted")
    eval_prompts: str | None = arg("ifprefs:eval", "held-out prompts for the verifier score before/after training; none = skip")
    num_eval_prompts: int = arg(32, "how many held-out prompts to answer greedily before and after training (0 = skip)")
    summary_max_new_tokens: int = arg(96, "longest held-out reply generated before and after training (as the other recipes' summaries)")
    # ---- rollout
    rollout_batch_size: int = arg(8, "prompts per update, over all processes")
    response_length: int = arg(64, "maximum new tokens per response")
    temperature: float = arg(0.7, "sampling temperature (pure sampling: no top-k, top-p or repetition penalty)")
    reward_guard: bool = arg(True, "with the verifier reward: a degenerate reply (align.degeneration: a loop, a line repeated 3 times, "
                                   "an instruction copied back) earns 0; false = the raw verifier score, for ablations")
    missing_eos_penalty: float | None = arg(None, "subtracted from the score of a response that hit the length limit without EOS")
    forward_batch_size: int = arg(8, "rows per no-grad forward pass (scoring) per process")
    # ---- PPO
    total_updates: int = arg(16, "PPO updates (one rollout batch each)")
    ppo_epochs: int = arg(1, "passes over each rollout batch")
    minibatch_size: int = arg(4, "rollout rows per optimizer step, over all processes")
    micro_batch_size: int = arg(4, "rows per forward/backward per process (gradient accumulation fills the minibatch)")
    learning_rate: float = arg(5e-5, "policy adapter learning rate")
    critic_learning_rate: float = arg(2e-4, "critic adapter and value head learning rate")
    lr_scheduler: Literal["constant", "linear"] = arg("constant", "learning rate over the run: constant, or linear decay to 0")
    max_grad_norm: float = arg(1.0, "gradient clipping norm, applied to the policy and to the critic separately")
    cliprange: float = arg(0.2, "PPO ratio clip epsilon")
    cliprange_value: float | None = arg(0.2, "value clip epsilon; none = unclipped value loss")
    gamma: float = arg(1.0, "discount")
    lam: float = arg(0.95, "GAE lambda")
    kl_coef: float = arg(0.05, "KL penalty coefficient beta (initial value when kl_target is set)")
    kl_estimator: Literal["k1", "k2", "k3"] = arg("k1", "per-token KL estimator in the reward (see align.ppo_math.token_kl)")
    kl_target: float | None = arg(None, "adaptive KL: steer the mean KL per response towards this (nats); none = fixed beta")
    kl_horizon: float = arg(10000.0, "adaptive KL horizon, in responses")
    whiten_rewards: bool = arg(False, "whiten the per-token rewards (keeping their mean) before GAE")
    # ---- run
    output_dir: str = arg("outputs/ppo", "where the adapters, checkpoints, metrics and summary go")
    seed: int = arg(0, "seed for the prompt order, sampling and minibatch shuffles")
    save_steps: int = arg(4, "checkpoint every N updates (and at the end, and on SIGTERM/Ctrl-C)")
    save_total_limit: int = arg(2, "checkpoints kept (older ones are deleted)")
    resume: bool = arg(False, "continue from the last checkpoint in output_dir (the training settings must match it)")
    overwrite: bool = arg(False, "output_dir holds an earlier run: move it aside to <output_dir>.old-<time> and start over")
    report_to: Literal["tensorboard", "none"] = arg("tensorboard", "TensorBoard logs in output_dir/tensorboard, or none")
    min_free_gb: float = arg(1.0, "refuse to start with less free disk than this in output_dir")
    cpu_threads: int = arg(0, "torch threads on a CPU; 0 = auto: the cores idle when the run starts, at least 1; -1 = leave torch's setting")
    return_freed_memory: bool = arg(True, "CPU, Linux: allocations of 1 MiB and more come from mmap, so freed activations go back to the OS (peak RSS)")
    # ---- health checks (warn in the log and summary; stop the run under stop_on_health)
    stop_on_health: bool = arg(False, "stop the run (after a checkpoint) when a health check crosses its threshold")
    health_min_kl: float = arg(-0.05, "warn when the mean KL per response is below this and 2 standard errors below 0 (a sampling/scoring mismatch)")
    health_kl_budget: float = arg(10.0, "warn when the mean KL per response exceeds this (nats)")
    health_max_ratio: float = arg(10.0, "warn when the largest PPO ratio in an update exceeds this")
    health_eos_drop: float = arg(0.25, "warn when the share of responses ending with EOS falls this much below the run's start")
    health_saturation_rise: float = arg(0.25, "warn when the share of responses filling response_length rises this much above the start")
    health_window: int = arg(6, "updates compared: the last half against the half before (gaming) or the run's start (EOS, length)")

    def validate(self) -> None:
        positive = ("rollout_batch_size", "response_length", "forward_batch_size", "total_updates", "ppo_epochs",
                    "minibatch_size", "micro_batch_size", "save_steps", "save_total_limit", "max_prompt_length")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"config: {name}: expected a positive integer, got {getattr(self, name)}")
        if self.rollout_batch_size % self.minibatch_size:
            raise ConfigError(
                f"config: minibatch_size ({self.minibatch_size}) must divide rollout_batch_size ({self.rollout_batch_size})"
            )
        if self.temperature <= 0:
            raise ConfigError(f"config: temperature: expected > 0, got {self.temperature}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ConfigError(f"config: kl_target: expected > 0 nats or none, got {self.kl_target}")
        if self.health_window < 2:
            raise ConfigError(f"config: health_window: expected at least 2 updates, got {self.health_window}")
        check_peft_supported(self, "ppo")


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place among the processes of a run (world 1 = no torch.distributed)."""

    rank: int = 0
    world: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: Tensor) -> Tensor:
        if self.world > 1:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor

    def max(self, tensor: Tensor) -> Tensor:
        if self.world > 1:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
        return tensor

    def gather_rows(self, tensor: Tensor) -> Tensor:
        """(rows, ...) on each process -> (world * rows, ...) in rank order; every process has the same rows."""
        if self.world == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        torch_dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def gather_objects(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch_dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()


def init_distributed() -> Dist:
    """Join the process group that `accelerate launch` (or torchrun) set up in the environment.

    Accelerate initialises NCCL on GPUs; a CPU-only `--multi_gpu` launch is left undistributed by it, so
    gloo is initialised here.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch_dist.is_initialized():
        from accelerate import PartialState

        PartialState()
        if not torch_dist.is_initialized():
            torch_dist.init_process_group("gloo")
    rank = torch_dist.get_rank() if torch_dist.is_initialized() else 0
    world = torch_dist.get_world_size() if torch_dist.is_initialized() else 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return Dist(rank=rank, world=world, device=device)


def say(message: str, dist: Dist | None = None) -> None:
    if dist is None or dist.is_main:
        print(f"[ppo] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# One base, several adapters
# --------------------------------------------------------------------------------------------------


def _adapter_of(param_name: str, adapters: Sequence[str]) -> str | None:
    """The adapter a PEFT parameter belongs to (its name holds `.lora_A.<adapter>.` and the like)."""
    padded = f".{param_name}."
    for adapter in adapters:
        if f".{adapter}." in padded:
            return adapter
    return None


@contextlib.contextmanager
def adapter_phase(model, name: str | None, *, trainable: bool = False, heads: dict[str, nn.Module] | None = None) -> Iterator[None]:
    """Run a phase with exactly one adapter active (`name`), or none (`name=None`: the reference model).

    Inside, a parameter has requires_grad only when the phase is `trainable` and the parameter belongs to
    adapter `name` or to its head (`heads[name]`); base weights, other adapters and other heads are frozen.
    PEFT's own `set_adapter` marks the activated adapter trainable; this is what keeps the reward adapter
    frozen while it scores. On exit the previous active adapter and every requires_grad flag come back.
    """
    heads = heads or {}
    adapters = list(model.peft_config)
    if name is not None and name not in adapters:
        raise ValueError(f"adapter_phase: no adapter named {name!r}; have {adapters}")
    all_params = list(model.named_parameters()) + [(f"head.{k}.{n}", p) for k, h in heads.items() for n, p in h.named_parameters()]
    saved = [(p, p.requires_grad) for _, p in all_params]
    previous = model.active_adapter

    def set_grads(owner_ok: Callable[[str], bool]) -> None:
        for param_name, p in all_params:
            p.requires_grad_(owner_ok(param_name))

    try:
        if name is None:
            set_grads(lambda _: False)
            with model.disable_adapter():
                yield
        else:
            model.set_adapter(name, inference_mode=not trainable)

            def owned(param_name: str) -> bool:
                if not trainable:
                    return False
                if param_name.startswith("head."):
                    return param_name.startswith(f"head.{name}.")
                return _adapter_of(param_name, adapters) == name

            set_grads(owned)
            yield
    finally:
        model.set_adapter(previous, inference_mode=True)
        for p, flag in saved:
            p.requires_grad_(flag)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere, in train mode too: a rollout's log-probs must be what the update recomputes.

    Zeroing the probabilities (as TRL does) rather than calling eval() lets the update run in train mode,
    which gradient checkpointing needs.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class _HeadModel(nn.Module):
    """decoder + a scalar head, shaped like a sequence-classification model for `score_texts`."""

    def __init__(self, decoder: nn.Module, head: nn.Module):
        super().__init__()
        self.decoder, self.head = decoder, head

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **_: Any) -> SimpleNamespace:
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return SimpleNamespace(logits=self.head(hidden.to(self.head.weight.dtype)))


@dataclass
class BaseInfo:
    """Where the policy's base came from: `name` goes into the saved adapter's config, `identity` decides
    whether a reward adapter was trained on the same base."""

    name: str
    identity: str
    description: str


@dataclass
class PPOModels:
    model: Any  # peft.PeftModel over the base, adapters "policy", "critic" and maybe "reward"
    tokenizer: Any
    value_head: nn.Linear
    reward_head: nn.Linear | None
    base: BaseInfo
    reward_adapter_dir: str | None = None

    @property
    def heads(self) -> dict[str, nn.Module]:
        heads: dict[str, nn.Module] = {CRITIC: self.value_head}
        if self.reward_head is not None:
            heads[REWARD] = self.reward_head
        return heads

    @property
    def decoder(self) -> nn.Module:
        return self.model.get_base_model().get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_base_model().get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return self.value_head.weight.device

    def phase(self, name: str | None, trainable: bool = False):
        return adapter_phase(self.model, name, trainable=trainable, heads=self.heads)

    def params_of(self, name: str) -> list[nn.Parameter]:
        adapters = list(self.model.peft_config)
        params = [p for n, p in self.model.named_parameters() if _adapter_of(n, adapters) == name]
        if name == CRITIC:
            params += list(self.value_head.parameters())
        return params

    def response_hidden(self, input_ids: Tensor, attention_mask: Tensor, query_width: int, response_width: int) -> Tensor:
        """Last-layer hidden states at the positions that predict the response tokens.

        Args:
            input_ids: (batch, query_width + response_width) left-padded query then right-padded response.
            attention_mask: same shape, 1 on real tokens.
        Returns:
            (batch, response_width, hidden); row t predicts response token t.
        """
        # Position ids count real tokens only, as generate() does for left-padded prompts.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state[:, query_width - 1 : query_width - 1 + response_width]

    def reward_scorer(self) -> _HeadModel:
        assert self.reward_head is not None
        return _HeadModel(self.decoder, self.reward_head)


def _find_dir(root: Path, filename: str) -> Path | None:
    for cand in (root, root / "adapter", root / "merged"):
        if (cand / filename).is_file():
            return cand
    return None


def _identity(name: str) -> str:
    """A comparable name for a base model: its resolved local directory."""
    if Path(name).is_dir():
        return str(Path(name).resolve())
    try:
        return str(Path(resolve_model_path(name, verbose=False)).resolve())
    except AlignError:
        return name


def _model_args(cfg: PPOArgs, name: str, quantization: str) -> ModelArgs:
    return ModelArgs(model_name_or_path=name, quantization=quantization, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)


def load_base(cfg: PPOArgs, dist: Dist | None = None):
    """The policy's base (the SFT model) as a plain causal LM, with its tokenizer and `BaseInfo`.

    sft_dir holding a merged model (config.json, or merged/config.json): that model. sft_dir holding only an
    adapter (adapter_config.json, or adapter/): its base with the adapter merged in memory. The merged model is
    also written once to output_dir/sft_merged: the saved PPO adapter names it as its base (so that
    align.models.load_trained can load the policy), and a quantized base, which cannot take a merge, is
    loaded from it. No sft_dir: model_name_or_path, and say so.
    """
    quantization = resolve_quantization(cfg.quantization)
    sft = Path(cfg.sft_dir) if cfg.sft_dir else None
    if sft is None or not sft.exists():
        reason = "sft_dir is none" if sft is None else f"sft_dir {sft} does not exist"
        say(f"{reason}: the base is the plain model {cfg.model_name_or_path} (no SFT)", dist)
        base, tokenizer = load_model(_model_args(cfg, cfg.model_name_or_path, quantization), lora=False)
        return base, tokenizer, BaseInfo(cfg.model_name_or_path, _identity(cfg.model_name_or_path), f"{cfg.model_name_or_path} (no SFT)")
    adapter_dir = _find_dir(sft, "adapter_config.json")
    merged_dir = _find_dir(sft, "config.json")
    if merged_dir is not None and (adapter_dir is None or merged_dir.name == "merged"):
        say(f"base: the merged SFT model in {merged_dir}", dist)
        base, tokenizer = load_model(_model_args(cfg, str(merged_dir), quantization), lora=False)
        return base, tokenizer, BaseInfo(str(merged_dir), _identity(str(merged_dir)), f"SFT model {merged_dir}")
    if adapter_dir is None:
        raise ConfigError(f"sft_dir {sft}: holds neither a model (config.json) nor an adapter (adapter_config.json)")
    from peft import PeftModel

    base_name = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    merged = Path(cfg.output_dir) / "sft_merged"
    say(f"base: {base_name} with the SFT adapter {adapter_dir} merged in memory (a copy goes to {merged})", dist)
    full, tokenizer = load_model(_model_args(cfg, base_name, "none"), lora=False)
    full = PeftModel.from_pretrained(full, str(adapter_dir)).merge_and_unload()
    if (adapter_dir / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(str(adapter_dir), cfg.trust_remote_code)
    if dist is None or dist.is_main:
        with atomic_dir(merged) as tmp:
            full.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    if dist is not None:
        dist.barrier()
    if quantization != "none":
        del full
        full, _ = load_model(_model_args(cfg, str(merged), quantization), lora=False)
    return full, tokenizer, BaseInfo(str(merged), _identity(str(adapter_dir)), f"{base_name} + SFT adapter {adapter_dir}")


def _reward_lora_weights(adapter_dir: Path) -> tuple[Any, dict[str, Tensor], Tensor | None, Tensor | None]:
    """A reward recipe's adapter split into (LoRA config for a causal-LM base, LoRA weights, score weight, bias)."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(adapter_dir))
    head_names = set(config.modules_to_save or [])
    config.modules_to_save = None
    config.task_type = None
    config.inference_mode = True
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise ConfigError(f"reward model {adapter_dir}: no adapter_model.safetensors (only safetensors adapters are loaded)")
    state = load_file(str(weights_file))
    lora, head_w, head_b = {}, None, None
    for key, value in state.items():
        parts = key.split(".")
        if any(part in head_names for part in parts) and "lora_" not in key:
            if key.endswith("weight"):
                head_w = value
            elif key.endswith("bias"):
                head_b = value
        else:
            lora[key] = value
    return config, lora, head_w, head_b


def _linear_head(hidden: int, weight: Tensor | None, bias: Tensor | None, device: torch.device) -> nn.Linear:
    head = nn.Linear(hidden, 1, bias=bias is not None)
    with torch.no_grad():
        if weight is None:
            head.weight.zero_()  # a fresh critic predicts 0 until it has seen returns
        else:
            head.weight.copy_(weight.reshape(1, hidden).float())
        if bias is not None:
            head.bias.copy_(bias.reshape(1).float())
    return head.to(device=device, dtype=torch.float32)


@dataclass
class RewardPlan:
    """Which reward the run uses, decided before any model is loaded (and printed)."""

    kind: Literal["shared", "separate", "function"]
    description: str
    path: str | None = None  # the adapter dir (shared) or model dir (separate)
    function: str | None = None  # "verifier" or "module:fn"


def plan_reward(cfg: PPOArgs, base: BaseInfo) -> RewardPlan:
    choice = cfg.reward
    guard = ", guarded: 0 for a degenerate reply" if cfg.reward_guard else ", unguarded (reward_guard false)"
    if choice == "verifier":
        return RewardPlan("function", f"the built-in verifier (align.verifier{guard})", function="verifier")
    if choice not in ("auto", "model"):
        if ":" not in choice:
            raise ConfigError(f"config: reward: expected auto, model, verifier, module.path:function or file.py:function, got {choice!r}")
        return RewardPlan("function", f"the Python function {choice}", function=choice)
    root = Path(cfg.reward_model)
    adapter_dir = _find_dir(root, "adapter_config.json") if root.is_dir() else None
    model_dir = _find_dir(root, "config.json") if root.is_dir() else None
    if adapter_dir is None and model_dir is None:
        if choice == "model":
            raise ConfigError(f"config: reward_model: {cfg.reward_model} holds no reward model (adapter_config.json or config.json)")
        return RewardPlan("function", f"the built-in verifier{guard} (no reward model at {cfg.reward_model}; --reward verifier to silence this)", function="verifier")
    if adapter_dir is None:
        return RewardPlan("separate", f"the reward model {model_dir} (a separate full model)", path=str(model_dir))
    rm_base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path") or "?"
    same = _identity(rm_base) == base.identity
    if cfg.reward_placement == "separate" or (cfg.reward_placement == "auto" and not same):
        why = "" if cfg.reward_placement == "separate" else (
            f": it was trained on {rm_base}, the policy's base is {base.description}, so it gets its own copy of its base"
        )
        return RewardPlan("separate", f"the reward model {adapter_dir} (separate model{why})", path=str(adapter_dir))
    note = "" if same else f" (forced by reward_placement=shared although it was trained on {rm_base})"
    return RewardPlan("shared", f"the reward adapter {adapter_dir} on the shared base{note}", path=str(adapter_dir))


def build_models(cfg: PPOArgs, plan_for: Callable[[BaseInfo], RewardPlan] | None = None, dist: Dist | None = None):
    """Load the base once and put the policy, critic and (shared) reward adapters on it.

    Returns (PPOModels, RewardPlan).
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    base, tokenizer, info = load_base(cfg, dist)
    plan = (plan_for or (lambda b: plan_reward(cfg, b)))(info)
    quantized = resolve_quantization(cfg.quantization) != "none"
    # A quantized base is loaded onto its device (bitsandbytes places it); everything else follows it there.
    device = next(base.parameters()).device if quantized else dist.device if dist is not None else torch.device("cpu")
    if not quantized:
        base.to(device)
    for p in base.parameters():
        p.requires_grad_(False)
    disable_dropout(base)
    if quantized:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    policy_config = lora_config(cfg, "causal_lm")
    policy_config.lora_dropout = 0.0  # dropout is off everywhere (see disable_dropout)
    # LoRA A matrices are drawn from torch's global generator: seed it here so that every process (and a
    # rerun) starts from the same adapters, whatever ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = get_peft_model(base, policy_config, adapter_name=POLICY)
        models, plan = _add_critic_and_reward(cfg, model, plan, device)
    models.tokenizer, models.base = tokenizer, info
    if not quantized:
        model.to(device)  # the adapters added after the base moved
    model.set_adapter(POLICY, inference_mode=True)
    for p in model.parameters():
        p.requires_grad_(False)  # nothing is trainable outside adapter_phase(..., trainable=True)
    for head in models.heads.values():
        head.requires_grad_(False)
    model.eval()
    return models, plan


def _add_critic_and_reward(cfg: PPOArgs, model, plan: RewardPlan, device: torch.device) -> tuple[PPOModels, RewardPlan]:
    from peft import set_peft_model_state_dict

    hidden = model.get_base_model().config.get_text_config().hidden_size

    head_w = head_b = None
    reward_head = None
    if plan.kind == "shared":
        assert plan.path is not None
        reward_config, reward_lora, head_w, head_b = _reward_lora_weights(Path(plan.path))
        if head_w is None:
            raise ConfigError(f"reward model {plan.path}: the adapter holds no score head (modules_to_save 'score')")
        model.add_adapter(REWARD, reward_config)
        result = set_peft_model_state_dict(model, reward_lora, adapter_name=REWARD)
        missing = [k for k in result.missing_keys if f".{REWARD}." in k and "lora_" in k]
        if missing or result.unexpected_keys:
            raise ConfigError(f"reward model {plan.path}: its adapter does not fit this base (missing {missing[:2]}, unexpected {list(result.unexpected_keys)[:2]})")
        reward_head = _linear_head(hidden, head_w, head_b, device)
        critic_config = copy.deepcopy(reward_config)
        critic_config.inference_mode = False
        model.add_adapter(CRITIC, critic_config)
        set_peft_model_state_dict(model, reward_lora, adapter_name=CRITIC)
    else:
        critic_config = lora_config(cfg, "causal_lm")
        critic_config.task_type = None
        critic_config.lora_dropout = 0.0
        model.add_adapter(CRITIC, critic_config)
    value_head = _linear_head(hidden, head_w, head_b, device)
    models = PPOModels(model=model, tokenizer=None, value_head=value_head, reward_head=reward_head, base=None,
                       reward_adapter_dir=plan.path if plan.kind == "shared" else None)
    return models, plan


def _import_function(spec: str) -> RewardFn:
    target, _, fn_name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            if module_spec is None or module_spec.loader is None or not Path(target).is_file():
                raise ConfigError(f"config: reward: file {target} not found")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as err:
        raise ConfigError(f"config: reward: cannot import {target} ({err})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"config: reward: {target} has no function {fn_name!r}")
    return fn


def reward_function(cfg: PPOArgs, plan: RewardPlan, models: PPOModels) -> RewardFn:
    """The reward as one call: (prompt_records, response_texts) -> list of floats."""
    from align.reward_model import load_reward_model, score_texts

    if plan.kind == "function":
        if plan.function == "verifier":
            from align.verifier import guarded_verifier_reward, verifier_reward

            return guarded_verifier_reward if cfg.reward_guard else verifier_reward
        return _import_function(str(plan.function))
    if plan.kind == "shared":
        scorer = models.reward_scorer()

        def shared(records: list[PromptRecord], responses: list[str]) -> list[float]:
            with models.phase(REWARD), eval_mode(models.model):
                return score_texts(scorer, models.tokenizer, [r.prompt for r in records], responses, batch_size=cfg.forward_batch_size)

        return shared
    rm, rm_tokenizer = load_reward_model(str(plan.path), dtype=cfg.dtype, quantization=resolve_quantization(cfg.quantization))
    if resolve_quantization(cfg.quantization) == "none":
        rm.to(models.device)

    def separate(records: list[PromptRecord], responses: list[str]) -> list[float]:
        # Text in, text scored: the reward model's own tokenizer and chat template, whatever the policy's are.
        return score_texts(rm, rm_tokenizer, [r.prompt for r in records], responses, batch_size=cfg.forward_batch_size)

    return separate


# --------------------------------------------------------------------------------------------------
# Phase 1: generate
# --------------------------------------------------------------------------------------------------

_EVAL_STREAM = 1 << 30


def row_seed(seed: int, update: int, index: int) -> int:
    """The sampling seed of row `index` of update `update`'s global batch."""
    return (((seed & 0xFFFFFFFF) * 1_000_003 + update) * 1_000_033 + index) % (2**62)


class GumbelSampler:
    """A logits processor that samples each row's token from softmax(logits / T) with its own generator.

    Gumbel-max: argmax(z / T + g), g ~ Gumbel(0, 1) i.i.d. over the vocabulary, is distributed as
    softmax(z / T). The returned scores are 0 at the chosen token and -inf elsewhere, so generate()'s own
    multinomial draw can only pick it; its warpers are no-ops (top_k=0, top_p=1.0).
    """

    def __init__(self, seeds: Sequence[int], temperature: float):
        self.temperature = temperature
        # CPU generators: the draws do not depend on the device the model runs on
        self.generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        vocab = scores.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-300))).to(scores.device)
        choice = (scores.double() / self.temperature + gumbel).argmax(-1)
        out = torch.full_like(scores, -math.inf)
        out.scatter_(-1, choice[:, None], 0.0)
        return out


def encode_prompts(tokenizer, records: Sequence[PromptRecord], device: torch.device) -> tuple[Tensor, Tensor]:
    """Chat-templated prompts (with the generation prompt), left-padded: (batch, query_width) ids and mask."""
    ids = []
    for record in records:
        tokens = tokenizer.apply_chat_template(record.prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        if hasattr(tokens, "keys"):
            tokens = tokens["input_ids"]
        ids.append(list(tokens))
    width = max(len(x) for x in ids)
    query = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, tokens in enumerate(ids):
        query[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        mask[row, width - len(tokens):] = 1
    return query.to(device), mask.to(device)


@torch.no_grad()
def generate(models: PPOModels, records: Sequence[PromptRecord], seeds: Sequence[int], *, temperature: float, max_new_tokens: int):
    """Sample one response per prompt with the policy adapter.

    Returns:
        query: (batch, query_width) left-padded prompt ids; query_mask: same, 1 on real tokens.
        responses: (batch, response_width) sampled ids, after the first EOS set to pad (response_width <=
            max_new_tokens: generation stops when every row has ended).
        response_mask: (batch, response_width) bool, True up to and including the first EOS.
        contains_eos: (batch,) bool.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    tokenizer = models.tokenizer
    query, query_mask = encode_prompts(tokenizer, records, models.device)
    # The model's own generation_config may carry top_k/top_p/repetition_penalty: every field is set here.
    config = GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, min_p=None, typical_p=1.0, repetition_penalty=1.0,
        no_repeat_ngram_size=0, max_new_tokens=max_new_tokens, min_new_tokens=0, num_beams=1,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True,
    )
    sampler = GumbelSampler(seeds, temperature)
    with models.phase(POLICY), eval_mode(models.model):
        sequences = models.model.generate(input_ids=query, attention_mask=query_mask, generation_config=config,
                                          logits_processor=LogitsProcessorList([sampler]))
    responses = sequences[:, query.shape[1]:]
    responses, response_mask, _, contains_eos = ppo_math.truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return query, query_mask, responses, response_mask, contains_eos


def decode_responses(tokenizer, responses: Tensor, response_mask: Tensor) -> list[str]:
    return [tokenizer.decode(row[mask].tolist(), skip_special_tokens=True) for row, mask in zip(responses, response_mask.bool())]


# --------------------------------------------------------------------------------------------------
# Phase 2: score (no grad, once per rollout)
# --------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One update's samples on this process. Shapes: (rows, query_width), (rows, response_width), (rows,)."""

    records: list[PromptRecord]
    global_rows: Tensor  # (rows,) index of each row in the global batch
    query: Tensor
    query_mask: Tensor
    responses: Tensor
    response_mask: Tensor
    contains_eos: Tensor
    texts: list[str]
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    old_values: Tensor | None = None
    entropy: Tensor | None = None
    raw_scores: Tensor | None = None  # reward before the missing-EOS penalty
    scores: Tensor | None = None
    verifier: Tensor | None = None
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.query, self.responses], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.query_mask, self.response_mask.long()], dim=1)

    def __len__(self) -> int:
        return len(self.records)


def policy_forward(models: PPOModels, rollout: Rollout, rows: Tensor, temperature: float, with_entropy: bool = False):
    """Token log-probs of the sampled responses under the active adapter (policy, or none = reference).

    Returns (rows, response_width) log-probs, and per-token entropies when asked.
    """
    ids, mask = rollout.input_ids[rows], rollout.attention_mask[rows]
    hidden = models.response_hidden(ids, mask, rollout.query.shape[1], rollout.responses.shape[1])
    logits = models.lm_head(hidden)
    logprobs = ppo_math.logprobs_from_logits(logits, rollout.responses[rows], temperature)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = ppo_math.entropy_from_logits(logits.detach(), temperature)
    return logprobs, entropy


def critic_forward(models: PPOModels, rollout: Rollout, rows: Tensor) -> Tensor:
    """(rows, response_width) value estimates V_t, read where the policy's logits for token t are."""
    ids, mask = rollout.input_ids[rows], rollout.attention_mask[rows]
    hidden = models.response_hidden(ids, mask, rollout.query.shape[1], rollout.responses.shape[1])
    return models.value_head(hidden.to(models.value_head.weight.dtype)).squeeze(-1)


def _batches(n: int, size: int, device: torch.device) -> Iterator[Tensor]:
    for start in range(0, n, size):
        yield torch.arange(start, min(n, start + size), device=device)


@torch.no_grad()
def score_rollout(models: PPOModels, rollout: Rollout, reward_fn: RewardFn, cfg: PPOArgs, verifier_fn: RewardFn | None) -> None:
    """Fill old/ref log-probs, values, entropy and scores of `rollout` (dropout off, no grad)."""
    n, size = len(rollout), cfg.forward_batch_size
    old, ref, values, entropy = [], [], [], []
    with eval_mode(models.model):
        with models.phase(POLICY):
            for rows in _batches(n, size, models.device):
                lp, ent = policy_forward(models, rollout, rows, cfg.temperature, with_entropy=True)
                old.append(lp)
                entropy.append(ent)
        with models.phase(None):
            for rows in _batches(n, size, models.device):
                ref.append(policy_forward(models, rollout, rows, cfg.temperature)[0])
        with models.phase(CRITIC):
            for rows in _batches(n, size, models.device):
                values.append(critic_forward(models, rollout, rows))
    rollout.old_logprobs, rollout.ref_logprobs = torch.cat(old), torch.cat(ref)
    rollout.old_values, rollout.entropy = torch.cat(values).float(), torch.cat(entropy)
    raw = torch.tensor(reward_fn(rollout.records, rollout.texts), dtype=torch.float32, device=models.device).reshape(-1)
    if raw.numel() != n:
        raise AlignError(f"reward: returned {raw.numel()} scores for {n} responses")
    rollout.raw_scores = raw
    rollout.scores = raw if cfg.missing_eos_penalty is None else ppo_math.apply_missing_eos_penalty(raw, rollout.contains_eos, cfg.missing_eos_penalty)
    if verifier_fn is not None:
        rollout.verifier = torch.tensor(verifier_fn(rollout.records, rollout.texts), dtype=torch.float32, device=models.device)


# --------------------------------------------------------------------------------------------------
# Phase 3: estimate advantages
# --------------------------------------------------------------------------------------------------


def _pad_to(tensor: Tensor, width: int, value: float | bool = 0) -> Tensor:
    if tensor.shape[1] == width:
        return tensor
    pad = torch.full((tensor.shape[0], width - tensor.shape[1]), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, pad], dim=1)


def global_whiten(values: Tensor, mask: Tensor, dist: Dist, width: int, shift_mean: bool = True) -> Tensor:
    """`ppo_math.masked_whiten` over the rows of every process; returns this process's rows.

    Args:
        values, mask: (rows, response_width) on this process; padded to `width` (the same on all) to gather.
    """
    if dist.world == 1:
        return ppo_math.masked_whiten(values, mask, shift_mean=shift_mean)
    all_values = dist.gather_rows(_pad_to(values, width))
    all_mask = dist.gather_rows(_pad_to(mask, width, False))
    rows = values.shape[0]
    whitened = ppo_math.masked_whiten(all_values, all_mask, shift_mean=shift_mean)
    return whitened[dist.rank * rows : (dist.rank + 1) * rows, : values.shape[1]]


@torch.no_grad()
def estimate_advantages(rollout: Rollout, cfg: PPOArgs, kl_coef: float, dist: Dist) -> None:
    """KL-penalised per-token rewards, GAE advantages and returns, advantages whitened globally."""
    mask = rollout.response_mask
    rewards = ppo_math.compute_rewards(rollout.scores, rollout.old_logprobs, rollout.ref_logprobs, mask, kl_coef, cfg.kl_estimator)
    if cfg.whiten_rewards:
        rewards = global_whiten(rewards, mask, dist, cfg.response_length, shift_mean=False)
    advantages, returns = ppo_math.gae(rewards, rollout.old_values, mask, cfg.gamma, cfg.lam)
    rollout.rewards, rollout.returns = rewards, returns
    rollout.advantages = global_whiten(advantages, mask, dist, cfg.response_length)


# --------------------------------------------------------------------------------------------------
# Health checks
# --------------------------------------------------------------------------------------------------


def _mean(rows: Sequence[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
    return sum(values) / len(values) if values else None


def _trend(history: list[dict[str, float]], key: str, window: int) -> float | None:
    """Mean of `key` over the second half of the last `window` updates minus its mean over the first half."""
    if len(history) < window:
        return None
    half = window // 2
    early, late = _mean(history[-window:-half], key), _mean(history[-half:], key)
    return None if early is None or late is None else late - early


def health_checks(history: list[dict[str, float]], cfg: PPOArgs, reward_is_verifier: bool) -> list[str]:
    """Warnings (one line each) about the latest update, `history[-1]`, given the run so far.

    EOS and length are compared with the start of the run (the first health_window / 2 updates), so a base
    model that rarely finishes within response_length is not flagged for what it always did.
    """
    metrics, warnings = history[-1], []
    kl = metrics["objective/kl"]
    # k1 is an unbiased estimate of a KL >= 0, but one response's sum can be well below 0: a mean under the
    # threshold is flagged only when it is also more than two standard errors below 0
    if kl < cfg.health_min_kl and kl + 2 * metrics.get("objective/kl_stderr", 0.0) < 0:
        warnings.append(f"negative mean KL {kl:.4f} (standard error {metrics.get('objective/kl_stderr', 0.0):.4f}): the rollout "
                        "log-probs are not those of the sampling distribution (a top-k/top-p/temperature mismatch or dropout?)")
    if kl > cfg.health_kl_budget:
        warnings.append(f"mean KL {kl:.3f} nats beyond the budget {cfg.health_kl_budget}: the policy is drifting far from the reference")
    if metrics["ppo/ratio_max"] > cfg.health_max_ratio:
        warnings.append(f"ratio explosion: max PPO ratio {metrics['ppo/ratio_max']:.2f} > {cfg.health_max_ratio}")
    window, half = cfg.health_window, cfg.health_window // 2
    if len(history) >= 2 * half:
        start, recent = history[:half], history[-half:]
        eos_then, eos_now = _mean(start, "rollout/eos_rate"), _mean(recent, "rollout/eos_rate")
        if eos_then - eos_now > cfg.health_eos_drop:
            warnings.append(f"losing EOS: {eos_now:.2f} of responses end with EOS over the last {half} updates, {eos_then:.2f} at the start")
        sat_then, sat_now = _mean(start, "rollout/length_saturation"), _mean(recent, "rollout/length_saturation")
        if sat_now - sat_then > cfg.health_saturation_rise:
            warnings.append(f"responses saturate the length limit: {sat_now:.2f} fill response_length ({cfg.response_length}) "
                            f"over the last {half} updates, {sat_then:.2f} at the start")
    score_trend = _trend(history, "objective/scores", window)
    if score_trend is not None and score_trend > 0:
        verifier_trend = _trend(history, "objective/verifier", window)
        if not reward_is_verifier and verifier_trend is not None and verifier_trend < -0.02:
            warnings.append(f"reward gaming? the score rose by {score_trend:.3f} over the last {window} updates while the verifier fell by {-verifier_trend:.3f}")
        length_trend = _trend(history, "rollout/response_length", window)
        length_then = _mean(history[-window:-half], "rollout/response_length")
        if length_trend is not None and length_trend > 0.5 * length_then and (verifier_trend is None or verifier_trend <= 0):
            warnings.append(f"length gaming? the score rose while responses grew by {length_trend:.1f} tokens over the last {window} updates")
    return warnings


# --------------------------------------------------------------------------------------------------
# Checkpoints and saved adapters
# --------------------------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "update-"


def save_adapter(models: PPOModels, name: str, directory: Path) -> None:
    """Adapter `name` as a standard PEFT adapter directory (loads with PeftModel.from_pretrained)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(models.model, adapter_name=name)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / "adapter_model.safetensors"))
    config = copy.deepcopy(models.model.peft_config[name])
    config.base_model_name_or_path = models.base.name
    config.inference_mode = True
    config.save_pretrained(str(directory))
    if name == CRITIC:
        head = {k: v.detach().contiguous().cpu() for k, v in models.value_head.state_dict().items()}
        save_file(head, str(directory / "value_head.safetensors"))


def load_adapter_weights(models: PPOModels, name: str, directory: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(directory / "adapter_model.safetensors"), device=str(models.device))
    set_peft_model_state_dict(models.model, state, adapter_name=name)
    if name == CRITIC:
        models.value_head.load_state_dict(load_file(str(directory / "value_head.safetensors"), device=str(models.device)))


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


# token-weighted sums that minibatch_gradient returns ("tokens": the weight)
_LOSS_STATS = ("policy_loss", "value_loss", "clipfrac", "approx_kl", "ratio_mean", "value_clipfrac", "tokens")


def _lr_lambda(kind: str, total_steps: int) -> Callable[[int], float]:
    if kind == "linear":
        return lambda step: max(0.0, 1.0 - step / max(1, total_steps))
    return lambda step: 1.0


def _heldout_line(block: dict[str, Any]) -> str:
    """"coherent strict 0.156, verifier strict 0.188, degenerate 0.250, 32 prompts" from PPOTrainer.evaluate's block."""
    parts = [f"{label} {block[key]:.3f}" for label, key in (("coherent strict", "verifier/coherent_strict"), ("verifier strict", "verifier/strict"),
                                                              ("degenerate", "gen/degenerate_share"), ("reward", "reward")) if key in block]
    return ", ".join(parts + [f"{len(block['rows'])} prompts"])


class PPOTrainer:
    """The PPO loop over `prompts` for `models` with reward `reward_fn` (see the module docstring).

    `verifier_fn` (the built-in verifier, when the prompts carry constraints) is logged next to the reward
    as `objective/verifier` and scores the held-out `eval_prompts` before and after training.
    """

    def __init__(self, cfg: PPOArgs, models: PPOModels, prompts: list[PromptRecord], reward_fn: RewardFn, *,
                 dist: Dist | None = None, verifier_fn: RewardFn | None = None, reward_is_verifier: bool = False,
                 eval_prompts: list[PromptRecord] | None = None, reward_description: str = "?"):
        self.cfg, self.models, self.prompts, self.reward_fn = cfg, models, prompts, reward_fn
        self.dist = dist or Dist(device=models.device)
        self.reward_is_verifier = reward_is_verifier
        self.eval_prompts = eval_prompts or []
        # the verifier can only score prompts that carry constraints
        self.verifier_fn = verifier_fn if verifier_fn is not None and all(p.constraints for p in prompts) else None
        self.eval_verifier_fn = verifier_fn if verifier_fn is not None and all(p.constraints for p in self.eval_prompts) else None
        self.reward_description = reward_description
        if cfg.rollout_batch_size % self.dist.world:
            raise ConfigError(f"config: rollout_batch_size ({cfg.rollout_batch_size}) must be a multiple of the number of processes ({self.dist.world})")
        if not prompts:
            raise ConfigError("config: prompts: no training prompts to roll out")
        self.out = Path(cfg.output_dir)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.policy_params = models.params_of(POLICY)
        self.critic_params = models.params_of(CRITIC)
        # One optimizer, two learning rates. No value-loss coefficient: the losses reach disjoint parameters,
        # Adam is invariant to their scale, and clipping is per model.
        self.optimizer = torch.optim.AdamW(
            [{"params": self.policy_params, "lr": cfg.learning_rate}, {"params": self.critic_params, "lr": cfg.critic_learning_rate}],
            weight_decay=0.0,
        )
        steps_per_update = cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.minibatch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg.lr_scheduler, cfg.total_updates * steps_per_update))
        self.kl_ctl = (ppo_math.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target is not None
                       else ppo_math.FixedKLController(cfg.kl_coef))
        self.update_index = 0  # updates completed
        self.tokens = 0  # prompt + response tokens rolled out, all processes
        self.elapsed_before = 0.0  # wall time of earlier sessions (resume)
        self.history: list[dict[str, float]] = []
        self.health_log: list[dict[str, Any]] = []
        self.eval_before: dict[str, float] | None = None
        self.eval_after: dict[str, float] | None = None
        self.last_good_checkpoint: Path | None = None
        self.stop_signal: int | None = None
        self._session_start: float | None = None
        self._writer = None

    def elapsed(self) -> float:
        return self.elapsed_before + (time.time() - self._session_start if self._session_start is not None else 0.0)

    # ---- data: a fresh shuffle of all prompts per pass; update u takes the global rows [u*B, (u+1)*B)
    def batch_records(self, update: int) -> tuple[list[PromptRecord], Tensor]:
        cfg, n = self.cfg, len(self.prompts)
        per_rank = cfg.rollout_batch_size // self.dist.world
        global_rows = torch.arange(self.dist.rank * per_rank, (self.dist.rank + 1) * per_rank)
        records, orders = [], {}
        for row in global_rows.tolist():
            data_epoch, offset = divmod(update * cfg.rollout_batch_size + row, n)
            if data_epoch not in orders:
                orders[data_epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 7919 + data_epoch))
            records.append(self.prompts[int(orders[data_epoch][offset])])
        return records, global_rows

    # ---- the loop
    def train(self, stop_after: int | None = None) -> dict[str, Any]:
        """Run updates until total_updates (or until `stop_after` more, as an interrupted run); returns the summary."""
        cfg, dist = self.cfg, self.dist
        self._session_start = time.time()
        handlers = self._install_signal_handlers()
        try:
            if self.eval_before is None and self.eval_prompts:
                self.eval_before = self.evaluate()
                say(f"held-out prompts before training (greedy): {_heldout_line(self.eval_before)}", dist)
            done_here = 0
            while self.update_index < cfg.total_updates and (stop_after is None or done_here < stop_after):
                update = self.update_index
                t0 = time.time()
                records, global_rows = self.batch_records(update)
                seeds = [row_seed(cfg.seed, update, int(i)) for i in global_rows]

                # 1. generate
                query, query_mask, responses, response_mask, contains_eos = generate(
                    self.models, records, seeds, temperature=cfg.temperature, max_new_tokens=cfg.response_length)
                rollout = Rollout(records, global_rows, query, query_mask, responses, response_mask, contains_eos,
                                  decode_responses(self.models.tokenizer, responses, response_mask))
                t1 = time.time()

                # 2. score
                score_rollout(self.models, rollout, self.reward_fn, cfg, None if self.reward_is_verifier else self.verifier_fn)
                if self.reward_is_verifier:
                    rollout.verifier = rollout.raw_scores
                self._fail_if(update, self._first_non_finite({
                    "the reward (scores)": rollout.raw_scores, "the old log-probs": rollout.old_logprobs,
                    "the reference log-probs": rollout.ref_logprobs, "the values": rollout.old_values}, update))
                t2 = time.time()

                # 3. estimate advantages
                kl_coef = self.kl_ctl.value
                estimate_advantages(rollout, cfg, kl_coef, dist)

                # 4. update
                train_stats = self.ppo_update(rollout, update)
                t3 = time.time()

                # 5. log, checkpoint, health
                self.update_index += 1
                done_here += 1
                metrics = self.rollout_metrics(rollout, kl_coef)
                metrics.update(train_stats)
                metrics.update({"time/generate_s": t1 - t0, "time/score_s": t2 - t1, "time/update_s": t3 - t2,
                                "perf/tokens_per_s": metrics.pop("perf/new_tokens") / max(t3 - t0, 1e-9)})
                self.kl_ctl.update(metrics["objective/kl"], cfg.rollout_batch_size)
                self.log(metrics, rollout)
                if self.update_index % cfg.save_steps == 0 or self.update_index == cfg.total_updates:
                    self.save_checkpoint()
                self._after_update_checks(metrics)
            if self.eval_prompts and self.update_index >= cfg.total_updates:
                self.eval_after = self.evaluate()
                say(f"held-out prompts after training (greedy): {_heldout_line(self.eval_after)}", dist)
                warning = self.hacking_warning()
                if warning:
                    say(f"health warning at update {self.update_index}: {warning}", dist)
                    self.health_log.append({"update": self.update_index, "warning": warning})
        finally:
            self._restore_signal_handlers(handlers)
            self.elapsed_before = self.elapsed()
            self._session_start = None
            if self._writer is not None:
                self._writer.flush()
        return self.summary()

    def hacking_warning(self) -> str | None:
        """align.degeneration.hacking_warning on this run: the mean reward of the first and of the last
        health_window / 2 updates, and the held-out evaluations before and after training."""
        from align.degeneration import hacking_warning

        k = max(1, self.cfg.health_window // 2)
        if len(self.history) < 2 * k:
            return None

        def heldout(block: dict[str, Any] | None) -> dict[str, Any] | None:
            return block and {"coherent_strict": block.get("verifier/coherent_strict"), "degenerate_share": block.get("gen/degenerate_share")}

        prompts = len(self.eval_before["rows"]) if self.eval_before else "?"
        return hacking_warning(_mean(self.history[:k], "objective/scores"), _mean(self.history[-k:], "objective/scores"),
                               heldout(self.eval_before), heldout(self.eval_after), where=f"{prompts} held-out prompts (greedy)")

    def _saved_now(self) -> bool:
        return self.last_good_checkpoint is not None and self.last_good_checkpoint.name == f"{CHECKPOINT_PREFIX}{self.update_index:06d}"

    def _after_update_checks(self, metrics: dict[str, float]) -> None:
        # metrics are reduced over processes, so every process reaches the same verdicts
        warnings = health_checks(self.history, self.cfg, self.reward_is_verifier)
        if self.update_index == 1 and metrics["rollout/length_saturation"] > 0.5:
            say(f"note: {metrics['rollout/length_saturation']:.2f} of the first responses fill response_length "
                f"({self.cfg.response_length}): scores see cut-off replies (raise response_length or set missing_eos_penalty)", self.dist)
        for w in warnings:
            say(f"health warning at update {self.update_index}: {w}", self.dist)
            self.health_log.append({"update": self.update_index, "warning": w})
        if warnings and self.cfg.stop_on_health:
            if not self._saved_now():
                self.save_checkpoint()
            self.write_summary(stopped=f"health: {warnings[0]}")
            raise HealthStop(f"update {self.update_index}: stopped by --stop_on_health: {warnings[0]} "
                             f"(checkpoint {self.last_good_checkpoint}; --resume continues)")
        signum = int(self.dist.max(torch.tensor([float(self.stop_signal or 0)])).item())
        if signum:
            if not self._saved_now():
                self.save_checkpoint()
            name = signal.Signals(signum).name
            say(f"{name}: checkpoint {self.last_good_checkpoint} saved; exiting (rerun with --resume to continue)", self.dist)
            self.write_summary(stopped=name)
            raise SystemExit(128 + signum)

    # ---- phase 4: the update
    def ppo_update(self, rollout: Rollout, update: int) -> dict[str, float]:
        """`ppo_epochs` passes over the rollout in shuffled global minibatches; one optimizer step each."""
        cfg, dist, models = self.cfg, self.dist, self.models
        B, M = cfg.rollout_batch_size, cfg.minibatch_size
        token_counts = dist.gather_rows(rollout.response_mask.sum(-1).float())  # (B,) tokens of every global row
        keys = _LOSS_STATS
        sums = dict.fromkeys(keys, 0.0)
        ratio_max = 0.0
        first_ratio_dev: float | None = None
        grad_norms: dict[str, list[float]] = {"policy": [], "critic": []}
        models.model.train()  # dropout is zeroed (disable_dropout); train mode lets gradient checkpointing work
        try:
            for epoch in range(cfg.ppo_epochs):
                order = torch.randperm(B, generator=torch.Generator().manual_seed(row_seed(cfg.seed, update, 10**6 + epoch)))
                for start in range(0, B, M):
                    stats = self.minibatch_gradient(rollout, order[start:start + M], token_counts, update)
                    for key in keys:
                        sums[key] += stats[key]
                    ratio_max = max(ratio_max, stats["ratio_max"])
                    if epoch == 0 and start == 0:  # the first minibatch sees the rollout's own parameters
                        first_ratio_dev = stats["ratio_dev_max"]
                    grad_norms["policy"].append(float(torch.nn.utils.clip_grad_norm_(self.policy_params, cfg.max_grad_norm)))
                    grad_norms["critic"].append(float(torch.nn.utils.clip_grad_norm_(self.critic_params, cfg.max_grad_norm)))
                    self.optimizer.step()
                    self.scheduler.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            models.model.eval()
        totals = dist.sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        means = dict(zip(keys, (totals / totals[-1]).tolist()))
        maxima = dist.max(torch.tensor([ratio_max, first_ratio_dev or 0.0], dtype=torch.float64)).tolist()
        return {
            "ppo/policy_loss": means["policy_loss"], "ppo/value_loss": means["value_loss"],
            "ppo/clipfrac": means["clipfrac"], "ppo/value_clipfrac": means["value_clipfrac"],
            "ppo/approx_kl": means["approx_kl"], "ppo/ratio_mean": means["ratio_mean"], "ppo/ratio_max": maxima[0],
            "ppo/first_minibatch_ratio_dev": maxima[1],
            "ppo/grad_norm_policy": sum(grad_norms["policy"]) / len(grad_norms["policy"]),
            "ppo/grad_norm_critic": sum(grad_norms["critic"]) / len(grad_norms["critic"]),
            "lr/policy": self.optimizer.param_groups[0]["lr"], "lr/critic": self.optimizer.param_groups[1]["lr"],
        }

    def minibatch_gradient(self, rollout: Rollout, global_rows: Tensor, token_counts: Tensor, update: int) -> dict[str, float]:
        """The gradient of one minibatch's policy and value losses, left in .grad for the optimizer step.

        Args:
            global_rows: (minibatch_size,) rows of the global batch; this process works on those it holds, in
                micro-batches of micro_batch_size.
            token_counts: (rollout_batch_size,) response tokens of every global row.
        Each loss is the minibatch's token mean: a micro-batch's token-mean loss is weighted by its share of the
        minibatch's tokens (over all processes) and the gradients are summed over micro-batches and processes.
        Weighting every micro-batch alike (1 / number of micro-batches, as gradient accumulation in TRL's PPO
        trainer does) would weight a token of a short micro-batch more than a token of a long one.
        Returns token-weighted sums of the loss statistics ("tokens": their weight) and maxima of the ratio and
        of |ratio - 1|, all over this process's rows. Raises NonFiniteError (on every process) before any
        optimizer step when a loss or a gradient is not finite.
        """
        cfg, models = self.cfg, self.models
        rows_here = len(rollout)
        first_row = self.dist.rank * rows_here
        minibatch_tokens = token_counts[global_rows].sum()
        local = torch.tensor([int(r) - first_row for r in global_rows if first_row <= int(r) < first_row + rows_here], dtype=torch.long)
        stats = dict.fromkeys(_LOSS_STATS, 0.0) | {"ratio_max": 0.0, "ratio_dev_max": 0.0}
        self.optimizer.zero_grad(set_to_none=False)
        bad: str | None = None
        for micro_start in range(0, len(local), cfg.micro_batch_size):
            rows = local[micro_start:micro_start + cfg.micro_batch_size].to(models.device)
            mask = rollout.response_mask[rows]
            weight = mask.sum() / minibatch_tokens
            # Each loss is backpropagated inside its own phase, so gradient checkpointing recomputes with the
            # same adapter active.
            with models.phase(POLICY, trainable=True):
                logprobs, _ = policy_forward(models, rollout, rows, cfg.temperature)
                pg_loss, pg_stats = ppo_math.policy_loss(logprobs, rollout.old_logprobs[rows], rollout.advantages[rows], mask, cfg.cliprange)
                bad = bad or self._first_non_finite({"the policy loss": pg_loss}, update)
                if bad is None:
                    (pg_loss * weight).backward()
            with models.phase(CRITIC, trainable=True):
                values = critic_forward(models, rollout, rows)
                vf_loss, vf_clipfrac = ppo_math.value_loss(values, rollout.old_values[rows], rollout.returns[rows], mask, cfg.cliprange_value)
                bad = bad or self._first_non_finite({"the value loss": vf_loss}, update)
                if bad is None:
                    (vf_loss * weight).backward()
            if bad is not None:
                break
            n_tok = float(mask.sum())
            for key, value in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("clipfrac", pg_stats["clipfrac"]),
                               ("approx_kl", pg_stats["approx_kl"]), ("ratio_mean", pg_stats["ratio_mean"]),
                               ("value_clipfrac", vf_clipfrac)):
                stats[key] += float(value.detach()) * n_tok
            stats["tokens"] += n_tok
            stats["ratio_max"] = max(stats["ratio_max"], float(pg_stats["ratio_max"]))
            ratio = torch.exp(logprobs.detach() - rollout.old_logprobs[rows])
            stats["ratio_dev_max"] = max(stats["ratio_dev_max"], float((ratio - 1).abs()[mask].max()))
        self._fail_if(update, bad)
        self._all_reduce_grads()
        self._check_grads(update)
        return stats

    def _all_reduce_grads(self) -> None:
        """Sum gradients over processes (each holds its share of the global token mean)."""
        params = self.policy_params + self.critic_params
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.dist.world == 1:
            return
        flat = self.dist.sum(torch.cat([p.grad.reshape(-1) for p in params]))
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    # ---- non-finite values stop the run, on every process at once
    def _where_good(self) -> str:
        if self.last_good_checkpoint is not None:
            return f"the last good checkpoint is {self.last_good_checkpoint}"
        return "no checkpoint had been saved yet"

    def _first_non_finite(self, tensors: dict[str, Tensor | None], update: int) -> str | None:
        for name, tensor in tensors.items():
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                value = tensor[~torch.isfinite(tensor)].flatten()[0].item()
                return f"update {update + 1}: {name} is not finite ({value})"
        return None

    def _fail_if(self, update: int, message: str | None) -> None:
        """Raise NonFiniteError on every process when any process found a non-finite value."""
        if int(self.dist.max(torch.tensor([1.0 if message else 0.0])).item()) == 0:
            return
        message = message or f"update {update + 1}: a non-finite value on another process"
        raise NonFiniteError(f"{message}; stopped before the optimizer step; {self._where_good()}")

    def _check_grads(self, update: int) -> None:
        # after the all-reduce every process holds the same gradients, so all of them raise together
        adapters = list(self.models.model.peft_config)
        named = list(self.models.model.named_parameters()) + [(f"value_head.{n}", p) for n, p in self.models.value_head.named_parameters()]
        for name, p in named:
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                owner = _adapter_of(name, adapters) or "critic"
                raise NonFiniteError(f"update {update + 1}: the gradient of {name} ({owner}) is not finite; stopped before the "
                                     f"optimizer step; {self._where_good()}")

    # ---- phase 5: metrics, logs
    def rollout_metrics(self, rollout: Rollout, kl_coef: float) -> dict[str, float]:
        """Per-response statistics averaged over every process's responses (sums reduced, then divided)."""
        mask = rollout.response_mask
        lengths = mask.sum(-1).float()
        kl = ppo_math.token_kl(rollout.old_logprobs, rollout.ref_logprobs, mask, "k1").sum(-1)
        penalty = -kl_coef * ppo_math.token_kl(rollout.old_logprobs, rollout.ref_logprobs, mask, self.cfg.kl_estimator).sum(-1)
        per_row = {
            "objective/kl": kl,  # sum over the response of log p - log p_ref (k1), per response
            "objective/non_score_reward": penalty,
            "objective/scores": rollout.raw_scores,
            "objective/rlhf_reward": rollout.scores + penalty,
            "rollout/response_length": lengths,
            "rollout/eos_rate": rollout.contains_eos.float(),
            "rollout/length_saturation": (lengths >= self.cfg.response_length).float(),
            "values/mean": ppo_math.masked_mean(rollout.old_values, mask, dim=-1),
        }
        if rollout.verifier is not None:
            per_row["objective/verifier"] = rollout.verifier
        per_row["objective/kl_sq"] = kl.square()  # for the standard error of the mean KL (popped below)
        keys = list(per_row)
        local = [float(per_row[k].double().sum()) for k in keys]
        local += [float(len(rollout)), float(rollout.entropy[mask].double().sum()), float(mask.sum()), float(rollout.query_mask.sum())]
        totals = self.dist.sum(torch.tensor(local, dtype=torch.float64)).tolist()
        rows, entropy_sum, response_tokens, prompt_tokens = totals[len(keys):]
        metrics = {k: totals[i] / rows for i, k in enumerate(keys)}
        kl_variance = max(metrics.pop("objective/kl_sq") - metrics["objective/kl"] ** 2, 0.0) * rows / max(rows - 1, 1)
        metrics["objective/kl_stderr"] = (kl_variance / rows) ** 0.5  # over responses: k1 sums are noisy, can be < 0
        metrics["objective/entropy"] = entropy_sum / response_tokens
        metrics["objective/beta"] = kl_coef
        self.tokens += int(response_tokens + prompt_tokens)
        metrics["perf/tokens"] = self.tokens
        metrics["perf/new_tokens"] = response_tokens + prompt_tokens
        return metrics

    @property
    def writer(self):
        if self._writer is None and self.cfg.report_to == "tensorboard" and self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.update_index)
        return self._writer

    def log(self, metrics: dict[str, float], rollout: Rollout) -> None:
        self.history.append(metrics)
        if not self.dist.is_main:
            return
        append_jsonl(self.out / "metrics.jsonl", {"step": self.update_index, "time_s": round(self.elapsed(), 3), **metrics})
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, self.update_index)
            prompt = rollout.records[0].prompt[-1]["content"]
            self.writer.add_text("rollout/sample", f"**prompt:** {prompt}\n\n**response:** {rollout.texts[0]}", self.update_index)
        seconds = metrics["time/generate_s"] + metrics["time/score_s"] + metrics["time/update_s"]
        verifier = f" | verifier {metrics['objective/verifier']:.3f}" if "objective/verifier" in metrics and not self.reward_is_verifier else ""
        say(f"update {self.update_index}/{self.cfg.total_updates} | score {metrics['objective/scores']:.3f}{verifier}"
            f" | kl {metrics['objective/kl']:.3f} | len {metrics['rollout/response_length']:.1f} | eos {metrics['rollout/eos_rate']:.2f}"
            f" | clipfrac {metrics['ppo/clipfrac']:.3f} | {seconds:.1f} s")

    # ---- held-out prompts: the verifier (and the reward) before and after training
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Greedy replies of the policy to the held-out prompts, scored as every recipe's summary scores them
        (align.policy_report: coherent strict first, the verifier, degenerate and unasked-format shares, per-prompt
        rows for the paired interval), plus the run's reward of those replies where the reward is not the
        verifier. Prompts are split over the processes and the rows gathered back in prompt order."""
        cfg, dist = self.cfg, self.dist
        from align.evaluation import EvalArgs, Policy, generate as generate_replies
        from align.policy_report import generation_block, reply_rows

        indices = list(range(dist.rank, len(self.eval_prompts), dist.world))
        mine = [self.eval_prompts[i] for i in indices]
        model, tokenizer = self.models.model, self.models.tokenizer
        eval_cfg = EvalArgs(max_new_tokens=cfg.summary_max_new_tokens, batch_size=cfg.forward_batch_size, modes=["greedy"])
        was_training = model.training
        model.eval()
        try:
            with adapter_phase(model, POLICY):
                gens = generate_replies(Policy(model=model, tokenizer=tokenizer, kind="model", path=POLICY),
                                        [p.prompt for p in mine], "greedy", eval_cfg) if mine else []
        finally:
            model.train(was_training)
        rows = reply_rows(mine, [(g.reply, g.eos, g.length_tokens) for g in gens])
        reward = 0.0
        if not self.reward_is_verifier:
            for start in range(0, len(mine), cfg.forward_batch_size):
                chunk = slice(start, start + cfg.forward_batch_size)
                reward += float(sum(self.reward_fn(mine[chunk], [g.reply for g in gens[chunk]])))
        gathered = dist.gather_objects((indices, rows, reward))
        by_index = {i: row for part_indices, part_rows, _ in gathered for i, row in zip(part_indices, part_rows)}
        block = generation_block([by_index[i] for i in range(len(self.eval_prompts))])
        if not self.reward_is_verifier:
            block["reward"] = sum(part[2] for part in gathered) / len(self.eval_prompts)
        return block

    # ---- checkpoints
    def save_checkpoint(self) -> Path:
        """checkpoints/update-NNNNNN/: policy/, critic/ (+ value head), state.pt, rng-rank*.pt; written to a
        temporary directory and renamed, so a kill leaves the previous checkpoint intact."""
        dist = self.dist
        rng_states = dist.gather_objects(_rng_state())
        path = self.out / "checkpoints" / f"{CHECKPOINT_PREFIX}{self.update_index:06d}"
        if dist.is_main:
            state = {
                "update": self.update_index,
                "data_position": self.update_index * self.cfg.rollout_batch_size,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "kl_controller": self.kl_ctl.state_dict(),
                "tokens": self.tokens,
                "elapsed_s": self.elapsed(),
                "history": [{k: float(v) for k, v in h.items()} for h in self.history],
                "health_log": json.dumps(self.health_log),
                "eval_before": json.dumps(self.eval_before),
                "world": dist.world,
            }
            try:
                with atomic_dir(path) as tmp:
                    save_adapter(self.models, POLICY, tmp / "policy")
                    save_adapter(self.models, CRITIC, tmp / "critic")
                    torch.save(state, tmp / "state.pt")
                    for rank, rng in enumerate(rng_states):
                        torch.save(rng, tmp / f"rng-rank{rank}.pt")
            except (OSError, RuntimeError) as err:  # a full disk, an I/O error (torch.save says RuntimeError)
                # atomic_dir removed the partial copy; the previous checkpoint was never touched
                from align.runs import checkpoint_write_error

                raise checkpoint_write_error(path, err, self.last_good_checkpoint) from err
            for old in list_checkpoints(self.out)[: -self.cfg.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        self.last_good_checkpoint = path
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Everything a checkpoint holds, through safetensors and torch.load(weights_only=True) only."""
        load_adapter_weights(self.models, POLICY, path / "policy")
        load_adapter_weights(self.models, CRITIC, path / "critic")
        state = torch.load(path / "state.pt", map_location=self.models.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.update_index = int(state["update"])
        self.tokens = int(state["tokens"])
        self.elapsed_before = float(state["elapsed_s"])
        self.history = [dict(h) for h in state["history"]]
        self.health_log = json.loads(state["health_log"])
        self.eval_before = json.loads(state["eval_before"])
        rng_file = path / f"rng-rank{self.dist.rank}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        self.last_good_checkpoint = path
        if self.dist.is_main:
            self._truncate_metrics(self.update_index)
        self.dist.barrier()

    def _truncate_metrics(self, update: int) -> None:
        """Drop metric lines the interrupted run wrote after its checkpoint: the file reads as one run."""
        from align.io import atomic_write_text

        path = self.out / "metrics.jsonl"
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= update]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    # ---- SIGTERM / Ctrl-C: finish the update, checkpoint, exit
    def _install_signal_handlers(self) -> dict | None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = signum
            print(f"\n[ppo] {signal.Signals(signum).name}: saving a checkpoint after this update, then exiting "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def _restore_signal_handlers(handlers: dict | None) -> None:
        for sig, previous in (handlers or {}).items():
            signal.signal(sig, previous)

    # ---- outputs
    def save_final(self) -> None:
        """adapter/ (the policy: loads with align.models.load_trained) and critic/ (adapter + value head)."""
        if self.dist.is_main:
            for name, sub in ((POLICY, "adapter"), (CRITIC, "critic")):
                with atomic_dir(self.out / sub) as tmp:
                    save_adapter(self.models, name, tmp)
                    self.models.tokenizer.save_pretrained(str(tmp))
        self.dist.barrier()

    def summary(self, stopped: str | None = None) -> dict[str, Any]:
        kls = [h["objective/kl"] for h in self.history]
        last = self.history[-1] if self.history else {}
        peak = self.dist.max(torch.tensor([peak_memory_mb()], dtype=torch.float64)).item()
        summary = {
            "method": "ppo",
            "updates": self.update_index,
            "total_updates": self.cfg.total_updates,
            "wall_time_s": round(self.elapsed(), 1),
            "peak_memory_mb": round(peak, 1),
            "peak_memory_kind": "CUDA max allocated" if torch.cuda.is_available() else "peak RSS of the largest process",
            "processes": self.dist.world,
            "base": self.models.base.description,
            "reward": self.reward_description,
            "mean_kl": sum(kls) / len(kls) if kls else None,
            "final_kl": last.get("objective/kl"),
            "first_scores": self.history[0].get("objective/scores") if self.history else None,
            "final_scores": last.get("objective/scores"),
            "tokens_processed": self.tokens,
            "train_rows": len(self.prompts),
            "held_out_rows": len(self.eval_prompts),
            "heldout_before": self.eval_before,
            "heldout_after": self.eval_after,
            "health_warnings": self.health_log,
        }
        if stopped:
            summary["stopped"] = stopped
        return summary

    def write_summary(self, stopped: str | None = None) -> dict[str, Any]:
        summary = self.summary(stopped)
        if self.dist.is_main:
            atomic_write_json(self.out / "summary.json", summary)
        return summary
