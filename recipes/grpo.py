"""Critic-free online RL with LoRA or QLoRA: GRPO or RLOO through TRL, on prompts with rewards a program computes.

    accelerate launch recipes/grpo.py                                   # GRPO, embedded default, verifier reward
    accelerate launch recipes/grpo.py --config recipes/configs/grpo_rloo.yaml     # RLOO (--algorithm rloo)
    accelerate launch recipes/grpo.py --reward outputs/reward           # the reward recipe's model
    accelerate launch recipes/grpo.py --reward verifier,my_rewards.py:score --reward_weights 1.0,0.5
    accelerate launch recipes/grpo.py --resume                          # continue after SIGTERM, Ctrl-C or a crash

Each step samples num_generations replies per prompt, scores them, and moves the policy towards the replies
that beat their group: GRPO's advantage is (reward - group mean) / group std (Shao et al. 2024, DeepSeekMath,
eq. 3), RLOO's is reward - the mean of the other replies to the same prompt (Ahmadian et al. 2024). No critic,
so less memory and fewer settings than PPO (recipes/ppo.py). The reference for the KL term (beta > 0) is the
policy's base with the adapter disabled: TRL does that when it builds the LoRA itself (peft_config).
A reward is `verifier` (align.evaluation.verifier, guarded: a degenerate reply earns 0), a reward-model directory from
recipes/reward.py, or any `fn(prompt_records, responses) -> list[float]` (PPO's signature); see align.trainers.grpo.

Writes output_dir/adapter, config.yaml, run_info.json, metrics.jsonl (train/reward, train/reward_std,
train/kl, clip_ratio/*, completions/mean_length, completions/eos_rate, rewards/<name>/mean, ...),
tensorboard/, summary.json with the verifier's greedy before -> after on held-out prompts, and the model card.
"""

import time
from dataclasses import dataclass
from typing import Literal

from align.config import arg, parse_config
from align.data.load import DataArgs, check_lengths, load_prompts, load_train
from align.errors import ConfigError, cli_main
from align.evaluation.policy_report import before_after, summarize_policy
from align.log import get_logger
from align.models.activations import CompressActivationsMixin, FreedMemoryArgs, heap_for_inference
from align.models.loading import ModelArgs, check_peft_supported, load_model, peft_config, resolve_quantization
from align.publish.hub import publish_run
from align.trainers.common import FiniteLossMixin, LoraPlusMixin, RunArgs, guard_callbacks, is_main_process, on_gpu, peak_memory_mb, save_adapter, start_run, train, trainer_kwargs, world_size, write_summary
from align.trainers.grpo import EosRateMixin, check_constraints_present, load_reward, parse_rewards, prompt_dataset, trl_reward_func
from align.trainers.phases import ReportGenerationMixin

logger = get_logger(__name__)


