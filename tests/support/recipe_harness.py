"""Run the recipes as real, separate processes that a test can kill, cheaply.

`python recipes/dpo.py ...` spends ~15 CPU-seconds importing torch, transformers and TRL before it does
two seconds of work on a tiny model; on a shared 2-core CI box that is most of a test file's budget. So
`start_recipe` forks each run from a multiprocessing fork server that imported those packages once. The
child is its own process (own pid, signals, exit code, stdout/stderr going to a log file) and runs the
recipe file as `__main__` with `sys.argv` set, exactly as the interpreter would; only the imports were
done earlier. `run_cli` runs the real `python recipes/X.py` for the few checks about the entry point itself.

Shared fixtures: `tiny_data` (preference and SFT files), plus conftest's `tiny_model_dir` / `tiny_reward_dir`.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from repo_paths import REPO

RECIPES = {"sft": REPO / "recipes" / "sft.py", "reward": REPO / "recipes" / "reward.py", "dpo": REPO / "recipes" / "dpo.py",
           "grpo": REPO / "recipes" / "grpo.py", "ppo": REPO / "recipes" / "ppo.py"}
PRELOAD = ["torch", "transformers", "peft", "datasets", "trl", "align.trainers.common", "align.data.load", "align.models.loading", "recipe_harness"]
# Keys whose values depend on wall time or the machine's load; everything else a run logs must be reproducible.
TIMING_KEYS = {"time_s", "wall_time_s", "train/train_runtime", "train/train_samples_per_second", "train/train_steps_per_second",
               "train/train_tokens_per_second", "train/step_time"}
TIMING_PREFIXES = ("time/", "perf/")  # PPO's per-phase seconds, tokens per second, peak memory
RUN_TIMEOUT_S = 300  # a hung run fails its test instead of stalling CI

WORDS = "alpha beta gamma delta echo foxtrot golf hotel india juliet kilo lima".split()


# ------------------------------------------------------------------------------------------ data


def _phrase(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    """16 preference pairs, 16 one-turn chats and 8 prompts with verifier constraints, short enough that a step
    takes milliseconds."""
    root = tmp_path_factory.mktemp("tiny_data")
    prefs, sft, prompts = root / "prefs.jsonl", root / "sft.jsonl", root / "prompts.jsonl"
    with prefs.open("w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"Q{i}: {_phrase(i, 3)}?", "chosen": _phrase(i + 1, 3), "rejected": _phrase(i + 5, 2)}) + "\n")
    with sft.open("w") as f:
        for i in range(16):
            messages = [{"role": "user", "content": f"Q{i}: {_phrase(i, 3)}?"}, {"role": "assistant", "content": _phrase(i + 2, 4)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    with prompts.open("w") as f:  # lowercase: a random tiny model meets it about a quarter of the time, so rewards vary
        for i in range(8):
            f.write(json.dumps({"prompt": f"Q{i}: {_phrase(i, 3)}?", "constraints": [{"type": "lowercase"}]}) + "\n")
    return {"prefs": str(prefs), "sft": str(sft), "prompts": str(prompts)}


def recipe_args(recipe: str, model_dir: str, data: dict[str, str], output_dir: str | Path, **overrides) -> list[str]:
    """Command-line flags for a short tiny-model run of `recipe` (fp32, no trackers, no extra evaluation, one torch
    thread: cpu_threads auto would pick a count by the machine's load, and with it the float summation order)."""
    args = dict(
        model_name_or_path=model_dir, output_dir=str(output_dir), max_steps=4, save_steps=1, save_total_limit=2,
        per_device_train_batch_size=2, max_length=128, dtype="fp32", report_to="none", seed=7, cpu_threads=1,
        train_data=data["sft" if recipe == "sft" else "prompts" if recipe == "grpo" else "prefs"], eval_data="none",
    )
    if recipe == "grpo":  # 2 prompts x 2 replies of 8 tokens per step
        args.update(num_generations=2, per_device_train_batch_size=4, max_completion_length=8, summary_prompts=0)
    if recipe == "dpo":
        args["summary_prompts"] = 0
    if recipe == "sft":
        args["merge"] = "false"
        args["summary_prompts"] = 0
    args.update(overrides)
    out = []
    for key, value in args.items():
        out += [f"--{key}", str(value)]
    return out


# ------------------------------------------------------------------------------------------ running


def _kill_during_first_save() -> None:
    """SIGKILL this process inside the Trainer's first checkpoint save, after the adapter weights are written and
    before the optimizer, scheduler, RNG and trainer state are: the partial checkpoint a crash mid-save leaves."""
    from transformers import Trainer

    def die(self, output_dir):
        os.kill(os.getpid(), signal.SIGKILL)

    Trainer._save_optimizer_and_scheduler = die


def _disk_full_in_save_at_step(step: int) -> None:
    """Raise ENOSPC inside the Trainer's checkpoint save at optimizer step `step`, after the adapter weights are
    written and before the optimizer, scheduler, RNG and trainer state are: a disk that fills up mid-save. The
    error comes from the write path itself (the Trainer's own save method), not from the recipe."""
    import errno

    from transformers import Trainer

    original = Trainer._save_optimizer_and_scheduler

    def full(self, output_dir):
        if self.state.global_step == step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(output_dir) / "optimizer.pt"))
        return original(self, output_dir)

    Trainer._save_optimizer_and_scheduler = full


