"""One run of one arm, in a fresh child process (`bench/run.py --child SPEC RESULT`): load, init and train, timed
and measured phase by phase, then the run's record (the fields bench_<stage>.json holds per run)."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time

from align.errors import ConfigError

from .data import load_slice
from .flops import FLOPS_PER_TOKEN, matmul_params, stage_flops
from .meter import MemoryMeter, Phases
from .trainers import align_trainer, baseline_trainer, grpo_baseline_trainer, load_recipe, recipe_config, trained_model


def run_child(spec: dict) -> dict:
    """One run of one arm, in this (fresh) process; returns the result record."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    import datasets  # noqa: F401  (imported before the start RSS is taken, like everything else the arms use)
    import peft  # noqa: F401
    import transformers
    from trl import DPOTrainer, RewardTrainer, SFTTrainer  # noqa: F401

    import align.trainers.common  # noqa: F401
    from align.models.loading import resolve_model_path

    if spec["stage"] == "ppo":
        import align.rl.ppo.trainer  # noqa: F401
    if spec["stage"] == "grpo":
        from trl import GRPOTrainer, RLOOTrainer  # noqa: F401

    transformers.logging.set_verbosity_error()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meter = MemoryMeter(device)
    start_mb = meter.current_mb()
    phases = Phases(meter, device)
    out_dir = tempfile.mkdtemp(prefix=f"align-bench-{spec['stage']}-")
    spec = {**spec, "model_path": resolve_model_path(spec["model_name_or_path"], verbose=False),
            "dtype_name_torch": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[spec["dtype"]]}
    try:
        if spec["stage"] == "ppo" and spec["arm"].split(":")[0] == "align":
            run = ppo_run(spec, phases, meter, device, out_dir)
        elif spec["arm"].split(":")[0] == "trl-ppo":  # in bench/trl_ppo's venv (stage.run_arm)
            from bench.trl_ppo.arm import trl_ppo_run

            run = trl_ppo_run(spec, phases, meter, device, out_dir)
        elif spec["stage"] == "grpo":
            run = grpo_run(spec, phases, meter, device, out_dir)
        else:
            run = trainer_run(spec, phases, meter, device, out_dir)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    steps = run.pop("steps")
    timed = steps[spec["warmup_steps"]:]
    train_time = sum(s["train_time_s"] for s in timed)
    train_tokens = sum(s["tokens"] for s in timed)
    all_tokens = sum(s["tokens"] for s in steps)
    e2e_time = run.pop("extra_time_s") + sum(s["time_s"] for s in steps)
    e2e_flops = run.pop("extra_flops") + sum(s["flops"] for s in steps)
    phase_table = phases.table()
    over = start_mb if device == "cpu" else 0.0
    return {
        "stage": spec["stage"], "arm": spec["arm"], "run": spec["run"], "device": device, "dtype": spec["dtype"],
        "threads": torch.get_num_threads(), "model": spec["model_name_or_path"],
        "memory_method": meter.method, "start_mb": round(start_mb, 1), **run,
        "steps": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()} for s in steps],
        "phases": phase_table,
        "train_tokens_per_s": train_tokens / train_time,
        "end_to_end_tokens_per_s": all_tokens / e2e_time,
        "train_flops_per_s": sum(s["train_flops"] for s in timed) / train_time,
        "end_to_end_flops_per_s": e2e_flops / e2e_time,
        "step_time_s_median": statistics.median(s["time_s"] for s in timed),
        "peak_mb": round(max(p["peak_mb"] for p in phase_table.values()) - over, 1),
        "train_peak_mb": round(phase_table["train"]["peak_mb"] - over, 1),
        "losses": [s.get("loss") for s in steps],
        "tokens_total": all_tokens,
    }


