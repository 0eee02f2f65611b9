"""What each arm of a stage benchmark trains: the recipe's own trainer (recipes/<stage>.py's build_trainer, with the
recipe's config and `align:field=value` overrides) or the stage's script from TRL's documentation."""

from __future__ import annotations

from typing import Any

from . import REPO


def load_recipe(stage: str):
    """recipes/<stage>.py as a module (its main() is not run)."""
    import importlib.util

    path = REPO / "recipes" / f"{stage}.py"
    spec = importlib.util.spec_from_file_location(f"align_recipe_{stage}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_config(stage: str, module, spec: dict, out_dir: str, overrides: dict[str, str]):
    from align.config import build_config

    cls = {"dpo": "DPOArgs", "sft": "SFTArgs", "reward": "RewardArgs", "grpo": "GRPOArgs"}[stage]
    values: dict[str, Any] = dict(
        model_name_or_path=spec["model_path"], output_dir=out_dir, seed=spec["seed"], max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"], max_length=spec["max_length"], lora_r=spec["lora_r"],
        lora_alpha=2 * spec["lora_r"], dtype=spec["dtype"], quantization="none", report_to="none",
        logging_steps=1, save_steps=spec["steps"] + 1000, eval_data=None,
    )
    if stage == "dpo" and spec["threads"]:
        values["cpu_threads"] = spec["threads"]  # --threads holds for every arm; the recipe would choose its own
    if stage == "grpo":  # --batch_size counts prompts; the recipe's batch counts replies
        import dataclasses

        generations = overrides.get("num_generations", {f.name: f.default for f in dataclasses.fields(module.GRPOArgs)}["num_generations"])
        values["per_device_train_batch_size"] = spec["batch_size"] * int(generations)
    values.update(overrides)
    cfg = build_config(getattr(module, cls), values, where=f"align arm overrides ({stage})")
    from align.trainers.common import apply_hardware_defaults

    # the recipe's hardware defaults (learning rate, gradient checkpointing), as its start_run fills them
    apply_hardware_defaults(cfg, spec["steps"], getattr(module, "LEARNING_RATES", None))
    return cfg


def _baseline_args(spec: dict, out_dir: str, cfg) -> dict:
    """The fields every baseline sets in its TRL config (the learning rate and its schedule as the recipe's config
    `cfg` has them); the rest are the TRL config's defaults."""
    import torch

    args = dict(output_dir=out_dir, seed=spec["seed"], max_steps=spec["steps"], learning_rate=cfg.learning_rate,
                lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_steps, logging_steps=1,
                save_strategy="no", report_to=[], model_init_kwargs={"dtype": spec["dtype_name_torch"]})
    if not torch.cuda.is_available():
        args.update(use_cpu=True, bf16=spec["dtype"] == "bf16")  # TRL's bf16 default would be emulated here
    return args


def _baseline_lora(spec: dict) -> dict:
    return dict(r=spec["lora_r"], lora_alpha=2 * spec["lora_r"], lora_dropout=0.05, target_modules="all-linear")


def baseline_trainer(stage: str, spec: dict, dataset, tokenizer, out_dir: str, cfg):
    """The stage's TRL documentation script: the model by name, a LoraConfig, the config's defaults, with the
    recipe's (`cfg`) learning rate, schedule and, for DPO, loss: both arms train the same objective."""
    from peft import LoraConfig

    common = dict(_baseline_args(spec, out_dir, cfg), per_device_train_batch_size=spec["batch_size"],
                  max_length=spec["max_length"])
    lora = _baseline_lora(spec)
    if stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        objective = dict(loss_type=cfg.loss_type, loss_weights=cfg.loss_weights, beta=cfg.beta)
        return DPOTrainer(model=spec["model_path"], args=DPOConfig(**common, **objective), train_dataset=dataset,
                          processing_class=tokenizer, peft_config=LoraConfig(task_type="CAUSAL_LM", **lora))
    if stage == "sft":  # assistant_only_loss, as the recipe trains: both arms' losses are over the same tokens
        from trl import SFTConfig, SFTTrainer

        return SFTTrainer(model=spec["model_path"], args=SFTConfig(**common, assistant_only_loss=True), train_dataset=dataset,
                          processing_class=tokenizer, peft_config=LoraConfig(task_type="CAUSAL_LM", **lora))
    from trl import RewardConfig, RewardTrainer

    return RewardTrainer(model=spec["model_path"], args=RewardConfig(**common), train_dataset=dataset,
                         processing_class=tokenizer, peft_config=LoraConfig(task_type="SEQ_CLS", **lora))


def align_trainer(stage: str, cfg, module, model, tokenizer, dataset, callbacks):
    """The recipe's own trainer: recipes/<stage>.py's build_trainer."""
    if stage == "sft":
        return module.build_trainer(cfg, model, tokenizer, dataset, None, callbacks)
    return module.build_trainer(cfg, model, tokenizer, dataset, callbacks)


def grpo_baseline_trainer(spec: dict, cfg, dataset, tokenizer, reward_funcs, out_dir: str):
    """TRL's documented GRPO script with GRPOConfig's defaults, sharing with the align arms what stage.py's
    docstring lists (`cfg` is the recipe's config with its defaults: replies per prompt, longest reply, learning rate)."""
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from align.trainers.phases import ReportGenerationMixin

    class TRLGRPOTrainer(ReportGenerationMixin, GRPOTrainer):
        """TRL's GRPOTrainer, unchanged but for the phase events the bench listens to (align.trainers.phases)."""

    args = GRPOConfig(**_baseline_args(spec, out_dir, cfg), per_device_train_batch_size=cfg.per_device_train_batch_size,
                      num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length)
    return TRLGRPOTrainer(model=spec["model_path"], reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                       processing_class=tokenizer, peft_config=LoraConfig(task_type="CAUSAL_LM", **_baseline_lora(spec)))


def trained_model(trainer) -> tuple[Any, bool, float | None]:
    """The trainer's base model (adapters aside), whether it trains LoRA adapters, and the sum of |LoRA A| (call it
    before training: two arms with equal sums start from the same adapters)."""
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    base_model = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    lora_a = [p for n, p in sorted(unwrapped.named_parameters()) if "lora_A" in n and ".default." in n]
    checksum = float(sum(p.detach().double().abs().sum() for p in lora_a)) if lora_a else None
    return base_model, hasattr(unwrapped, "peft_config"), checksum