def _hold_until_signal_after_step(step: int) -> None:
    """At the end of optimizer step `step`, wait (up to 60 s) for a signal before StopOnSignal looks for one, so a
    signal the test sends lands at a known step whatever the machine's load. It is still a real signal, sent by
    another process and handled by the recipe's own handler."""
    from align.trainers.common import StopOnSignal

    original = StopOnSignal.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == step:
            print(f"[harness] holding after step {step} for a signal", file=sys.stderr, flush=True)
            deadline = time.time() + 60
            while self.received is None and time.time() < deadline:
                time.sleep(0.01)
        return original(self, args, state, control, **kwargs)

    StopOnSignal.on_step_end = on_step_end


def _nan_loss_at_step(step: int) -> None:
    """The training loss of optimizer step `step` becomes NaN just before the recipe's own check reads it (the
    trainers' FiniteLossMixin calls align.trainers.common.check_loss): what a model that has gone bad produces."""
    import align.trainers.common

    original = align.trainers.common.check_loss

    def check_loss(loss, at_step):
        return original(loss * float("nan") if at_step == step else loss, at_step)

    align.trainers.common.check_loss = check_loss


def _nan_grad_at_step(step: int) -> None:
    """At optimizer step `step` the LAST trainable tensor's gradient becomes NaN while the loss stays finite, just
    before the recipe's own gradient check (FiniteLossMixin._clip_grad_norm). The last one, so that naming the
    first tensor of the model would be caught."""
    from align.trainers.common import FiniteLossMixin

    original = FiniteLossMixin._clip_grad_norm

    def clip(self, model):
        if self.state.global_step + 1 == step:
            name, param = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad][-1]
            print(f"[harness] test fault: the gradient of {name} is NaN at step {step}", file=sys.stderr, flush=True)
            param.grad.mul_(float("nan"))
        return original(self, model)

    FiniteLossMixin._clip_grad_norm = clip


def _child(recipe_path: str, argv: list[str], env: dict[str, str], log_path: str, kill_in_save: bool,
           hold_after_step: int | None, disk_full_at_step: int | None = None, nan_loss_at_step: int | None = None,
           nan_grad_at_step: int | None = None) -> None:
    """Fork-server child: send stdout/stderr to the log, then run the recipe as the interpreter would."""
    import gc
    import runpy

    gc.freeze()  # the preloaded modules' objects: a full collection (accelerate runs several) skips them

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(env)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))  # the fork server read its env before ours
    os.chdir(REPO)
    if kill_in_save:
        _kill_during_first_save()
    if hold_after_step is not None:
        _hold_until_signal_after_step(hold_after_step)
    if disk_full_at_step is not None:
        _disk_full_in_save_at_step(disk_full_at_step)
    if nan_loss_at_step is not None:
        _nan_loss_at_step(nan_loss_at_step)
    if nan_grad_at_step is not None:
        _nan_grad_at_step(nan_grad_at_step)
    sys.argv = [recipe_path, *argv]
    try:
        runpy.run_path(recipe_path, run_name="__main__")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


@dataclass
class Run:
    """A recipe process: poll it, signal it, wait for it, read its log."""

    process: multiprocessing.process.BaseProcess
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join(10)
            pytest.fail(f"recipe run did not finish within {timeout} s (killed); log:\n{self.text()[-3000:]}")
        return self.process.exitcode

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = RUN_TIMEOUT_S) -> None:
        """Poll `condition` every 10 ms while the run is alive; fail if it exits or time runs out first."""
        deadline = time.time() + timeout
        while not condition():
            if not self.process.is_alive():
                pytest.fail(f"run exited ({self.process.exitcode}) before {what}; log:\n{self.text()[-3000:]}")
            if time.time() > deadline:
                self.process.kill()
                pytest.fail(f"no {what} within {timeout} s; log:\n{self.text()[-3000:]}")
            time.sleep(0.01)


