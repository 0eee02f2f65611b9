"""Direct Preference Optimization (and its variants) with LoRA or QLoRA, straight from preference pairs.

    accelerate launch recipes/dpo.py                                  # the main job: embedded default, built-in pairs
    accelerate launch recipes/dpo.py --loss_type ipo --beta 0.5           # any field of DPOArgs as a flag
    accelerate launch --multi_gpu --num_processes 2 recipes/dpo.py    # two processes (CPU: gloo)

On a CPU with no --max_steps the run is 200 steps: the first 150 (--sft_steps) train the SFT term alone on the chosen
replies (prompt + chosen, no rejected reply, no reference: about a third of a DPO step), then 50 of DPO + SFT term;
the adapter carries on, and the reference stays the starting model. Any --max_steps (or a GPU) is DPO from the first step
unless --sft_steps says otherwise.

The reference is the policy's base with the adapter disabled: the plain base model, or the SFT model when
model_name_or_path points at outputs/sft/merged (the SFT adapter merged in, so "adapter disabled" is the
frozen SFT policy). Reference log-probs are computed on each step's own batch, through the policy's own path, so
before the first update every implicit reward is exactly 0 in every dtype (tests/unit/trainers/test_dpo_fast.py);
--precompute_ref_log_probs true computes them once before training instead (other batches: bf16 rounds differently).
The trainer is TRL's DPOTrainer with the faster log-probs of align/trainers/dpo_fast.py (prompt run once per pair,
LM head only on completion tokens; same loss, see tests/unit/trainers/test_dpo_fast.py); --fast_logprobs false is stock TRL.

Writes output_dir/adapter, config.yaml, run_info.json, metrics.jsonl (train/loss, rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies, ...), tensorboard/ and summary.json with held-out
preference accuracy and the verifier's score of the trained policy against the starting model, then the
model card (README.md, align.publish.model_card); --push_to_hub user/name uploads adapter, card and summary.
"""

import time
from dataclasses import dataclass

from align.config import arg, parse_config
from align.data.load import DataArgs, load_prompts
from align.errors import ConfigError, cli_main
from align.evaluation.policy_report import before_after
from align.log import get_logger
from align.models.activations import SHORT_RUN_MMAP_MB, CompressActivationsMixin, heap_for_inference
from align.models.loading import ModelArgs, check_peft_supported, load_model
from align.publish.hub import publish_run
from align.trainers.common import FiniteLossMixin, LoraPlusMixin, RunArgs, guard_callbacks, is_main_process, load_records, on_gpu, peak_memory_mb, save_adapter, shared_dataset, start_run, train, trainer_kwargs, world_size, write_summary
from align.trainers.dpo_fast import FastDPOArgs, FastDPOTrainer
from align.trainers.phases import ReportPhasesMixin

logger = get_logger(__name__)
LEARNING_RATES = (1e-3, 1e-4)  # learning_rate none: (CPU short run, GPU); the CPU one measured best (issue 18)
# loss_weights none with the default sigmoid,sft on a CPU: the DPO term a quarter of the SFT term. On two training
# samples of the short run it wrote fewer degenerate replies and fewer formats nobody asked for than 1,1, at the same
# coherent strict (docs/alignment_on_cpu.md: "How the main job's settings were chosen"); a GPU's full epoch keeps 1,1
# (not measured).
CPU_LOSS_WEIGHTS = (0.25, 1.0)
# The CPU short run: 200 steps, the first 150 the SFT term alone on the chosen replies (prompt + chosen, ~1/3 the cost of
# a DPO step), then 50 of DPO + SFT. From the plain model DPO barely moves the held-out verifier in 56 steps; after SFT
# it does (docs/alignment_on_cpu.md, "SFT first, in the main job").
CPU_MAX_STEPS, CPU_SFT_STEPS = 200, 150


