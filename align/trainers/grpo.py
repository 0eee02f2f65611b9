"""Rewards and prompts for the critic-free online RL recipe (recipes/grpo.py: GRPO and RLOO through TRL).

TRL's GRPOTrainer and RLOOTrainer call each reward function as `fn(prompts=..., completions=...,
completion_ids=..., **dataset_columns)`; this project's reward functions (the verifier, a reward model,
a user's `fn(prompt_records, responses) -> list[float]`, the same signature PPO takes) see the canonical
`PromptRecord`s instead. `trl_reward_func` adapts one to the other through the dataset's `record` column,
the row's index in the prompt list every process loads in the same order.

    specs = parse_rewards(["verifier", "my_rewards.py:score"])     # ConfigError on a bad spec, before any model
    funcs = [trl_reward_func(load_reward(s, ...), s.name, records) for s in specs]
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align.errors import ConfigError
from align.records import PromptRecord

RewardFn = Callable[[list[PromptRecord], list[str]], list[float]]


@dataclass
class RewardSpec:
    """One entry of --reward, checked: the built-in verifier, a reward-model directory or a Python function."""

    kind: Literal["verifier", "model", "function"]
    spec: str
    name: str  # TRL logs rewards/<name>/mean and rewards/<name>/std

    def describe(self, guard: bool) -> str:
        if self.kind == "verifier":
            return "the built-in verifier (align.evaluation.verifier" + (", guarded: 0 for a degenerate reply)" if guard else ", unguarded)")
        if self.kind == "model":
            return f"the reward model {self.spec}"
        return f"the Python function {self.spec}"


def _reward_model_dir(path: Path) -> Path | None:
    """The directory load_reward_model reads (path or path/adapter), or None when it holds no model."""
    for cand in (path / "adapter", path):
        if (cand / "adapter_config.json").is_file() or (cand / "config.json").is_file():
            return cand
    return None


def parse_rewards(specs: Sequence[str]) -> list[RewardSpec]:
    """Check every --reward entry now (a file function is imported here), so that a typo fails in a second.

    An entry is `verifier`, a directory written by recipes/reward.py (or any reward-model directory), or
    `file.py:function` / `module.path:function`. Raises ConfigError naming the field and the entry.
    """
    from align.rl.ppo.rewards import import_function  # PPO's --reward loader: the same files work for both recipes

    if not specs:
        raise ConfigError("config: reward: expected at least one reward (verifier, a reward-model directory or file.py:function)")
    out: list[RewardSpec] = []
    for spec in specs:
        spec = spec.strip()
        if spec == "verifier":
            out.append(RewardSpec("verifier", spec, "verifier"))
        elif Path(spec).is_dir():
            if _reward_model_dir(Path(spec)) is None:
                raise ConfigError(f"config: reward: {spec} is a directory but holds no reward model "
                                  "(adapter_config.json or config.json, as recipes/reward.py writes)")
            out.append(RewardSpec("model", spec, "reward_model"))
        elif ":" in spec and spec.rpartition(":")[0] and spec.rpartition(":")[2]:
            import_function(spec)  # ConfigError: file not found, cannot import, no such function
            out.append(RewardSpec("function", spec, spec.rpartition(":")[2]))
        else:
            raise ConfigError(f"config: reward: {spec!r} is not 'verifier', an existing reward-model directory, "
                              "or file.py:function / module.path:function")
    seen: dict[str, int] = {}
    for s in out:  # unique metric names: two reward models log as reward_model and reward_model_2
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", s.name)
        seen[base] = seen.get(base, 0) + 1
        s.name = base if seen[base] == 1 else f"{base}_{seen[base]}"
    return out


def load_reward(spec: RewardSpec, *, guard: bool, dtype: str = "auto", quantization: str = "none",
                device: Any = None, batch_size: int = 8) -> RewardFn:
    """The reward of one spec as one call: (prompt_records, response_texts) -> list of floats."""
    from align.rl.ppo.rewards import import_function

    if spec.kind == "verifier":
        from align.evaluation.verifier import guarded_verifier_reward, verifier_reward

        return guarded_verifier_reward if guard else verifier_reward
    if spec.kind == "function":
        return import_function(spec.spec)
    from align.models.reward_model import load_reward_model, score_texts

    model, tokenizer = load_reward_model(spec.spec, dtype=dtype, quantization=quantization)
    if quantization == "none" and device is not None:
        model.to(device)

    def reward_model(records: list[PromptRecord], responses: list[str]) -> list[float]:
        # Text in, text scored: the reward model's own tokenizer and chat template, as in training (align.models.reward_model).
        return score_texts(model, tokenizer, [r.prompt for r in records], responses, batch_size=batch_size)

    return reward_model


def check_constraints_present(records: Sequence[PromptRecord], source: str) -> None:
    """The verifier scores a reply by its prompt's constraints: every training prompt needs some."""
    missing = next((r for r in records if not r.constraints), None)
    if missing is not None:
        raise ConfigError(f"reward: the verifier scores prompts by their constraints, and {missing.source} has none "
                          f"(train_data {source}: use prompts with constraints, a reward model or a reward function)")


def prompt_dataset(records: Sequence[PromptRecord]):
    """TRL's conversational prompt-only rows, plus `record` (the index into `records`, for trl_reward_func) and
    `constraints` (JSON text, so that TRL-style reward functions can read them from their kwargs; a column of
    JSON text because Arrow would merge the constraint objects' different keys into one struct with nulls)."""
    import datasets

    return datasets.Dataset.from_list([
        {"prompt": r.prompt, "record": i, "constraints": json.dumps(r.constraints)} for i, r in enumerate(records)
    ])


def trl_reward_func(fn: RewardFn, name: str, records: Sequence[PromptRecord]) -> Callable[..., list[float]]:
    """`fn(prompt_records, responses)` as a TRL reward function `(prompts, completions, record, **kwargs)`.

    A non-finite reward stops the run (NonFiniteError) instead of reaching the advantages: TRL would treat NaN
    as "no reward" and average around it.
    """
    from align.trainers.common import NonFiniteError

    def reward(prompts: list, completions: list, record: list[int], **kwargs: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]  # conversational: one assistant turn
        values = [float(v) for v in fn([records[i] for i in record], texts)]
        if len(values) != len(texts):
            raise ConfigError(f"reward {name}: returned {len(values)} rewards for {len(texts)} replies")
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            step = kwargs.get("trainer_state").global_step + 1 if kwargs.get("trainer_state") is not None else "?"
            raise NonFiniteError(f"step {step}: reward {name} is {values[bad]} for {records[record[bad]].source}; "
                                 "the last good checkpoint is kept")
        return values

    reward.__name__ = name  # TRL names its per-function metrics after it
    return reward


class EosRateMixin:
    """Mixed into TRL's GRPO/RLOO trainer: logs `completions/eos_rate`, the share of completions that ended with
    EOS, next to TRL's `completions/clipped_ratio` (the share that hit max_completion_length), as PPO logs
    rollout/eos_rate. TRL averages `_metrics` in its own `log`, so the value is added there, before it."""

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        clipped = self._metrics[mode].get("completions/clipped_ratio")
        if clipped:
            self._metrics[mode]["completions/eos_rate"] = [1.0 - v for v in clipped]
        super().log(logs, start_time)
