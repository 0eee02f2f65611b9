"""What every recipe that wraps a TRL trainer shares: run arguments, hardware defaults, metrics files,
checkpoints that a kill cannot corrupt, signal handling, non-finite guards and the run summary.

Checkpoints: the HF Trainer writes `checkpoint-N/` in place, so a kill mid-save can leave a partial one.
`CompletionMarker` writes `checkpoint-N/align_complete.json` (atomically) only after the save returned;
`last_complete_checkpoint` trusts only marked checkpoints and removes unmarked ones before resuming.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import TrainerCallback

from align.config import arg
from align.errors import AlignError
from align.io import append_jsonl, atomic_write_json, atomic_write_text
from align.log import MAIN_ONLY, LogArgs, get_logger
from align.publish.hub import PublishArgs, check_push_target

MARKER = "align_complete.json"
logger = get_logger(__name__)


class NonFiniteError(AlignError):
    """A NaN or infinite loss, gradient or reward: the run stops; the last good checkpoint is kept."""


@dataclass
class RunArgs(PublishArgs, LogArgs):
    output_dir: str = arg("outputs/run", "where the adapter, checkpoints, metrics and summary go")
    seed: int = arg(42, "random seed (data order, dropout, sampling)")
    learning_rate: float = arg(1e-4, "peak learning rate")
    lr_scheduler_type: str = arg("linear", "learning-rate schedule (any transformers scheduler name)")
    warmup_steps: float = arg(0.0, "learning-rate warmup: a number of steps, or a fraction of all steps when < 1")
    num_train_epochs: float = arg(1.0, "epochs over the training data (when max_steps is -1)")
    max_steps: int | None = arg(None, "optimizer steps; None = hardware default (CPU: a short run, GPU: -1 = full epochs)")
    per_device_train_batch_size: int = arg(4, "micro-batch per process")
    gradient_accumulation_steps: int = arg(1, "micro-batches per optimizer step")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    max_length: int = arg(512, "maximum tokens per sequence (longer rows are counted and reported, see on_too_long)")
    on_too_long: str = arg("error", "rows over max_length: error | skip (counted and reported) | keep (truncated)")
    logging_steps: int = arg(1, "log every N optimizer steps")
    save_steps: int = arg(20, "checkpoint every N optimizer steps")
    save_total_limit: int = arg(2, "checkpoints kept (older ones are deleted)")
    max_train_minutes: float | None = arg(None, "stop training after the first step that ends this many minutes into it (this "
                                                "invocation's training, not loading or summaries), with a checkpoint; then "
                                                "finish as usual; none = no limit (pair with a constant lr_scheduler_type)")
    eval_rows: int = arg(64, "held-out rows used for evaluation at the end of training")
    report_to: str = arg("tensorboard", "trackers: tensorboard, wandb, trackio, none (comma-separated)")
    resume: bool = arg(False, "continue from the last complete checkpoint in output_dir (the training settings must match it)")
    overwrite: bool = arg(False, "output_dir holds an earlier run: move it aside to <output_dir>.old-<time> and start over")
    min_free_gb: float = arg(1.0, "refuse to start with less free disk than this in output_dir")
    cpu_threads: int = arg(0, "torch threads on a CPU; 0 = auto: the cores idle when the run starts, at least 1; -1 = leave torch's setting")
    compress_activations: bool = arg(True, "keep float32 activations saved for backward in bf16: about half their memory, gradients "
                                           "within bf16 rounding, forward unchanged (align.models.activations); no effect on bf16 compute")
    loraplus_lr_ratio: float | None = arg(None, "LoRA+ (Hayou et al. 2024): the LoRA B matrices (and DoRA's magnitudes) learn at "
                                                "learning_rate x this ratio, A at learning_rate; none = plain LoRA; lora and dora only")


def on_gpu() -> bool:
    return torch.cuda.is_available()


def default_gradient_checkpointing() -> bool:
    """On a GPU, memory is what runs out: recompute activations. On a CPU, RAM is plentiful and compute is what is
    short: the default DPO step ran 1.5x faster without checkpointing (`python bench/run.py`, see README)."""
    return on_gpu()


def hardware_learning_rate(learning_rates: tuple[float, float]) -> float:
    """The (CPU short run, GPU) learning rate of a recipe for this machine."""
    return learning_rates[1] if on_gpu() else learning_rates[0]


def apply_hardware_defaults(cfg: Any, cpu_max_steps: int, learning_rates: tuple[float, float] | None = None) -> list[str]:
    """Fill `auto` fields by hardware and return lines that say what was chosen (printed at start).
    learning_rates: (CPU short run, GPU) for a recipe whose learning_rate none means "by hardware"."""
    notes = []
    if learning_rates is not None and getattr(cfg, "learning_rate", 0) is None:
        cfg.learning_rate = hardware_learning_rate(learning_rates)
        notes.append(f"learning_rate={cfg.learning_rate:g} ({'GPU: a full run' if on_gpu() else 'CPU: the short run'})")
    if getattr(cfg, "quantization", None) == "auto":
        cfg.quantization = "4bit" if on_gpu() else "none"
        notes.append(f"quantization={cfg.quantization} ({'CUDA GPU: 4-bit QLoRA' if on_gpu() else 'CPU: full-precision base'})")
    if getattr(cfg, "gradient_checkpointing", False) is None:
        cfg.gradient_checkpointing = default_gradient_checkpointing()
        notes.append(f"gradient_checkpointing={cfg.gradient_checkpointing} "
                     f"({'GPU: memory first' if on_gpu() else 'CPU: RAM is plentiful, 1.5x faster without'})")
    if cfg.max_steps is None:
        cfg.max_steps = -1 if on_gpu() else cpu_max_steps
        notes.append(
            f"max_steps={cfg.max_steps} ({'GPU: full epochs' if on_gpu() else f'CPU: a short run of {cpu_max_steps} steps'})"
        )
    from align.models.loading import compute_note

    notes.append(compute_note(getattr(cfg, "dtype", "auto"), getattr(cfg, "quantization", "none")))
    return notes


def trainer_kwargs(cfg: Any) -> dict[str, Any]:
    """The TrainingArguments fields every recipe sets the same way."""
    from align.models.loading import resolve_dtype

    dtype = resolve_dtype(getattr(cfg, "dtype", "auto"))
    report_to = [] if cfg.report_to == "none" else [r.strip() for r in cfg.report_to.split(",") if r.strip()]
    if "tensorboard" in report_to:  # the TensorBoard callback reads its directory from the environment
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(cfg.output_dir) / "tensorboard")  # this run's, not an inherited one
    return dict(
        output_dir=cfg.output_dir,
        seed=cfg.seed,
        data_seed=cfg.seed,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        save_only_model=False,
        report_to=report_to,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not on_gpu(),
        dataloader_num_workers=0,
        gradient_checkpointing=bool(getattr(cfg, "gradient_checkpointing", False)),
        gradient_checkpointing_kwargs={"use_reentrant": False},
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
        ddp_find_unused_parameters=False,
    )


# ------------------------------------------------------------------------------------------ callbacks


class MetricsFile(TrainerCallback):
    """Every log record as one JSON line in output_dir/metrics.jsonl (main process only).

    One record per step across kills and --resume: when training starts, records past the step it starts from
    are dropped (a killed run's steps after its checkpoint, which the resumed run redoes; on a fresh start, an
    earlier run's records). `train/train_loss` is the whole run's mean (see `run_train_loss`).
    """

    def __init__(self, output_dir: str):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.start = time.time()
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = state.global_step
        if not state.is_world_process_zero or not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if _kept_on_restart(line, state.global_step)]
        if len(kept) < len(lines):
            atomic_write_text(self.path, "".join(kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "time_s": round(time.time() - self.start, 3)}
        # namespaced keys: "loss" -> "train/loss"; TRL's own "rewards/margins" etc. stay as they are
        record.update({(k if "/" in k else f"train/{k}"): v for k, v in logs.items() if isinstance(v, (int, float))})
        if isinstance(logs.get("train_loss"), float):
            record["train/train_loss"] = run_train_loss(state.log_history, logs["train_loss"], self.first_step, state.global_step)
        record["tokens_seen"] = state.num_input_tokens_seen
        append_jsonl(self.path, record)


def _kept_on_restart(line: str, step: int) -> bool:
    """Whether a metrics line stays when training (re)starts at `step`: a whole line, logged at or before that
    step, and not the end-of-call summary (with train_loss) of an earlier, interrupted call."""
    try:
        record = json.loads(line)
    except ValueError:  # cut short by a kill
        return False
    return line.endswith("\n") and record.get("step", math.inf) <= step and "train/train_loss" not in record


def run_train_loss(log_history: list[dict], call_loss: float, first_step: int, global_step: int) -> float:
    """Mean training loss over the whole run, from HF's `train_loss` of the last train() call.

    HF averages only the steps that call ran (first_step+1 .. global_step), so after --resume its number would
    differ from the same run uninterrupted; the losses logged before first_step (restored with the checkpoint's
    log history) are added back. Steps never logged (between the last log and a checkpoint) cannot be counted.
    """
    if first_step == 0:
        return call_loss
    earlier, logged = 0.0, 0
    for entry in log_history:
        if "loss" in entry and entry["step"] <= first_step:
            earlier += entry["loss"] * (entry["step"] - logged)
            logged = entry["step"]
    steps_now = global_step - first_step
    return (earlier + call_loss * steps_now) / max(logged + steps_now, 1)


class NonFiniteGuard(TrainerCallback):
    """Stop on a NaN/inf loss or gradient, before the optimizer applies it and before any save."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:  # FiniteLossMixin checks before clipping; this covers max_grad_norm 0 and other trainers
            check_gradients(model, state.global_step + 1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm", "eval_loss"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                raise NonFiniteError(f"step {state.global_step}: {key} is {value}; the last good checkpoint is kept")


class CompletionMarker(TrainerCallback):
    """Mark a checkpoint complete once the Trainer's save has returned (see module docstring)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                atomic_write_json(ckpt / MARKER, {"step": state.global_step, "time": time.time()})


class StopOnSignal(TrainerCallback):
    """SIGTERM or Ctrl-C: finish the current step, save a checkpoint, then exit cleanly.

    With several processes the signal can reach the ranks during different steps (or only one of them): after
    every step the ranks agree (an all-reduce of one flag), so all of them save the same step and stop
    together instead of one stopping while the others wait in the next gradient all-reduce.
    """

    def __init__(self):
        self.received: int | None = None
        self.stopping = False  # this or another rank received a signal
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signum
        logger.warning(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then exiting")

    def on_step_end(self, args, state, control, **kwargs):
        self.stopping = any_rank(self.received is not None, args.device)
        if self.stopping:
            control.should_save = True
            control.should_training_stop = True


def any_rank(flag: bool, device: Any) -> bool:
    """`flag` of this process OR'ed over all processes (an all-reduce; every rank must call it at the same step)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        value = torch.tensor([float(flag)], device=device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())
    return flag


class TimeBudget(TrainerCallback):
    """--max_train_minutes: the first step that ends past the budget (counted from the start of training in this
    invocation) is saved and is the last; the recipe then finishes as after its last step (adapter, summary).
    The processes of a launch agree (any_rank), so all of them stop after the same step."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.started = time.monotonic()
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if not any_rank(time.monotonic() - self.started >= self.seconds, args.device):
            return
        control.should_save = True
        control.should_training_stop = True
        if self.stopped_at is None:
            logger.info(f"--max_train_minutes {self.seconds / 60:g}: stopping after step {state.global_step} "
                     f"({time.monotonic() - self.started:.0f} s of training), checkpoint saved")
        self.stopped_at = state.global_step


def guard_callbacks(output_dir: str) -> list[TrainerCallback]:
    return [MetricsFile(output_dir), NonFiniteGuard(), CompletionMarker(), StopOnSignal()]


def check_loss(loss: torch.Tensor, step: int) -> None:
    """Raise NonFiniteError when the training loss of optimizer step `step` is NaN or infinite (before backward)."""
    if not torch.isfinite(loss).all():
        raise NonFiniteError(
            f"step {step}: the training loss is {loss.detach().float().item()}; "
            "stopped before backward; the last good checkpoint is kept"
        )


def check_gradients(model: Any, step: int) -> None:
    """Raise NonFiniteError naming the first parameter whose gradient holds a NaN or inf."""
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise NonFiniteError(
                f"step {step}: gradient of {name} is not finite (NaN or inf); "
                "stopped before the optimizer step; the last good checkpoint is kept"
            )


class FiniteLossMixin:
    """Mixed into a TRL trainer: a non-finite loss stops the run at the step it appears (before backward), a
    non-finite gradient after backward and before clipping (see `_clip_grad_norm`)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        check_loss(out[0] if return_outputs else out, self.state.global_step + 1)
        return out

    def _save_checkpoint(self, model, trial):
        # A full disk or an I/O error mid-save: one line naming the checkpoint, not a traceback. The partial
        # checkpoint has no MARKER (it is removed on --resume), and HF's rotation runs only after a save that
        # returned, so the previous complete checkpoint is still there. torch.save reports a failed write as a
        # RuntimeError, safetensors as a SafetensorError; other exceptions are bugs and keep their traceback.
        try:
            return super()._save_checkpoint(model, trial)
        except Exception as err:
            if not isinstance(err, (OSError, RuntimeError)) and type(err).__name__ != "SafetensorError":
                raise
            from align.runs import checkpoint_write_error

            target = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            raise checkpoint_write_error(target, err, last_marked_checkpoint(self.args.output_dir)) from err

    def _clip_grad_norm(self, model):
        # Before clipping: with one NaN gradient the total norm is NaN and clipping scales every gradient by it,
        # so afterwards the first tensor in the model would be named instead of the one that went bad. Under
        # DDP the gradients are all-reduced by now, so every rank stops here together.
        check_gradients(self.model, self.state.global_step + 1)
        return super()._clip_grad_norm(model)



# ------------------------------------------------------------------------------------------ LoRA+


def check_loraplus(cfg: Any) -> None:
    """--loraplus_lr_ratio needs B matrices to speed up: a positive ratio, and a LoRA or DoRA adapter."""
    ratio = getattr(cfg, "loraplus_lr_ratio", None)
    if ratio is None:
        return
    from align.errors import ConfigError

    if not ratio > 0:
        raise ConfigError(f"config: loraplus_lr_ratio: expected a ratio > 0 (LoRA+ uses about 16), or none, got {ratio}")
    if not getattr(cfg, "use_lora", True) or getattr(cfg, "peft", "lora") not in ("lora", "dora"):
        method = getattr(cfg, "peft", "lora") if getattr(cfg, "use_lora", True) else "none (use_lora false)"
        raise ConfigError(f"config: loraplus_lr_ratio: applies to a LoRA or DoRA adapter (its B matrices), but peft is {method}")


def is_loraplus_b(name: str, param: torch.Tensor) -> bool:
    """The parameters LoRA+ gives the larger learning rate, as peft's create_loraplus_optimizer picks them: the B
    matrices (`lora_B`, `lora_embedding_B`) and every 1-D trainable tensor (DoRA's magnitude vector)."""
    return "lora_B" in name or "lora_embedding_B" in name or param.ndim == 1


def split_loraplus_groups(param_groups: list[dict], names: dict[int, str], ratio: float) -> tuple[list[dict], int]:
    """(groups, B tensors): each optimizer param group split in two, its A part (and every other parameter) at the
    group's lr and its B part (`is_loraplus_b`) at lr x ratio; the groups' other settings (weight decay, betas) kept.
    `names` maps id(param) to its name in the model. Groups left empty are dropped."""
    groups, n_b = [], 0
    for group in param_groups:
        parts: dict[bool, list] = {False: [], True: []}
        for p in group["params"]:
            parts[is_loraplus_b(names.get(id(p), ""), p)].append(p)
        settings = {k: v for k, v in group.items() if k != "params"}
        if parts[False]:
            groups.append({**settings, "params": parts[False]})
        if parts[True]:
            groups.append({**settings, "params": parts[True], "lr": settings["lr"] * ratio})
        n_b += len(parts[True])
    return groups, n_b


class LoraPlusMixin:
    """Mixed into a transformers Trainer: with `loraplus_lr_ratio` set, the optimizer the Trainer builds (its class,
    betas, weight-decay groups) has each group's LoRA B part at lr x ratio. The learning-rate schedule scales every
    group by the same factor, so B stays at ratio x A throughout; the lr logged is A's. An optimizer that already
    exists (built by an earlier call, or given to the Trainer) is returned as it is."""

    loraplus_lr_ratio: float | None = None

    def create_optimizer(self, model=None):
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        optimizer = super().create_optimizer(model)
        opt_model = self.model if model is None else model
        names = {id(p): n for n, p in opt_model.named_parameters()}
        groups, n_b = split_loraplus_groups(optimizer.param_groups, names, self.loraplus_lr_ratio)
        if not n_b:
            from align.errors import ConfigError

            raise ConfigError("config: loraplus_lr_ratio: the model has no trainable LoRA B matrix to speed up")
        optimizer.param_groups = []  # the same optimizer object (and state, empty at this point), regrouped
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer


# ------------------------------------------------------------------------------------------ resume


def _numbered_checkpoints(output_dir: str | Path) -> list[Path]:
    """output_dir's checkpoint-N folders, oldest first (reads only)."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def last_marked_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint-N with a completion marker (reads only)."""
    marked = [p for p in _numbered_checkpoints(output_dir) if (p / MARKER).is_file()]
    return marked[-1] if marked else None


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest checkpoint-N with a completion marker; unmarked (partial) ones are removed."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    for ckpt in _numbered_checkpoints(root):
        if not (ckpt / MARKER).is_file():
            logger.info(f"removing incomplete checkpoint {ckpt} (no {MARKER})")
            shutil.rmtree(ckpt, ignore_errors=True)
    best = last_marked_checkpoint(root)
    return str(best) if best else None


def resume_checkpoint(cfg: Any) -> str | None:
    """What to pass as resume_from_checkpoint, and an error when --resume has nothing to resume.

    Without --resume the output_dir holds no earlier checkpoint: start_run refused it, or --overwrite moved it
    aside (align.runs)."""
    if not cfg.resume:
        return None
    ckpt = last_complete_checkpoint(cfg.output_dir)
    if ckpt is None:
        logger.warning(f"--resume: no complete checkpoint in {cfg.output_dir}; starting from scratch", extra=MAIN_ONLY)
    else:
        logger.info(f"resuming from {ckpt}")
    return ckpt


# ------------------------------------------------------------------------------------------ summary


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA max allocated on a GPU, else peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_summary(output_dir: str | Path, summary: dict[str, Any]) -> None:
    atomic_write_json(Path(output_dir) / "summary.json", summary)
    print(json.dumps(summary, indent=2, default=str))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """Processes in this run (set by accelerate launch / torchrun; 1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# ------------------------------------------------------------------------------------------ recipe steps


def set_cpu_threads(requested: int) -> str:
    """Set torch's intra-op threads on a CPU (process-wide) and say what was chosen and why.

    `accelerate launch` starts a single CPU process with OMP_NUM_THREADS=1 (its default
    num_cpu_threads_per_process), so without this a launched recipe trains on one core of many. And torch's
    own default, one thread per core, is slow when other processes already keep the cores busy: the
    threads wait at every parallel region's barrier for a sibling that is not scheduled (on 2 cores with a
    load of 8, a 5464x32 @ 32x64 matmul took 7-40 ms with 2 threads and 0.8-1.8 ms with 1). `auto` gives
    torch the cores that are idle now (system CPU use over half a second), shared among this machine's
    training processes (LOCAL_WORLD_SIZE).
    """
    if torch.cuda.is_available() or requested < 0:
        return f"threads={torch.get_num_threads()} (torch's setting)"
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > 0:
        torch.set_num_threads(requested)
        return f"threads={requested} (cpu_threads)"
    import psutil

    busy = cores * psutil.cpu_percent(interval=0.5) / 100  # this process is idle meanwhile
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # several training processes share the cores
    threads = max(1, min(cores // processes, int((cores - busy) / processes + 0.5)))
    torch.set_num_threads(threads)
    return f"threads={threads} (cpu_threads auto: {cores} cores, {busy:.1f} busy, {processes} process(es))"


def start_run(cfg: Any, stage: str, cpu_max_steps: int, learning_rates: tuple[float, float] | None = None,
              notes: Sequence[str] = ()) -> list[str]:
    """--push_to_hub's target checked; hardware defaults; the output dir claimed (align.runs: an earlier run refused
    or moved aside, --resume's settings checked, the folder locked, the disk checked now, not after an hour);
    resolved config saved. `notes`: the recipe's own defaults it chose, printed with the hardware defaults."""
    from align.io import write_run_info
    from align.runs import claim_output_dir

    check_push_target(cfg)  # an upload that could not happen fails now, not after training
    if cfg.save_total_limit < 2:
        # HF deletes the older checkpoint before the new one is marked complete: keep two so a kill in between
        # still leaves one that --resume trusts.
        from align.errors import ConfigError

        raise ConfigError(f"config: save_total_limit: expected at least 2, got {cfg.save_total_limit}")
    if hasattr(cfg, "check_freed_memory"):
        cfg.check_freed_memory()
    check_loraplus(cfg)
    if getattr(cfg, "max_train_minutes", None) is not None and not cfg.max_train_minutes > 0:
        from align.errors import ConfigError

        raise ConfigError(f"config: max_train_minutes: expected minutes > 0 (or none), got {cfg.max_train_minutes}")
    from transformers import set_seed

    set_seed(cfg.seed)  # before the model is built: LoRA initialisation follows --seed
    notes = apply_hardware_defaults(cfg, cpu_max_steps, learning_rates) + list(notes) + [set_cpu_threads(cfg.cpu_threads)]
    if is_main_process():
        claimed, extra = claim_output_dir(cfg, cfg.min_free_gb)
        for line in claimed:
            logger.info(line)
        logger.info(f"{stage}: " + "; ".join(notes))
        write_run_info(cfg, cfg.output_dir, {"stage": stage, "hardware_defaults": notes, **extra})
    if world_size() > 1:
        # The other processes of this launch touch output_dir only once the main one has claimed it (moved an
        # earlier run aside, say); when it refused, they wait here until the launcher stops them.
        from accelerate import PartialState

        PartialState(cpu=not on_gpu()).wait_for_everyone()
    return notes


def load_records(cfg: Any, kind: str, tokenizer: Any) -> tuple[list, list]:
    """Training and held-out records for `kind` ("prefs" or "sft"), length-checked against max_length."""
    from align.data.load import check_lengths, load_preferences, load_sft, load_train

    loader = load_preferences if kind == "prefs" else load_sft
    options = dict(format=cfg.data_format, on_bad_rows=cfg.on_bad_rows, extra_fields=cfg.extra_fields)
    if kind == "prefs":
        options["pairs"] = cfg.ranked_pairs
    train = load_train(loader, cfg, **options)
    held_out = loader(cfg.eval_data, max_rows=cfg.max_eval_rows or cfg.eval_rows, **options) if cfg.eval_data else []
    train = check_lengths(train, tokenizer, cfg.max_length, cfg.on_too_long)
    held_out = check_lengths(held_out, tokenizer, cfg.max_length, cfg.on_too_long)
    logger.info(f"data: {len(train)} training and {len(held_out)} held-out records")
    return train, held_out


def shared_dataset(records: list, output_dir: str | Path, name: str = "train") -> Any:
    """`to_hf_dataset(records)`, read by every process from the same files when there are several.

    TRL's DPOTrainer caches the precomputed reference log-probs next to the dataset's files: rank 0 writes the
    cache, the other ranks read it. An in-memory dataset has no files, so each process looks in a temporary
    directory of its own and rank 1 fails with FileNotFoundError (trl 1.16). So the main process writes the
    records to output_dir/datasets/<name> and every process loads them from there. One process: in memory.
    """
    from accelerate import PartialState

    from align.data.load import to_hf_dataset

    dataset = to_hf_dataset(records)
    state = PartialState(cpu=not on_gpu())  # without cpu=True, accelerate sees one process on a CPU-only machine
    if state.num_processes == 1:
        return dataset
    from datasets import load_from_disk

    from align.io import atomic_dir

    path = Path(output_dir) / "datasets" / name
    with state.main_process_first():
        if state.is_main_process:
            with atomic_dir(path) as tmp:
                dataset.save_to_disk(str(tmp))
    return load_from_disk(str(path))


def save_adapter(model: Any, tokenizer: Any, directory: str | Path) -> None:
    """Save the trained adapter (or full model) and tokenizer atomically (main process only)."""
    from align.io import atomic_dir

    if not is_main_process():
        return
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def train(trainer: Any, cfg: Any) -> Any:
    """trainer.train() with --resume from the last complete checkpoint; training_loss is the whole run's mean."""
    checkpoint = resume_checkpoint(cfg)
    if checkpoint:
        _restore_token_count(trainer, checkpoint)
    if getattr(cfg, "max_train_minutes", None) is not None:
        trainer.add_callback(TimeBudget(cfg.max_train_minutes))
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    except torch.OutOfMemoryError:
        raise AlignError(out_of_memory_advice(cfg)) from None
    if any(isinstance(cb, StopOnSignal) and cb.stopping for cb in trainer.callback_handler.callbacks):
        logger.warning("stopped by signal after saving a checkpoint; rerun with --resume to continue")
        sys.exit(128 + 15)
    first_step = int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0
    run_loss = run_train_loss(trainer.state.log_history, result.training_loss, first_step, trainer.state.global_step)
    return result._replace(training_loss=run_loss)


def _restore_token_count(trainer: Any, checkpoint: str) -> None:
    """TRL's SFT, reward and DPO trainers count the logged `num_tokens` in the trainer object, which a checkpoint
    does not hold (trl 1.16): after --resume it would restart from 0. Continue from the checkpoint's last log."""
    if not hasattr(trainer, "_total_train_tokens"):
        return
    history = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["log_history"]
    counts = [entry["num_tokens"] for entry in history if "num_tokens" in entry]
    if counts:
        trainer._total_train_tokens = int(counts[-1])


def out_of_memory_advice(cfg: Any) -> str:
    """What to change when a step does not fit in GPU memory (instead of a bare CUDA traceback)."""
    batch, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    tips = []
    if batch > 1:
        tips.append(f"--per_device_train_batch_size {max(1, batch // 2)} --gradient_accumulation_steps {accum * 2} "
                    "(same effective batch)")
    if getattr(cfg, "quantization", "none") in ("none", "8bit"):
        tips.append("--quantization 4bit (QLoRA)")
    if not getattr(cfg, "gradient_checkpointing", False):
        tips.append("--gradient_checkpointing true")
    tips.append(f"--max_length {max(64, cfg.max_length // 2)}")
    return (
        f"out of GPU memory at micro-batch {batch} x max_length {cfg.max_length}. Settings that use less: "
        + "; ".join(tips)
        + ". `python -m align.plan` estimates what fits before you start; the last complete checkpoint is kept (--resume)."
    )