@dataclass
class DPOArgs(RunArgs, ModelArgs, DataArgs, FastDPOArgs):
    output_dir: str = arg("outputs/dpo", "where the adapter, checkpoints, metrics and summary go")
    learning_rate: float | None = arg(None, "peak learning rate (LoRA); none = by hardware: 1e-3 for the CPU short run (the best "
                                            "measured, issue 18), 1e-4 on a GPU")
    lr_scheduler_type: str = arg("cosine", "learning-rate schedule (any transformers scheduler name)")
    warmup_steps: float = arg(0.1, "learning-rate warmup: a number of steps, or a fraction of all steps when < 1")
    beta: float = arg(0.1, "DPO beta: strength of the implicit KL penalty towards the reference")
    loss_type: list[str] = arg(["sigmoid", "sft"], "TRL DPO loss(es): sigmoid, ipo, hinge, robust, apo_zero, sft, ... (comma-separated "
                                                   "to combine); sigmoid,sft = DPO with an SFT term on the chosen reply (RPO)")
    loss_weights: list[float] | None = arg(None, "one weight per loss_type, comma-separated (e.g. sigmoid,sft with 0.2,1.0: "
                                                 "mostly the SFT term); none = 1.0 each, except the default sigmoid,sft on "
                                                 "a CPU: 0.25,1.0 (measured best for the short run, issue 18)")
    label_smoothing: float = arg(0.0, "assumed share of flipped labels (robust / cDPO losses)")
    precompute_ref_log_probs: bool = arg(False, "reference log-probs once before training, in their own batches, instead of on each step's batch (in bf16 the two differ by rounding: the first loss is then not exactly ln 2)")
    reference_free: bool = arg(False, "no reference model: the implicit reward is beta * log pi(reply) (TRL 0.x's reference_free); "
                                      "skips the reference forward of every step")
    sft_steps: int | None = arg(None, "the first N of the run's steps train the SFT term alone on the chosen replies (prompt + "
                                      "chosen: no rejected reply, no reference forward), at a constant learning rate after "
                                      "warmup; the rest are DPO with its own warmup and schedule: SFT then DPO on one adapter, "
                                      f"in one run. none = the CPU short run (max_steps not given): {CPU_SFT_STEPS} of its "
                                      f"{CPU_MAX_STEPS} steps; otherwise 0")
    max_length: int = arg(384, "maximum tokens of prompt + reply")
    gradient_checkpointing: bool | None = arg(None, "recompute activations in backward: ~1/3 more compute, a fraction of the "
                                                "activation memory; none = hardware default (GPU: on, CPU: off)")
    lora_dropout: float = arg(0.0, "LoRA dropout (0: TRL's DPOTrainer sets every dropout to 0 anyway, disable_dropout=True)")
    summary_prompts: int = arg(320, "held-out eval prompts generated for the summary's verifier score (320: all of ifprefs:eval; 0 = skip)")
    summary_max_new_tokens: int = arg(96, "longest reply generated for the summary")

    def validate(self) -> None:
        DataArgs.validate(self)
        known = {"sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                 "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}
        for name in self.loss_type:
            if name not in known:
                raise ConfigError(f"config: loss_type: unknown DPO loss {name!r}; expected one of {', '.join(sorted(known))}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ConfigError(f"config: loss_weights: expected {len(self.loss_type)} weight(s), one per loss_type "
                              f"({','.join(self.loss_type)}), got {len(self.loss_weights)}")
        if self.sft_steps is not None and self.sft_steps < 0:
            raise ConfigError(f"config: sft_steps: expected 0 or more steps, got {self.sft_steps}")
        if self.reference_free and self.precompute_ref_log_probs:
            raise ConfigError("config: reference_free: there is no reference to precompute; set precompute_ref_log_probs false")


def cpu_short_run(cfg: DPOArgs) -> bool:
    """The CPU short run: no max_steps given and no GPU (start_run then makes it CPU_MAX_STEPS steps)."""
    return cfg.max_steps is None and not on_gpu()


def default_sft_steps(cfg: DPOArgs) -> list[str]:
    """sft_steps none -> CPU_SFT_STEPS for the CPU short run (max_steps not given, so CPU_MAX_STEPS), else 0 (a GPU's
    full epoch, or a step count the user chose: plain DPO). Before start_run: config.yaml records what the run used.
    Returns the line start_run prints among the hardware defaults, if any."""
    if cfg.sft_steps is not None:
        return []
    short_run = cpu_short_run(cfg)
    cfg.sft_steps = CPU_SFT_STEPS if short_run else 0
    return [f"sft_steps={cfg.sft_steps} (CPU: the short run's first {cfg.sft_steps} of {CPU_MAX_STEPS} steps train the SFT "
            "term alone on the chosen replies, then DPO)"] if short_run else []


def default_freed_memory(cfg: DPOArgs) -> list[str]:
    """freed_memory_mmap_mb none -> SHORT_RUN_MMAP_MB for the CPU short run (max_steps not given), where the main
    job's time is the target: 4 MiB instead of 1 took its training from 838 to 717 s on a bf16 CPU, peak RSS
    5.5 -> 7.1 GB (docs/alignment_on_cpu.md, "The main job on a slower CPU"). Otherwise left for
    start_run (LEAN_MMAP_MB). Returns the line start_run prints among the hardware defaults, if any."""
    if cfg.freed_memory_mmap_mb is not None or not cfg.return_freed_memory or not cpu_short_run(cfg):
        return []
    cfg.freed_memory_mmap_mb = SHORT_RUN_MMAP_MB
    return [f"freed_memory_mmap_mb={SHORT_RUN_MMAP_MB} (CPU: the short run, speed over peak memory)"]


def default_loss_weights(cfg: DPOArgs) -> list[str]:
    """loss_weights none -> CPU_LOSS_WEIGHTS for the default sigmoid,sft on a CPU (before start_run: config.yaml
    records what the run used); any other loss_type, given weights or a GPU: left as they are. Returns the line
    start_run prints among the hardware defaults, if any."""
    if cfg.loss_weights is None and list(cfg.loss_type) == ["sigmoid", "sft"] and not on_gpu():
        cfg.loss_weights = list(CPU_LOSS_WEIGHTS)
        return [f"loss_weights={','.join(f'{w:g}' for w in cfg.loss_weights)} (CPU: the short run, the DPO term a quarter)"]
    return []


