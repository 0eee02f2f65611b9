"""Supervised fine-tuning with LoRA or QLoRA, loss on every assistant turn and nothing else.

    accelerate launch recipes/sft.py                                  # embedded default, built-in ifprefs:sft
    accelerate launch recipes/sft.py --config recipes/configs/sft_400.yaml --lora_r 32
    accelerate launch --multi_gpu --num_processes 2 recipes/sft.py    # two processes (CPU: gloo)

The trainer is TRL's SFTTrainer with the LM head of align/trainers/sft_fast.py (only on assistant tokens, in chunks; the
same loss and metrics, tests/unit/trainers/test_sft_fast.py) and each batch's conversations in one row without padding
(padding_free); --label_head false --padding_free false is TRL's path. Gradient checkpointing follows the
hardware (CPU off: fastest; --gradient_checkpointing true: ~0.6x the memory at ~0.65x the speed).

Writes output_dir/adapter (and output_dir/merged with --merge), config.yaml, run_info.json,
metrics.jsonl, tensorboard/, summary.json and the model cards (README.md). The merged model is the base for
reward, DPO and PPO. --push_to_hub user/name uploads adapter, card and summary.
"""

import time
from dataclasses import dataclass

from align.config import arg, parse_config
from align.data.load import DataArgs, load_prompts, to_hf_dataset
from align.errors import cli_main
from align.evaluation.policy_report import before_after, summarize_policy
from align.log import get_logger
from align.models.activations import CompressActivationsMixin, MemoryArgs, apply_memory_settings
from align.models.chat import training_chat_template
from align.models.loading import PROMPT_LEARNING, ModelArgs, can_merge, check_peft_supported, load_model, merge_adapter
from align.publish.hub import publish_run
from align.trainers.common import FiniteLossMixin, LoraPlusMixin, RunArgs, guard_callbacks, load_records, peak_memory_mb, save_adapter, start_run, train, trainer_kwargs, write_summary
from align.trainers.sft_fast import FastSFTArgs, FastSFTTrainer

logger = get_logger(__name__)


@dataclass
class SFTArgs(MemoryArgs, RunArgs, ModelArgs, DataArgs, FastSFTArgs):
    output_dir: str = arg("outputs/sft", "where the adapter, checkpoints, metrics and summary go")
    train_data: str = arg("ifprefs:sft", "SFT data: messages or prompt/completion rows (file, folder, hf:NAME, built-in)")
    eval_data: str | None = arg(None, "held-out SFT data for eval loss; none = no evaluation")
    learning_rate: float = arg(2e-4, "peak learning rate")
    assistant_only_loss: bool = arg(True, "loss on assistant turns only (every one of them in multi-turn chats)")
    packing: bool = arg(False, "pack several examples into each max_length sequence (no cross-example attention)")
    padding_free: bool = arg(True, "each batch's conversations in one row without padding, kept apart by position ids: no "
                                   "compute on padding, the same loss (not with on_too_long keep: TRL truncates only padded rows)")
    merge: bool = arg(True, "also save output_dir/merged: base + adapter merged, the base for later stages")
    summary_prompts: int = arg(320, "held-out eval prompts generated greedily before and after training for the summary (320: all of ifprefs:eval; 0 = skip)")
    summary_max_new_tokens: int = arg(96, "longest reply generated for the summary")

    def validate(self) -> None:
        DataArgs.validate(self)
        MemoryArgs.validate(self)