def trainer_run(spec: dict, phases: Phases, meter: MemoryMeter, device: str, out_dir: str) -> dict:
    """A stage that is a TRL trainer (the DPO, SFT and reward recipes, and TRL's baselines)."""
    import transformers

    from align.data.load import to_hf_dataset
    from align.models.loading import load_model, load_tokenizer

    from .recorders import TrainerSteps

    name, *override_items = spec["arm"].split(":")
    overrides = dict(item.split("=", 1) for item in override_items)
    stage = "dpo" if spec["stage"] == "ppo" else spec["stage"]  # ppo's dpo-align arm: the DPO recipe
    name = "align" if name == "dpo-align" else name

    recorder = TrainerSteps(device, meter, phases)
    kind = "sft" if stage == "sft" else "prefs"
    with phases("load"):
        tokenizer = load_tokenizer(spec["model_path"])
        records, source = load_slice(kind, spec["data"], spec["steps"] * spec["batch_size"], tokenizer, spec["max_length"], spec["seed"])
        dataset = to_hf_dataset(records)
        if name == "align":
            module = load_recipe(stage)
            cfg = recipe_config(stage, module, spec, out_dir, overrides)
            transformers.set_seed(cfg.seed)
            model, tokenizer = load_model(cfg, task="reward" if stage == "reward" else "causal_lm")
        if stage == "sft" and (name != "align" or cfg.assistant_only_loss):
            from align.models.chat import training_chat_template

            # the recipe's marked template in both arms (TRL would swap in its own), so that the same tokens carry labels
            tokenizer.chat_template = training_chat_template(tokenizer)
    with phases("init"):
        if name == "align":
            from align.trainers.common import guard_callbacks

            trainer = align_trainer(stage, cfg, module, model, tokenizer, dataset, guard_callbacks(out_dir) + [recorder])
            trainer.args.save_strategy = "no"  # the recipe would also save at the end; no arm saves here
        else:
            recipe_cfg = recipe_config(stage, load_recipe(stage), spec, out_dir, {})  # learning rate, schedule, loss as align trains
            trainer = baseline_trainer(stage, spec, dataset, tokenizer, out_dir, recipe_cfg)
            trainer.add_callback(recorder)

    base_model, lora, lora_checksum = trained_model(trainer)
    n_params = matmul_params(base_model)
    with phases("train"):
        trainer.train()
    steps = recorder.steps
    unlogged = [s["step"] for s in steps if "tokens" not in s]
    if unlogged:
        raise RuntimeError(f"steps {unlogged}: the trainer logged no num_tokens (the bench logs every step: logging_steps 1)")
    if name == "align" and getattr(cfg, "precompute_ref_log_probs", False) and "precompute_ref" not in phases.result:
        raise RuntimeError("the DPO trainer precomputed reference log-probs without reporting the phase (align.trainers.phases)")

    precomputed = "precompute_ref" in phases.result
    ref_in_step = stage == "dpo" and not precomputed  # TRL's default: a reference forward every step
    for s in steps:
        s["tokens_per_s"] = s["tokens"] / s["time_s"]
        s["flops"] = s["train_flops"] = stage_flops(n_params, s["tokens"], s["tokens"] if ref_in_step else 0, lora)
        s["train_time_s"] = s["time_s"]
    all_tokens = sum(s["tokens"] for s in steps)
    return {
        "data": source, "n_params_matmul": n_params, "lora": lora,
        "lora_A_init_abs_sum": lora_checksum,
        "steps": steps,
        # precomputed reference log-probs: their time and FLOPs belong to the end-to-end figures
        "extra_time_s": phases.result.get("precompute_ref", {}).get("time_s", 0.0),
        "extra_flops": stage_flops(n_params, 0, all_tokens, lora) if precomputed else 0,
    }


def ppo_run(spec: dict, phases: Phases, meter: MemoryMeter, device: str, out_dir: str) -> dict:
    """The PPO engine (align.rl.ppo) with the PPO recipe's defaults and the verifier as the reward; every
    update's generate, score and update phases timed and measured through the trainer's phase events
    (`PPOSteps`; see stage.py's docstring)."""
    from align.evaluation.verifier import verifier_reward
    from align.rl.ppo.models import build_models
    from align.rl.ppo.trainer import PPOTrainer

    from .recorders import PPOSteps

    cfg = ppo_arm_config(spec, out_dir)
    if cfg.return_freed_memory:  # as recipes/ppo.py does (the DPO arm's build_trainer does the same)
        cfg.freed_memory_note()
    with phases("load"):
        models, plan = build_models(cfg)
        prompts = ppo_arm_prompts(cfg, models.tokenizer, spec["steps"])
    n_params = matmul_params(models.model.get_base_model())
    n_head = models.lm_head.weight.numel()
    recorder = PPOSteps(meter, device, n_params, n_head, cfg.ppo_epochs, shared_critic=cfg.critic == "shared")
    with phases("init"):
        trainer = PPOTrainer(cfg, models, prompts, verifier_reward, verifier_fn=verifier_reward,
                             reward_is_verifier=True, reward_description="verifier", callbacks=[recorder])
    recorder.start = time.perf_counter()
    with phases("train"):
        trainer.train()
    return {"data": cfg.prompts, "n_params_matmul": n_params, "n_params_lm_head": n_head, "lora": True, "lora_A_init_abs_sum": None,
            "steps": recorder.steps, "extra_time_s": 0.0, "extra_flops": 0, "ppo_config": ppo_config_summary(cfg)}


def ppo_arm_config(spec: dict, out_dir: str):
    """The PPO recipe's PPOArgs as every PPO arm runs it: its defaults, the verifier reward, the bench's model, seed,
    dtype, LoRA and steps, then the arm's overrides (align:field=value)."""
    from align.config import build_config
    from align.rl.ppo.config import PPOArgs

    overrides = dict(item.split("=", 1) for item in spec["arm"].split(":")[1:])
    values = dict(model_name_or_path=spec["model_path"], sft_dir=None, reward="verifier", total_updates=spec["steps"],
                  output_dir=out_dir, report_to="none", seed=spec["seed"], dtype=spec["dtype"], quantization="none",
                  lora_r=spec["lora_r"], lora_alpha=2 * spec["lora_r"], eval_prompts=None, num_eval_prompts=0,
                  save_steps=spec["steps"] + 1000)
    values.update(overrides)
    return build_config(PPOArgs, values, where="ppo arm overrides")