@cli_main
def main() -> None:
    cfg = parse_config(DPOArgs)
    check_peft_supported(cfg, "dpo")
    notes = default_sft_steps(cfg) + default_loss_weights(cfg) + default_freed_memory(cfg)
    start_run(cfg, "dpo", cpu_max_steps=CPU_MAX_STEPS, learning_rates=LEARNING_RATES, notes=notes)
    if cfg.sft_steps and 0 < cfg.max_steps <= cfg.sft_steps:
        raise ConfigError(f"config: sft_steps: {cfg.sft_steps} SFT steps leave none of max_steps {cfg.max_steps} for DPO; "
                          "expected fewer SFT steps than max_steps")
    if cfg.max_train_rows is None and cfg.max_steps > 0:  # a short run: one pass over a sample of the rows (train_rows_from)
        cfg.max_train_rows = cfg.max_steps * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size()
    started = time.time()

    from transformers import set_seed

    set_seed(cfg.seed)  # the LoRA initialisation, seeded as TRL seeds it for a model it loads itself
    model, tokenizer = load_model(cfg)
    train_pairs, eval_pairs = load_records(cfg, "prefs", tokenizer)
    prompts = load_prompts("ifprefs:eval", max_rows=cfg.summary_prompts) if cfg.summary_prompts else []
    start_logps: dict = {}  # the starting model's held-out log-probs, reused as the reference's after training
    before = policy_report(model, tokenizer, eval_pairs, prompts, cfg, adapter=False, start_logps=start_logps)

    train_dataset = shared_dataset(train_pairs, cfg.output_dir)  # one copy for all ranks: TRL caches ref log-probs beside it
    trainer = build_trainer(cfg, model, tokenizer, train_dataset, guard_callbacks(cfg.output_dir))
    result = train(trainer, cfg)
    train_time = time.time() - started
    save_adapter(trainer.model, tokenizer, f"{cfg.output_dir}/adapter")

    if cfg.return_freed_memory:  # training's 1 MiB mmap threshold costs inference page faults (heap_for_inference)
        logger.info(f"dpo: {heap_for_inference()}")
    after = policy_report(trainer.model, tokenizer, eval_pairs, prompts, cfg, adapter=True, start_logps=start_logps)
    if is_main_process():
        write_summary(cfg.output_dir, {
            "method": "dpo",
            "steps": trainer.state.global_step,
            "sft_steps": cfg.sft_steps,
            "train_loss": result.training_loss,
            "train_rows": len(train_pairs),
            "held_out_rows": len(eval_pairs),
            "before": before,
            "after": after,
            "tokens_processed": trainer.state.num_input_tokens_seen,
            "train_tokens_per_s": round(trainer.state.num_input_tokens_seen / max(train_time, 1e-9), 1),
            "wall_time_s": round(time.time() - started, 1),
            "peak_memory_mb": round(peak_memory_mb(), 1),
        })
        logger.info(before_after(before, after))
        publish_run(cfg)  # the model cards (with the summary's numbers), then the upload when --push_to_hub asks


def build_trainer(cfg: DPOArgs, model, tokenizer, train_dataset, callbacks):
    """The DPO trainer of this recipe (`python bench/run.py --stage dpo` times this same function)."""
    from trl import DPOConfig

    notes = [cfg.freed_memory_note()] if cfg.return_freed_memory else []
    if notes:
        logger.info(f"dpo: {'; '.join(notes)}")

    # ReportPhasesMixin: callbacks hear the precomputed reference log-probs as a phase (align.trainers.phases)
    class Trainer(ReportPhasesMixin, FiniteLossMixin, LoraPlusMixin, CompressActivationsMixin, FastDPOTrainer):
        compress_activations = cfg.compress_activations
        loraplus_lr_ratio = cfg.loraplus_lr_ratio

    args = DPOConfig(
        **trainer_kwargs(cfg),
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        loss_weights=cfg.loss_weights,
        label_smoothing=cfg.label_smoothing,
        max_length=cfg.max_length,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        eval_strategy="no",
    )
    return Trainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer, callbacks=callbacks,
                   fast=cfg.fast_logprobs, share_prompt=cfg.share_prompt, chunk_size=cfg.logprob_chunk_size,
                   reference_free=cfg.reference_free, sft_steps=cfg.sft_steps or 0)


def policy_report(model, tokenizer, pairs, prompts, cfg: DPOArgs, adapter: bool, start_logps: dict) -> dict:
    """Held-out preference accuracy and verifier score of the policy (adapter=False: the starting model)."""
    from align.evaluation.policy_report import summarize_policy

    return summarize_policy(model, tokenizer, pairs, prompts, beta=cfg.beta, adapter=adapter,
                            max_new_tokens=cfg.summary_max_new_tokens, batch_size=16, start_logps=start_logps)


if __name__ == "__main__":
    main()
