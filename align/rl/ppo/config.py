"""PPOArgs: every setting of the PPO engine, with its default and help text (a YAML in recipes/configs/ holds only what differs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from align.config import arg
from align.errors import ConfigError
from align.log import LogArgs
from align.models.activations import FreedMemoryArgs
from align.models.loading import ModelArgs, check_peft_supported
from align.publish.hub import PublishArgs
from align.records import PromptRecord

# the adapters on the shared base (align.rl.ppo.models); the reference is the base with none active
POLICY, CRITIC, REWARD = "policy", "critic", "reward"
RewardFn = Callable[[list[PromptRecord], list[str]], list[float]]


@dataclass
class PPOArgs(ModelArgs, PublishArgs, LogArgs, FreedMemoryArgs):
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
    num_eval_prompts: int = arg(128, "how many held-out prompts to answer greedily before and after training (0 = skip)")
    summary_max_new_tokens: int = arg(96, "longest held-out reply generated before and after training (as the other recipes' summaries)")
    # ---- rollout
    rollout_batch_size: int = arg(8, "responses per update, over all processes (prompts x samples_per_prompt)")
    samples_per_prompt: int = arg(1, "responses sampled per prompt in an update; > 1: each score minus the mean of its prompt's "
                                     "other samples (RLOO's leave-one-out baseline) before the KL penalty and GAE")
    response_length: int = arg(64, "maximum new tokens per response")
    temperature: float = arg(0.7, "sampling temperature (pure sampling: no top-k, top-p or repetition penalty)")
    reward_guard: bool = arg(True, "with the verifier reward: a degenerate reply (align.evaluation.degeneration: a loop, a line repeated 3 times, "
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
    critic: Literal["adapter", "shared"] = arg(
        "adapter", "adapter: the critic is a LoRA adapter of its own on the shared base (from the reward adapter when there is one), "
                   "with its own forward and backward; shared: a value head on the policy's last hidden state, scored and trained "
                   "in the policy's pass (TRL's PPOTrainer): fewer passes, and the value loss (x vf_coef) also trains the policy's adapter")
    vf_coef: float = arg(0.1, "critic shared: weight of the value loss in the policy's loss (TRL's default)")
    lr_scheduler: Literal["constant", "linear"] = arg("constant", "learning rate over the run: constant, or linear decay to 0")
    max_grad_norm: float = arg(1.0, "gradient clipping norm, applied to the policy and to the critic separately")
    cliprange: float = arg(0.2, "PPO ratio clip epsilon")
    cliprange_value: float | None = arg(0.2, "value clip epsilon; none = unclipped value loss")
    gamma: float = arg(1.0, "discount")
    lam: float = arg(0.95, "GAE lambda")
    kl_coef: float = arg(0.05, "KL penalty coefficient beta (initial value when kl_target is set)")
    kl_estimator: Literal["k1", "k2", "k3"] = arg("k1", "per-token KL estimator in the reward (see align.ops.kl.token_kl)")
    kl_target: float | None = arg(None, "adaptive KL: steer the mean KL per response towards this (nats); none = fixed beta")
    kl_horizon: float = arg(10000.0, "adaptive KL horizon, in responses")
    whiten_rewards: bool = arg(False, "whiten the per-token rewards (keeping their mean) before GAE")
    # ---- PPO-ptx (align.rl.ppo.ptx): a likelihood term on demonstrations in the policy's loss
    ptx_data: str | None = arg(None, "demonstrations (any SFT data, e.g. ifprefs:sft) whose replies' NLL, x ptx_coef, is added to the "
                                     "policy's loss at every optimizer step (InstructGPT's PPO-ptx); none = off")
    ptx_coef: float = arg(1.0, "weight of the demonstrations' token-mean NLL in the policy's loss (with ptx_data)")
    ptx_batch_size: int = arg(4, "demonstrations per optimizer step, over all processes (with ptx_data); each process's share is "
                                 "one forward and backward, so it costs the memory of a micro-batch of that many rows")
    ptx_max_length: int = arg(512, "demonstrations longer than this many tokens (prompt + reply) are skipped and counted")
    sft_steps: int = arg(0, "optimizer steps of the demonstrations' NLL alone (ptx_data, ptx_batch_size a step) before the first update: "
                            "SFT inside the run, as the DPO recipe's --sft_steps (learning_rate, warmed up over the first tenth, "
                            "then constant; the reference stays the starting model); then a checkpoint at update 0; 0 = off")
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
    # ---- health checks (warn in the log and summary; stop the run under stop_on_health)
    stop_on_health: bool = arg(False, "stop the run (after a checkpoint) when a health check crosses its threshold")
    health_min_kl: float = arg(-0.05, "warn when the mean KL per response is below this and 2 standard errors below 0 (a sampling/scoring mismatch)")
    health_kl_budget: float = arg(10.0, "warn when the mean KL per response exceeds this (nats)")
    health_max_ratio: float = arg(10.0, "warn when the largest PPO ratio in an update exceeds this")
    health_eos_drop: float = arg(0.25, "warn when the share of responses ending with EOS falls this much below the run's start")
    health_saturation_rise: float = arg(0.25, "warn when the share of responses filling response_length rises this much above the start")
    health_window: int = arg(6, "updates compared: the last half against the half before (gaming) or the run's start (EOS, length)")

    @property
    def prompts_per_update(self) -> int:
        """Distinct prompts of an update: its rollout_batch_size responses are samples_per_prompt of each."""
        return self.rollout_batch_size // self.samples_per_prompt

    def validate(self) -> None:
        positive = ("rollout_batch_size", "samples_per_prompt", "response_length", "forward_batch_size", "total_updates", "ppo_epochs",
                    "minibatch_size", "micro_batch_size", "save_steps", "save_total_limit", "max_prompt_length")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"config: {name}: expected a positive integer, got {getattr(self, name)}")
        if self.rollout_batch_size % self.minibatch_size:
            raise ConfigError(
                f"config: minibatch_size ({self.minibatch_size}) must divide rollout_batch_size ({self.rollout_batch_size})"
            )
        if self.rollout_batch_size % self.samples_per_prompt:
            raise ConfigError(
                f"config: samples_per_prompt ({self.samples_per_prompt}) must divide rollout_batch_size ({self.rollout_batch_size})"
            )
        if self.temperature <= 0:
            raise ConfigError(f"config: temperature: expected > 0, got {self.temperature}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ConfigError(f"config: kl_target: expected > 0 nats or none, got {self.kl_target}")
        if self.vf_coef < 0:
            raise ConfigError(f"config: vf_coef: expected >= 0, got {self.vf_coef}")
        if self.sft_steps < 0:
            raise ConfigError(f"config: sft_steps: expected 0 or more steps, got {self.sft_steps}")
        if self.sft_steps and self.ptx_data is None:
            raise ConfigError(f"config: sft_steps: {self.sft_steps} steps of SFT need demonstrations: set ptx_data (e.g. ifprefs:sft)")
        if self.ptx_data is not None:
            if self.ptx_coef <= 0:
                raise ConfigError(f"config: ptx_coef: expected > 0 with ptx_data, got {self.ptx_coef}")
            for name in ("ptx_batch_size", "ptx_max_length"):
                if getattr(self, name) < 1:
                    raise ConfigError(f"config: {name}: expected a positive integer, got {getattr(self, name)}")
        if self.health_window < 2:
            raise ConfigError(f"config: health_window: expected at least 2 updates, got {self.health_window}")
        check_peft_supported(self, "ppo")