def ppo_arm_prompts(cfg, tokenizer, steps: int) -> list:
    """The prompts every PPO arm rolls out: cfg.prompts that fit max_prompt_length and carry constraints (the
    verifier's), steps x rollout_batch_size of them."""
    from align.data.load import check_lengths, load_prompts

    prompts = check_lengths(load_prompts(cfg.prompts, max_rows=steps * cfg.rollout_batch_size * 4),
                            tokenizer, cfg.max_prompt_length, on_too_long="skip")
    return [p for p in prompts if p.constraints][: steps * cfg.rollout_batch_size]


def ppo_config_summary(cfg) -> dict:
    return {k: getattr(cfg, k) for k in ("rollout_batch_size", "response_length", "ppo_epochs", "minibatch_size",
                                         "micro_batch_size", "forward_batch_size", "gradient_checkpointing", "critic", "vf_coef")}


def grpo_run(spec: dict, phases: Phases, meter: MemoryMeter, device: str, out_dir: str) -> dict:
    """GRPO through TRL: the grpo recipe's build_trainer (align arms) or TRL's documented script (trl-baseline), the
    recipe's reward functions in both; every step's generate, score and update timed and measured from the events
    the trainer reports (align.trainers.phases.ReportGenerationMixin; see stage.py's docstring)."""
    import transformers

    from align.data.load import check_lengths, load_prompts
    from align.models.loading import load_model, load_tokenizer
    from align.trainers.common import guard_callbacks
    from align.trainers.grpo import check_constraints_present, parse_rewards, prompt_dataset

    from .recorders import GRPOSteps

    name, *override_items = spec["arm"].split(":")
    module = load_recipe("grpo")
    cfg = recipe_config("grpo", module, spec, out_dir, dict(item.split("=", 1) for item in override_items))
    with phases("load"):
        tokenizer = load_tokenizer(spec["model_path"])
        source = cfg.train_data if spec["data"] == "auto" else spec["data"]
        rows = spec["steps"] * spec["batch_size"]
        rewards = parse_rewards(cfg.reward)
        records = load_prompts(source, max_rows=rows * 4)
        if any(r.kind == "verifier" for r in rewards):
            check_constraints_present(records, source)
        records = check_lengths(records, tokenizer, cfg.max_length - cfg.max_completion_length, on_too_long="skip")[:rows]
        if len(records) < rows:
            raise ConfigError(f"data {source}: {len(records)} prompts of at most {cfg.max_length - cfg.max_completion_length} "
                              f"tokens in the first {rows * 4} rows; the run needs {rows}")
        dataset = prompt_dataset(records)
        reward_funcs = module.build_reward_funcs(cfg, rewards, records)
        transformers.set_seed(cfg.seed)  # TRL adds the LoRA before Trainer.__init__ seeds: seed both arms here
        if name == "align":
            model, tokenizer = load_model(cfg, lora=False)

    recorder = GRPOSteps(device, meter)
    with phases("init"):
        if name == "align":
            trainer = module.build_trainer(cfg, model, tokenizer, dataset, reward_funcs, guard_callbacks(out_dir) + [recorder])
            trainer.args.save_strategy = "no"  # the recipe would also save at the end; no arm saves here
        else:
            trainer = grpo_baseline_trainer(spec, cfg, dataset, tokenizer, reward_funcs, out_dir)
            trainer.add_callback(recorder)
    base_model, lora, lora_checksum = trained_model(trainer)
    n_params, n_head = matmul_params(base_model), base_model.get_output_embeddings().weight.numel()
    recorder.n_params, recorder.n_head, recorder.trained_per_token = n_params, n_head, FLOPS_PER_TOKEN["lora" if lora else "full"]
    with phases("train"):
        trainer.train()
    steps = recorder.steps
    if not any(s["new_tokens"] for s in steps):
        raise RuntimeError("the GRPO trainer reported no generation (align.trainers.phases.ReportGenerationMixin)")
    config_keys = ("per_device_train_batch_size", "num_generations", "max_completion_length", "temperature", "beta",
                   "loss_type", "learning_rate", "gradient_checkpointing")
    return {"data": source, "n_params_matmul": n_params, "n_params_lm_head": n_head, "lora": lora, "lora_A_init_abs_sum": lora_checksum,
            "steps": steps, "extra_time_s": 0.0, "extra_flops": 0,
            "grpo_config": {"algorithm": cfg.algorithm if name == "align" else "grpo",
                            **{k: getattr(trainer.args, k, None) for k in config_keys}}}