@cli_main
def main() -> None:
    cfg = parse_config(SFTArgs)
    check_peft_supported(cfg, "sft")
    if cfg.merge and cfg.use_lora and not can_merge(cfg.peft):
        cfg.merge = False  # before start_run, so config.yaml says so
        logger.info(f"sft: merge false: a {cfg.peft} adapter is virtual tokens, nothing to fold into the weights; "
                    "output_dir/adapter is the result (later stages start from the plain base)")
    for note in virtual_token_settings(cfg):  # before start_run, so config.yaml says so
        logger.info(f"sft: {note}")
    start_run(cfg, "sft", cpu_max_steps=30)
    started = time.time()

    model, tokenizer = load_model(cfg)
    if cfg.assistant_only_loss:
        tokenizer.chat_template = training_chat_template(tokenizer)  # renders the same, marks replies
    train_records, eval_records = load_records(cfg, "sft", tokenizer)
    # The same before -> after block as DPO's (greedy, same prompts and keys): coherent strict first, per constraint type
    prompts = load_prompts("ifprefs:eval", max_rows=cfg.summary_prompts) if cfg.summary_prompts else []
    before = summarize_policy(model, tokenizer, [], prompts, beta=0.0, adapter=False,
                              max_new_tokens=cfg.summary_max_new_tokens) if prompts else None

    trainer = build_trainer(cfg, model, tokenizer, to_hf_dataset(train_records),
                            to_hf_dataset(eval_records) if eval_records else None, guard_callbacks(cfg.output_dir))
    result = train(trainer, cfg)
    eval_metrics = trainer.evaluate() if eval_records else {}

    save_adapter(trainer.model, tokenizer, f"{cfg.output_dir}/adapter")
    after = summarize_policy(trainer.model, tokenizer, [], prompts, beta=0.0, adapter=True,
                             max_new_tokens=cfg.summary_max_new_tokens) if prompts else None
    if cfg.merge and trainer.is_world_process_zero():
        merge_adapter(f"{cfg.output_dir}/adapter", f"{cfg.output_dir}/merged", dtype=cfg.dtype)
    if trainer.is_world_process_zero():
        write_summary(cfg.output_dir, {
            "method": "sft",
            "steps": trainer.state.global_step,
            "train_loss": result.training_loss,
            "eval_loss": eval_metrics.get("eval_loss"),
            "train_rows": len(train_records),
            "held_out_rows": len(eval_records),
            "before": before,
            "after": after,
            "tokens_processed": trainer.state.num_input_tokens_seen,
            "wall_time_s": round(time.time() - started, 1),
            "peak_memory_mb": round(peak_memory_mb(), 1),
        })
        if before and after:
            logger.info(before_after(before, after))
        publish_run(cfg)  # the model cards of adapter and merged model, then the upload when --push_to_hub asks


def virtual_token_settings(cfg: SFTArgs) -> list[str]:
    """Turn off what a prompt-learning adapter (virtual tokens) cannot take; returns a line for each change."""
    notes = []
    if not (cfg.use_lora and cfg.peft in PROMPT_LEARNING):
        return notes
    if cfg.padding_free and not cfg.packing:
        cfg.padding_free = False
        notes.append(f"padding_free false: a {cfg.peft} adapter prepends its virtual tokens to every row and PEFT drops "
                     "the position ids that keep padding-free conversations apart")
    if cfg.peft == "prefix_tuning" and cfg.gradient_checkpointing is not False:  # None: on a GPU it would be on
        cfg.gradient_checkpointing = False
        notes.append("gradient_checkpointing false: peft's prefix tuning does not work with it")
    return notes


def build_trainer(cfg: SFTArgs, model, tokenizer, train_dataset, eval_dataset, callbacks):
    """The SFT trainer of this recipe (`python bench/run.py --stage sft` times this same function)."""
    from trl import SFTConfig

    notes = apply_memory_settings(cfg, model)
    if notes:
        logger.info(f"sft: {'; '.join(notes)}")

    class Trainer(FiniteLossMixin, LoraPlusMixin, CompressActivationsMixin, FastSFTTrainer):
        compress_activations = cfg.compress_activations
        loraplus_lr_ratio = cfg.loraplus_lr_ratio

    # packed and padding-free rows are kept apart by position ids, not attention masks. TRL enforces no max_length on
    # unpacked padding-free rows and refuses one: load_records has already refused or dropped longer rows
    padding_free = cfg.packing or (cfg.padding_free and cfg.on_too_long != "keep" and cfg.per_device_train_batch_size > 1)
    args = SFTConfig(
        **trainer_kwargs(cfg),
        max_length=cfg.max_length if cfg.packing or not padding_free else None,
        assistant_only_loss=cfg.assistant_only_loss,
        packing=cfg.packing,
        padding_free=padding_free,
        eval_strategy="no",
    )
    return Trainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
                   callbacks=callbacks, fast=cfg.label_head, chunk_size=cfg.logprob_chunk_size)


if __name__ == "__main__":
    main()
