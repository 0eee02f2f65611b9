"""The models of a PPO run: one base carrying the policy, critic and (shared) reward adapters, and their heads.

    models, plan = build_models(cfg, dist=dist)    # the base once, the adapters on it, the reward plan

`adapter_phase` (`PPOModels.phase`) is the only way the engine switches between adapters; `plan_reward`
decides, before any model is loaded, whether the reward is an adapter on this base, a separate model or a
Python function (align.rl.ppo.rewards turns the plan into one call).
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from align.errors import AlignError, ConfigError
from align.io import atomic_dir
from align.log import get_logger
from align.models.loading import ModelArgs, load_model, load_tokenizer, lora_config, resolve_model_path, resolve_quantization
from align.rl.ppo.config import CRITIC, POLICY, REWARD, PPOArgs
from align.rl.ppo.dist import Dist

logger = get_logger(__name__, tag="ppo")


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
    """The base with its adapters (`model`), the heads on it and the tokenizer: everything a PPO run trains or scores with."""

    model: Any  # peft.PeftModel over the base, adapters "policy", "critic" and maybe "reward"
    tokenizer: Any
    value_head: nn.Linear
    reward_head: nn.Linear | None
    base: BaseInfo
    reward_adapter_dir: str | None = None
    shared_critic: bool = False  # True: no critic adapter; the value head reads the policy's hidden state (--critic shared)

    @property
    def heads(self) -> dict[str, nn.Module]:
        """The heads by the phase that trains them: the value head with the critic, or with the policy when shared."""
        heads: dict[str, nn.Module] = {POLICY if self.shared_critic else CRITIC: self.value_head}
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
        """Adapter `name`'s parameters; CRITIC's include the value head (the value head alone when shared)."""
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
    return ModelArgs(model_name_or_path=name, quantization=quantization, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                     fused_swiglu=cfg.fused_swiglu)


def load_base(cfg: PPOArgs, dist: Dist | None = None):
    """The policy's base (the SFT model) as a plain causal LM, with its tokenizer and `BaseInfo`.

    sft_dir holding a merged model (config.json, or merged/config.json): that model. sft_dir holding only an
    adapter (adapter_config.json, or adapter/): its base with the adapter merged in memory. The merged model is
    also written once to output_dir/sft_merged: the saved PPO adapter names it as its base (so that
    align.models.loading.load_trained can load the policy), and a quantized base, which cannot take a merge, is
    loaded from it. No sft_dir: model_name_or_path, and say so.
    """
    quantization = resolve_quantization(cfg.quantization)
    sft = Path(cfg.sft_dir) if cfg.sft_dir else None
    if sft is None or not sft.exists():
        reason = "sft_dir is none" if sft is None else f"sft_dir {sft} does not exist"
        logger.info(f"{reason}: the base is the plain model {cfg.model_name_or_path} (no SFT)")
        base, tokenizer = load_model(_model_args(cfg, cfg.model_name_or_path, quantization), lora=False)
        return base, tokenizer, BaseInfo(cfg.model_name_or_path, _identity(cfg.model_name_or_path), f"{cfg.model_name_or_path} (no SFT)")
    adapter_dir = _find_dir(sft, "adapter_config.json")
    merged_dir = _find_dir(sft, "config.json")
    if merged_dir is not None and (adapter_dir is None or merged_dir.name == "merged"):
        logger.info(f"base: the merged SFT model in {merged_dir}")
        base, tokenizer = load_model(_model_args(cfg, str(merged_dir), quantization), lora=False)
        return base, tokenizer, BaseInfo(str(merged_dir), _identity(str(merged_dir)), f"SFT model {merged_dir}")
    if adapter_dir is None:
        raise ConfigError(f"sft_dir {sft}: holds neither a model (config.json) nor an adapter (adapter_config.json)")
    from peft import PeftModel

    base_name = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    merged = Path(cfg.output_dir) / "sft_merged"
    logger.info(f"base: {base_name} with the SFT adapter {adapter_dir} merged in memory (a copy goes to {merged})")
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
    """Which reward `cfg` asks for on this base: the verifier or a function, a separate model, or an adapter
    shared with the policy's base (when the reward adapter was trained on the same base, or placement says so)."""
    choice = cfg.reward
    guard = ", guarded: 0 for a degenerate reply" if cfg.reward_guard else ", unguarded (reward_guard false)"
    if choice == "verifier":
        return RewardPlan("function", f"the built-in verifier (align.evaluation.verifier{guard})", function="verifier")
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
        if cfg.critic == "adapter":
            critic_config = copy.deepcopy(reward_config)
            critic_config.inference_mode = False
            model.add_adapter(CRITIC, critic_config)
            set_peft_model_state_dict(model, reward_lora, adapter_name=CRITIC)
    elif cfg.critic == "adapter":
        critic_config = lora_config(cfg, "causal_lm")
        critic_config.task_type = None
        critic_config.lora_dropout = 0.0
        model.add_adapter(CRITIC, critic_config)
    # a shared critic reads the policy's hidden state, not the reward adapter's: its head starts fresh
    value_head = _linear_head(hidden, head_w, head_b, device) if cfg.critic == "adapter" else _linear_head(hidden, None, None, device)
    models = PPOModels(model=model, tokenizer=None, value_head=value_head, reward_head=reward_head, base=None,
                       reward_adapter_dir=plan.path if plan.kind == "shared" else None, shared_critic=cfg.critic == "shared")
    return models, plan
