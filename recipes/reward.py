"""A Bradley-Terry reward model: a scalar score head plus LoRA, trained on preference pairs.

    accelerate launch recipes/reward.py                               # SFT base if outputs/sft/merged exists
    accelerate launch recipes/reward.py --config recipes/configs/reward_qlora_8b.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/reward.py

loss = -log sigmoid(r(chosen) - r(rejected) - margin)   (margin from the data's `margin` field, if any)

Writes output_dir/adapter (LoRA + the `score` head, as PEFT saves it), config.yaml, metrics.jsonl,
tensorboard/, summary.json with held-out accuracy and reward margins, and the model card (README.md). Score text with it through
`align.models.reward_model.load_reward_model` and `score_texts`, as PPO and evaluation do.
"""

import time
from dataclasses import dataclass
from pathlib import Path

from align.config import arg, parse_config
from align.data.load import DataArgs, to_hf_dataset
from align.errors import cli_main
from align.log import get_logger
from align.models.activations import CompressActivationsMixin, FreedMemoryArgs, heap_for_inference
from align.models.generation import own_forward
from align.models.loading import DEFAULT_MODEL, ModelArgs, check_peft_supported, load_model
from align.models.reward_model import Float32ScoreHeadMixin, score_pairs
from align.publish.hub import publish_run
from align.trainers.common import FiniteLossMixin, LoraPlusMixin, RunArgs, guard_callbacks, load_records, peak_memory_mb, save_adapter, start_run, train, trainer_kwargs, write_summary

logger = get_logger(__name__)
# learning_rate none: (CPU short run, GPU). On the pipeline's SFT model, 24 steps at 1e-3 rank 0.86 of 256 held-out
# pairs correctly, at 1e-4 0.58 (chance is 0.5): a PPO rewarded by the latter learns from noise (issue 18).
LEARNING_RATES = (1e-3, 1e-4)


@dataclass
class RewardArgs(RunArgs, ModelArgs, DataArgs, FreedMemoryArgs):
    output_dir: str = arg("outputs/reward", "where the adapter, checkpoints, metrics and summary go")
    model_name_or_path: str = arg("auto", "base model; auto = outputs/sft/merged when it exists, else the embedded default")
    learning_rate: float | None = arg(None, "peak learning rate (LoRA and score head); none = by hardware: 1e-3 for the CPU short "
                                            "run (issue 18), 1e-4 on a GPU")
    center_rewards_coefficient: float | None = arg(None, "weight of the mean-squared-reward penalty that centres scores (Eisenstein et al. 2023)")
    share_prompt: bool = arg(True, "one row per pair: chosen and rejected share one copy of their common start, the prompt and any "
                                   "identical start of the replies (exact; align.trainers.reward_fast); off = TRL's two rows")


def held_out_accuracy(model, tokenizer, pairs, batch_size: int) -> dict:
    """Share of held-out pairs the model ranks correctly, and the mean score margin."""
    if not pairs:
        return {}
    with own_forward(model):  # after training, as before it: without accelerate's mixed-precision wrapper
        chosen, rejected = score_pairs(model, tokenizer, [p.prompt for p in pairs], [p.chosen for p in pairs],
                                       [p.rejected for p in pairs], batch_size)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {
        "eval/accuracy": sum(m > 0 for m in margins) / len(margins),
        "eval/margin_mean": sum(margins) / len(margins),
        "eval/pairs": len(margins),
    }


@cli_main
def main() -> None:
    cfg = parse_config(RewardArgs)
    check_peft_supported(cfg, "reward")
    if cfg.model_name_or_path == "auto":
        sft = Path("outputs/sft/merged")
        cfg.model_name_or_path = str(sft) if (sft / "config.json").is_file() else DEFAULT_MODEL
    start_run(cfg, "reward", cpu_max_steps=40, learning_rates=LEARNING_RATES)
    started = time.time()

    model, tokenizer = load_model(cfg, task="reward")
    train_pairs, eval_pairs = load_records(cfg, "prefs", tokenizer)
    before = held_out_accuracy(model.eval(), tokenizer, eval_pairs, cfg.per_device_train_batch_size)

    trainer = build_trainer(cfg, model, tokenizer, to_hf_dataset(train_pairs), guard_callbacks(cfg.output_dir))
    result = train(trainer, cfg)
    if cfg.return_freed_memory:  # training's 1 MiB mmap threshold costs inference page faults (heap_for_inference)
        logger.info(f"reward: {heap_for_inference()}")
    after = held_out_accuracy(trainer.model.eval(), tokenizer, eval_pairs, cfg.per_device_train_batch_size)

    save_adapter(trainer.model, tokenizer, f"{cfg.output_dir}/adapter")
    if trainer.is_world_process_zero():
        write_summary(cfg.output_dir, {
            "method": "reward",
            "steps": trainer.state.global_step,
            "train_loss": result.training_loss,
            "train_rows": len(train_pairs),
            "held_out_rows": len(eval_pairs),
            "before": before,
            "after": after,
            "tokens_processed": trainer.state.num_input_tokens_seen,
            "wall_time_s": round(time.time() - started, 1),
            "peak_memory_mb": round(peak_memory_mb(), 1),
        })
        publish_run(cfg)  # the model card, then the upload when --push_to_hub asks


def build_trainer(cfg: RewardArgs, model, tokenizer, train_dataset, callbacks):
    """The reward trainer of this recipe (`python bench/run.py --stage reward` times this same function)."""
    from trl import RewardConfig

    from align.trainers.reward_fast import FastRewardTrainer

    if cfg.return_freed_memory:  # as the DPO, PPO and GRPO recipes: freed activations go back to the OS (peak RSS)
        logger.info(f"reward: {cfg.freed_memory_note()}")

    class Trainer(FiniteLossMixin, LoraPlusMixin, CompressActivationsMixin, Float32ScoreHeadMixin, FastRewardTrainer):
        compress_activations = cfg.compress_activations
        loraplus_lr_ratio = cfg.loraplus_lr_ratio

    args = RewardConfig(
        **trainer_kwargs(cfg),
        max_length=cfg.max_length,
        center_rewards_coefficient=cfg.center_rewards_coefficient,
        eval_strategy="no",
    )
    return Trainer(model=model.train(), args=args, train_dataset=train_dataset, processing_class=tokenizer, callbacks=callbacks,
                   share_prompt=cfg.share_prompt)


if __name__ == "__main__":
    main()