def start_recipe(recipe: str, argv: list[str], log: str | Path, env: dict[str, str] | None = None,
                 kill_in_save: bool = False, hold_after_step: int | None = None, disk_full_at_step: int | None = None,
                 nan_loss_at_step: int | None = None, nan_grad_at_step: int | None = None) -> Run:
    """Start `recipes/<recipe>.py argv` as a forked process (see the module docstring).

    kill_in_save: the process SIGKILLs itself in the middle of its first checkpoint save.
    hold_after_step: the process waits at the end of that step until it receives a signal.
    disk_full_at_step: the checkpoint save at that step fails with ENOSPC half-way (see _disk_full_in_save_at_step).
    nan_loss_at_step, nan_grad_at_step: that step's loss, or its last trainable gradient, is NaN (_nan_loss_at_step,
    _nan_grad_at_step). Faults are installed in the child by the harness: the recipes carry no test hooks."""
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **(env or {})}
    log = Path(log)
    process = _context().Process(target=_child, args=(str(RECIPES[recipe]), argv, env, str(log), kill_in_save, hold_after_step,
                                                         disk_full_at_step, nan_loss_at_step, nan_grad_at_step),
                                 daemon=True)
    process.start()
    return Run(process, log)


def run_recipe(recipe: str, argv: list[str], log: str | Path, env: dict[str, str] | None = None,
               kill_in_save: bool = False, disk_full_at_step: int | None = None, nan_loss_at_step: int | None = None,
               nan_grad_at_step: int | None = None) -> tuple[int, str]:
    run = start_recipe(recipe, argv, log, env, kill_in_save, disk_full_at_step=disk_full_at_step,
                       nan_loss_at_step=nan_loss_at_step, nan_grad_at_step=nan_grad_at_step)
    code = run.wait()
    return code, run.text()


def run_cli(args: list[str], timeout: float = 180, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real command line, for checks about the entry point itself (exit codes, messages)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------ results


def metric_records(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_timing_key(key: str) -> bool:
    return key in TIMING_KEYS or key.startswith(TIMING_PREFIXES)


def reproducible(value):
    """`value` (metrics records, a summary or any block of one) without its wall-time and load fields, at any
    depth: the one filter every test that compares runs for equality uses."""
    if isinstance(value, dict):
        return {k: reproducible(v) for k, v in value.items() if not is_timing_key(k)}
    if isinstance(value, list):
        return [reproducible(v) for v in value]
    return value


def adapter_tensors(directory: str | Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "adapter_model.safetensors"))


def complete_checkpoints(output_dir: str | Path) -> list[int]:
    from align.trainers.common import MARKER

    return sorted(int(p.name.split("-")[1]) for p in Path(output_dir).glob("checkpoint-*") if (p / MARKER).is_file())


def assert_same_run(reference: str | Path, resumed: str | Path, steps: int) -> None:
    """Bit-identical adapter and per-step metrics, one metrics record per step (1..steps), the same summary; the
    run's mean `train_loss` to rel 1e-12 (after a resume it is summed in another order, see run_train_loss)."""
    import torch

    reference, resumed = Path(reference), Path(resumed)
    ref_w, new_w = adapter_tensors(reference / "adapter"), adapter_tensors(resumed / "adapter")
    assert ref_w.keys() == new_w.keys()
    differ = [k for k in ref_w if not torch.equal(ref_w[k], new_w[k])]
    assert not differ, f"{len(differ)} adapter tensors differ, e.g. {differ[0]}: max |diff| " \
        f"{(ref_w[differ[0]] - new_w[differ[0]]).abs().max().item():.3g}"

    ref_m, new_m = metric_records(reference), metric_records(resumed)
    logged = [r["step"] for r in new_m if "train/loss" in r]
    assert logged == list(range(1, steps + 1)), f"metrics.jsonl steps after resume: {logged}"
    ref_final, new_final = ref_m[-1].pop("train/train_loss"), new_m[-1].pop("train/train_loss")
    assert math.isclose(ref_final, new_final, rel_tol=1e-12), (ref_final, new_final)
    assert reproducible(ref_m) == reproducible(new_m)

    ref_s, new_s = (json.loads((d / "summary.json").read_text()) for d in (reference, resumed))
    assert math.isclose(ref_s.pop("train_loss"), new_s.pop("train_loss"), rel_tol=1e-12)
    for key in ("steps", "tokens_processed", "before", "after", "eval_loss"):
        assert reproducible(ref_s.get(key)) == reproducible(new_s.get(key)), key


def assert_no_traceback(text: str) -> None:
    assert "Traceback (most recent call last)" not in text, f"unexpected traceback:\n{text[-3000:]}"


__all__ = [
    "REPO", "Run", "adapter_tensors", "assert_no_traceback", "assert_same_run", "complete_checkpoints", "is_timing_key", "metric_records",
    "recipe_args", "reproducible", "run_cli", "run_recipe", "start_recipe", "tiny_data",
]


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it: the machine or the job dying mid-run. (torchrun starts each
    worker in a session of its own, so killing the launcher's process group would leave the workers training.)"""
    import psutil

    launcher = psutil.Process(process.pid)
    procs = [*launcher.children(recursive=True), launcher]
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    process.wait(timeout=30)