@dataclass
class GRPOArgs(RunArgs, ModelArgs, DataArgs, FreedMemoryArgs):
    algorithm: Literal["grpo", "rloo"] = arg("grpo", "grpo: advantage = (reward - group mean) / group std; rloo: reward - mean of the others")
    output_dir: str = arg("outputs/grpo", "where the adapter, checkpoints, metrics and summary go")
    eval_data: str | None = arg("ifprefs:eval", "held-out prompts for the summary's before -> after (greedy); none = skip")
    reward: list[str] = arg(["verifier"], "reward(s), comma-separated: verifier | a reward-model directory | file.py:function | module:function")
    reward_weights: list[float] | None = arg(None, "one weight per reward (comma-separated); none = 1.0 each")
    reward_guard: bool = arg(True, "verifier reward: a degenerate reply (align.evaluation.degeneration) earns 0; false = the raw verifier score")
    reward_batch_size: int = arg(8, "rows per forward pass of a reward model")
    num_generations: int = arg(4, "replies sampled per prompt (the group); must divide the replies per step")
    per_device_train_batch_size: int = arg(8, "replies per micro-batch per process (8 = 2 prompts x 4 generations)")
    max_completion_length: int = arg(64, "longest reply sampled, in tokens")
    max_length: int = arg(320, "prompt + reply tokens: prompts over max_length - max_completion_length are skipped (on_too_long)")
    on_too_long: Literal["error", "skip"] = arg("skip", "prompts that leave no room for the reply: skip (counted and reported) or error")
    temperature: float = arg(0.7, "sampling temperature (pure sampling: no top-k or top-p, as PPO)")
    learning_rate: float = arg(5e-5, "peak learning rate (LoRA; TRL's 1e-6 default is for full fine-tuning)")
    beta: float = arg(0.05, "KL coefficient towards the reference (the base, adapter disabled); 0 = no reference pass")
    epsilon: float = arg(0.2, "PPO-style ratio clip epsilon")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = arg("dapo", "GRPO only: how token losses are averaged (TRL's; dapo: over all tokens of the batch)")
    scale_rewards: Literal["group", "batch", "none"] = arg("group", "GRPO only: divide advantages by the group's std, the batch's, or nothing (Dr. GRPO)")
    use_vllm: bool = arg(False, "generate with vLLM (CUDA GPU and the vllm package only)")
    gradient_checkpointing: bool | None = arg(None, "recompute activations in backward; none = hardware default (GPU: on, CPU: off)")
    lora_dropout: float = arg(0.0, "LoRA dropout (0: sampling and the loss then see the same policy, ratio 1 on policy)")
    save_steps: int = arg(4, "checkpoint every N optimizer steps")
    summary_prompts: int = arg(320, "held-out prompts generated (greedy) for the summary's before -> after (320: all of ifprefs:eval; 0 = skip)")
    summary_max_new_tokens: int = arg(96, "longest reply generated for the summary")

    def validate(self) -> None:
        DataArgs.validate(self)
        if self.num_generations < 2:
            raise ConfigError(f"config: num_generations: expected at least 2 replies per prompt (a group), got {self.num_generations}")
        replies = self.per_device_train_batch_size * self.gradient_accumulation_steps * world_size()
        if replies % self.num_generations:
            raise ConfigError(f"config: num_generations ({self.num_generations}) must divide the replies per step: per_device_train_batch_size "
                              f"x gradient_accumulation_steps x processes = {replies}")
        if self.max_completion_length < 1 or self.max_length <= self.max_completion_length:
            raise ConfigError(f"config: max_length ({self.max_length}) must exceed max_completion_length ({self.max_completion_length}) >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"config: temperature: expected > 0, got {self.temperature}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward):
            raise ConfigError(f"config: reward_weights: {len(self.reward_weights)} weights for {len(self.reward)} rewards ({','.join(self.reward)})")
        if self.use_vllm and not on_gpu():
            raise ConfigError("config: use_vllm: vLLM generation needs a CUDA GPU, and this machine has none (drop --use_vllm)")


