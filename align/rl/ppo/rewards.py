"""The reward of a PPO run as one call, `(prompt_records, response_texts) -> list of floats`.

`reward_function` turns a RewardPlan (align.rl.ppo.models.plan_reward) into that call: the reward adapter
on the shared base, a separate reward model with its own tokenizer, the built-in verifier, or any Python
function named `module.path:function` or `file.py:function` (`import_function`, which GRPO's --reward
uses too).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from align.errors import ConfigError
from align.models.loading import eval_mode, resolve_quantization
from align.records import PromptRecord
from align.rl.ppo.config import REWARD, PPOArgs, RewardFn
from align.rl.ppo.models import PPOModels, RewardPlan


def import_function(spec: str) -> RewardFn:
    """The function `spec` names: `module.path:function` (imported) or `file.py:function` (loaded from the file)."""
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
    from align.models.reward_model import load_reward_model, score_texts

    if plan.kind == "function":
        if plan.function == "verifier":
            from align.evaluation.verifier import guarded_verifier_reward, verifier_reward

            return guarded_verifier_reward if cfg.reward_guard else verifier_reward
        return import_function(str(plan.function))
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