@cli_main
def main() -> None:
    cfg = parse_config(GRPOArgs)
    check_peft_supported(cfg, "grpo")
    rewards = parse_rewards(cfg.reward)  # a bad spec fails here, before any model is loaded
    if cfg.use_vllm:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("config: use_vllm: the vllm package is not installed (pip install vllm, or drop --use_vllm)")
    start_run(cfg, cfg.algorithm, cpu_max_steps=16)
    if cfg.return_freed_memory:
        logger.info(f"{cfg.algorithm}: {cfg.freed_memory_note()}")
    started = time.time()

    # Prompts: the prompt part of any supported data; the verifier needs their constraints
    records = load_train(load_prompts, cfg, format=cfg.data_format, on_bad_rows=cfg.on_bad_rows, extra_fields=cfg.extra_fields)
    if any(r.kind == "verifier" for r in rewards):
        check_constraints_present(records, cfg.train_data)
    eval_prompts = load_prompts(cfg.eval_data, max_rows=cfg.summary_prompts) if cfg.eval_data and cfg.summary_prompts else []
    eval_prompts = [p for p in eval_prompts if p.constraints]  # the before -> after block is the verifier's

    # Model: the base alone; TRL adds the LoRA (peft_config), so the reference is this base with the adapter disabled
    model, tokenizer = load_model(cfg, lora=False)
    records = check_lengths(records, tokenizer, cfg.max_length - cfg.max_completion_length, cfg.on_too_long)
    logger.info(f"data: {len(records)} training prompts from {cfg.train_data}; {len(eval_prompts)} held-out prompts")
    logger.info(f"{cfg.algorithm}: reward " + " + ".join(
        f"{w:g} x {s.describe(cfg.reward_guard)}" for s, w in zip(rewards, cfg.reward_weights or [1.0] * len(rewards))))
    before = summarize_policy(model, tokenizer, [], eval_prompts, beta=cfg.beta, adapter=False,
                              max_new_tokens=cfg.summary_max_new_tokens, batch_size=16) if eval_prompts else {}

    reward_funcs = build_reward_funcs(cfg, rewards, records)
    trainer = build_trainer(cfg, model, tokenizer, prompt_dataset(records), reward_funcs, guard_callbacks(cfg.output_dir))
    result = train(trainer, cfg)
    train_time = time.time() - started
    save_adapter(trainer.model, tokenizer, f"{cfg.output_dir}/adapter")

    if cfg.return_freed_memory and eval_prompts:  # training's 1 MiB mmap threshold costs inference page faults
        logger.info(f"{cfg.algorithm}: {heap_for_inference()}")
    after = summarize_policy(trainer.model, tokenizer, [], eval_prompts, beta=cfg.beta, adapter=True,
                             max_new_tokens=cfg.summary_max_new_tokens, batch_size=16) if eval_prompts else {}
    if is_main_process():
        write_summary(cfg.output_dir, {
            "method": cfg.algorithm,
            "reward": [s.describe(cfg.reward_guard) for s in rewards],
            "steps": trainer.state.global_step,
            "train_loss": result.training_loss,
            "train_rows": len(records),
            "held_out_rows": len(eval_prompts),
            "before": before,
            "after": after,
            "tokens_processed": trainer.state.num_input_tokens_seen,
            "train_tokens_per_s": round(trainer.state.num_input_tokens_seen / max(train_time, 1e-9), 1),
            "wall_time_s": round(time.time() - started, 1),
            "peak_memory_mb": round(peak_memory_mb(), 1),
        })
        if before and after:
            logger.info(before_after(before, after))
        publish_run(cfg)  # the model card, then the upload when --push_to_hub asks


def build_reward_funcs(cfg: GRPOArgs, rewards, records):
    """Each reward as a TRL reward function, reading each reply's PromptRecord through the dataset's `record` column
    (the order of `records` is the dataset's: prompt_dataset(records))."""
    from accelerate import PartialState

    device = PartialState(cpu=not on_gpu()).device  # where the trainer will put the policy (this process's GPU)
    quantization = resolve_quantization(cfg.quantization)
    return [trl_reward_func(load_reward(s, guard=cfg.reward_guard, dtype=cfg.dtype, quantization=quantization,
                                        device=device, batch_size=cfg.reward_batch_size), s.name, records)
            for s in rewards]


def build_trainer(cfg: GRPOArgs, model, tokenizer, train_dataset, reward_funcs, callbacks):
    """TRL's GRPOTrainer or RLOOTrainer with this project's guards and settings."""
    if cfg.algorithm == "grpo":
        from trl import GRPOConfig as Config, GRPOTrainer as Base

        extra = dict(loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards)
    else:
        from trl import RLOOConfig as Config, RLOOTrainer as Base

        extra = {}
    if resolve_quantization(cfg.quantization) != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(cfg.gradient_checkpointing))

    # ReportGenerationMixin: callbacks hear each step's generation and log-prob passes (align.trainers.phases)
    class Trainer(ReportGenerationMixin, FiniteLossMixin, LoraPlusMixin, CompressActivationsMixin, EosRateMixin, Base):
        compress_activations = cfg.compress_activations
        loraplus_lr_ratio = cfg.loraplus_lr_ratio

    args = Config(
        **{**trainer_kwargs(cfg), "include_num_input_tokens_seen": "no"},  # TRL counts prompt + reply tokens itself
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_k=0, top_p=1.0,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        reward_weights=cfg.reward_weights,
        use_vllm=cfg.use_vllm,
        disable_dropout=True,
        eval_strategy="no",
        **extra,
    )
    return Trainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                   callbacks=callbacks, peft_config=peft_config(cfg))


if __name__ == "__main__":
    main()
