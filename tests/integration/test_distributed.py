"""DPO on two processes: `accelerate launch --multi_gpu --num_processes 2` (on a machine without GPUs this
starts two CPU processes over gloo; plain --num_processes 2 would start one).

1. Data parallel = one process with the same global batch: per-device batch 2 x 2 processes vs batch 4 x 1
   process see the same 4 pairs per step (the sampler's permutation, split in order across ranks) and the
   averaged gradient is the same mean. LoRA dropout is off, since two processes draw different dropout masks
   than one. What is left is float32 rounding (gradient all-reduce vs one batch; a batch of 2 padded to its
   own longest row vs 4). Measured: losses, grad norms, log-probs within rel 2.4e-7; rewards within 1.9e-7
   absolute, which is one float32 ulp (7.6e-6) of a log-prob near -94, times beta 0.1, over 4 pairs; adapter
   weights within 2.6e-8, about one ulp of the largest LoRA weights. Tolerances: rel 1e-6 (4x the measured);
   rewards abs 5e-6 (about 6 ulps of beta x log-prob); adapter abs 1e-6 (about 30 ulps), while training
   moved lora_B weights (which start at 0) by up to 2.5e-4.
2. A rank that dies mid-run (tests/support/fail_on_rank.py: rank 1 raises at step 2) ends the launch with a non-zero
   exit and a message naming the failed rank, within a bound, instead of leaving rank 0 waiting in an
   all-reduce; no checkpoint is marked complete after the failure.
3. SFT and the reward model on 2 processes = 1 process with the same global batch, as in 1. Measured (3 runs,
   one torch thread): losses within rel 1.7e-7, grad norms 1.9e-7, SFT entropy 1.7e-7; reward statistics
   (min/mean/max reward, margin) within abs 9.3e-9 (rewards near 0, so relative differences mean little);
   adapter weights within 2.7e-8 (4.1e-7 once when the 1-process run picked its thread count by load).
   Tolerances: rel 1e-6, abs 1e-6, adapter abs 1e-6 (as for DPO); steps, tokens, epochs, learning rates and
   accuracies exactly; a logged key with no stated tolerance fails the test.
4. A 2-process DPO run SIGKILLed (launcher and both workers) after checkpoint-2, resumed with --resume on 2
   processes: bit-identical to the uninterrupted 2-process run (see that test's docstring).
5. SIGTERM to rank 1 only: both ranks save the same step and exit (the stop flag is all-reduced after every
   step); the resumed run is bit-identical to the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipe_harness import (  # noqa: F401  (tiny_data is a fixture)
    REPO, adapter_tensors, assert_same_run, complete_checkpoints, is_timing_key, kill_tree, metric_records, recipe_args, run_recipe,
    tiny_data,
)

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "recipes/dpo.py"]
LAUNCH_TIMEOUT_S = 300  # two cold processes (imports ~15 CPU-s each) on a loaded 2-core box; a hang fails here
TEARDOWN_BOUND_S = 90  # rank 1 fails -> launcher exits; torchrun's SIGTERM-then-SIGKILL grace is 30 s
EXACT_KEYS = ("step", "tokens_seen", "train/num_input_tokens_seen", "train/num_tokens", "train/epoch", "train/learning_rate")
REL_KEYS = ("train/loss", "train/grad_norm", "logps/chosen", "logps/rejected", "train/entropy")  # rel 1e-6
ABS_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins")  # abs 5e-6 (see the module docstring)


def launch_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "TQDM_DISABLE": "1", **extra}


def launch(recipe: str, argv: list[str], port: int) -> list[str]:
    """The command line of a 2-process run of recipes/<recipe>.py; each launch its own port (a killed run's
    rendezvous port can stay bound for a while)."""
    return [*LAUNCH[:-1], "--main_process_port", str(port), f"recipes/{recipe}.py", *argv]


def run_launch(recipe: str, argv: list[str], port: int) -> subprocess.CompletedProcess:
    """Run a 2-process launch; its whole stderr is kept beside the output dir (launch-PORT.log): a failing rank's
    first lines are often beyond the 4,000 characters an assertion message shows."""
    result = subprocess.run(launch(recipe, argv, port), cwd=REPO, env=launch_env(), capture_output=True, text=True,
                            timeout=LAUNCH_TIMEOUT_S)
    log = Path(argv[argv.index("--output_dir") + 1]).parent / f"launch-{port}.log"
    log.write_text(result.stderr)
    assert result.returncode == 0, f"whole log: {log}\n{result.stderr[-4000:]}"
    return result


# The 2-versus-1-process comparisons hold to float32 rounding, so they run without compressed activations: bf16
# rounding of the saved activations turns 1e-7 summation-order differences into occasional one-bf16-ulp flips
# (seen: grad norm 2e-5 relative apart). Compression itself is tested in tests/unit/models/test_activations.py.
EXACT = dict(lora_dropout=0.0, compress_activations="false")


def dpo_args(tiny_model_dir, tiny_data, output_dir, batch: int, **flags) -> list[str]:
    """The sigmoid loss alone: a mean over pairs, so 2 processes x 2 pairs equal 1 x 4 exactly. (The recipe's default
    adds the SFT term, a mean over each process's chosen tokens: DDP then averages two token means, as TRL does.)"""
    flags = {"loss_type": "sigmoid", **flags}
    return recipe_args("dpo", tiny_model_dir, tiny_data, output_dir, max_steps=4, save_steps=2,
                       per_device_train_batch_size=batch, **EXACT, **flags)


@pytest.fixture(scope="module")
def two_process_dpo(tiny_model_dir, tiny_data, tmp_path_factory):
    """(output_dir, stderr) of one uninterrupted 2-process DPO run (4 steps, checkpoints 2 and 4), shared."""
    two = tmp_path_factory.mktemp("dpo_two") / "run"
    result = run_launch("dpo", dpo_args(tiny_model_dir, tiny_data, two, batch=2), port=29541)
    return two, result.stderr


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tiny_model_dir, tiny_data, two_process_dpo, tmp_path):
    one = tmp_path / "one"
    code, log = run_recipe("dpo", dpo_args(tiny_model_dir, tiny_data, one, batch=4), tmp_path / "one.log")
    assert code == 0, log[-3000:]

    two, stderr = two_process_dpo
    assert "data: 16 training" in stderr  # 4 steps x 2 per device x 2 processes rows read, as one process reads

    steps_one = [r for r in metric_records(one) if "train/loss" in r]
    steps_two = [r for r in metric_records(two) if "train/loss" in r]
    assert [r["step"] for r in steps_two] == [1, 2, 3, 4]
    for a, b in zip(steps_one, steps_two):
        for key in EXACT_KEYS:
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
        for key in REL_KEYS:
            assert math.isclose(a[key], b[key], rel_tol=1e-6), (a["step"], key, a[key], b[key])
        for key in ABS_KEYS:
            assert abs(a[key] - b[key]) <= 5e-6, (a["step"], key, a[key], b[key])
        assert a["rewards/accuracies"] == b["rewards/accuracies"]

    summary_one, summary_two = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert summary_one["tokens_processed"] == summary_two["tokens_processed"]
    assert math.isclose(summary_one["train_loss"], summary_two["train_loss"], rel_tol=1e-6)

    w_one, w_two = adapter_tensors(one / "adapter"), adapter_tensors(two / "adapter")
    assert w_one.keys() == w_two.keys()
    largest_update = max(w_one[k].abs().max().item() for k in w_one if "lora_B" in k)  # lora_B starts at 0
    largest_diff = max((w_one[k] - w_two[k]).abs().max().item() for k in w_one)
    assert largest_update > 100 * 1e-6, "the adapter barely trained; the comparison would prove little"
    assert largest_diff <= 1e-6, (largest_diff, largest_update)
    print(f"2 processes vs 1: largest adapter |diff| {largest_diff:.3g}; largest lora_B update {largest_update:.3g}")


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_launch_instead_of_hanging(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    log = (tmp_path / "launch.log").open("w")
    process = subprocess.Popen([*LAUNCH[:-1], "tests/support/fail_on_rank.py", "1", LAUNCH[-1], *dpo_args(tiny_model_dir, tiny_data, out, batch=2)],
                               cwd=REPO, env=launch_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + LAUNCH_TIMEOUT_S
        while not (out / "metrics.jsonl").is_file() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)  # step 1 is logged: both ranks trained it; rank 1 fails in step 2
        step_one_done = time.time()
        code = process.wait(timeout=TEARDOWN_BOUND_S)
        torn_down_after = time.time() - step_one_done
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"the launch was still running {TEARDOWN_BOUND_S} s after rank 1 failed:\n"
                    f"{(tmp_path / 'launch.log').read_text()[-4000:]}")
    finally:
        log.close()
    text = (tmp_path / "launch.log").read_text()
    assert code != 0, text[-4000:]
    assert "rank 1: injected failure at step 2" in text
    # torchrun's summary names the rank that failed first
    assert "Root Cause (first observed failure)" in text and "rank      : 1 (local_rank: 1)" in text, text[-4000:]
    assert [r["step"] for r in metric_records(out) if "train/loss" in r] == [1]
    assert complete_checkpoints(out) == []
    print(f"launch exited {code} {torn_down_after:.1f} s after step 1 was logged")


@pytest.mark.slow
def test_two_process_run_killed_then_resumed_on_two_processes_matches_uninterrupted(tiny_model_dir, tiny_data,
                                                                                   two_process_dpo, tmp_path):
    """SIGKILL of the whole 2-process launch once checkpoint-2 is complete (step 3 or 4 in flight), then
    `--resume true` on 2 processes: bit-identical adapter and per-step metrics to the uninterrupted 2-process run
    (tolerance 0, train_loss rel 1e-12: see recipe_harness.assert_same_run). Exact because nothing differs but
    the interruption: the same 2 ranks, each restoring its own RNG state (rng_state_<rank>.pth), the same
    sampler position, and gloo's all-reduce of 2 tensors adds them in the same order every time."""
    out = tmp_path / "run"
    argv = dpo_args(tiny_model_dir, tiny_data, out, batch=2)
    with (tmp_path / "1.log").open("w") as log:
        process = subprocess.Popen(launch("dpo", argv, port=29542), cwd=REPO, env=launch_env(), stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + LAUNCH_TIMEOUT_S
            while complete_checkpoints(out) != [2]:
                if process.poll() is not None or time.time() > deadline:
                    pytest.fail(f"no checkpoint-2 before exit or timeout:\n{(tmp_path / '1.log').read_text()[-4000:]}")
                time.sleep(0.01)
        finally:
            kill_tree(process)
    assert complete_checkpoints(out) == [2], "the launch outran the kill: step 4 was saved too"
    assert not (out / "adapter").exists()

    result = run_launch("dpo", dpo_args(tiny_model_dir, tiny_data, out, batch=2, resume="true"), port=29543)
    assert f"resuming from {out / 'checkpoint-2'}" in result.stderr
    assert_same_run(two_process_dpo[0], out, steps=4)


SFT_RM_EXACT = ("step", "tokens_seen", "train/num_input_tokens_seen", "train/num_tokens", "train/epoch", "train/learning_rate",
                "train/mean_token_accuracy", "train/accuracy")
SFT_RM_REL = ("train/loss", "train/grad_norm", "train/entropy")  # rel 1e-6
SFT_RM_ABS = ("train/min_reward", "train/mean_reward", "train/max_reward", "train/margin")  # abs 1e-6: near 0, rel means little


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["sft", "reward"])
def test_sft_and_reward_two_processes_match_one_process(recipe, tiny_model_dir, tiny_reward_dir, tiny_data, tmp_path):
    """SFT and the reward model, per-device batch 2 x 2 processes vs batch 4 x 1 process (16 rows, 4 steps, one
    epoch, LoRA dropout 0): the same steps, tokens, epochs and learning rates exactly; losses and grad norms
    within rel 1e-5 and adapter weights within abs 1e-6; see the module docstring (3.) for the measured
    differences these bounds are set from."""
    model = tiny_reward_dir if recipe == "reward" else tiny_model_dir
    one, two = tmp_path / "one", tmp_path / "two"

    def args(output_dir, batch):
        return recipe_args(recipe, model, tiny_data, output_dir, max_steps=4, save_steps=2, per_device_train_batch_size=batch,
                           **EXACT)

    code, log = run_recipe(recipe, args(one, 4), tmp_path / "one.log")
    assert code == 0, log[-3000:]
    run_launch(recipe, args(two, 2), port=29544 if recipe == "sft" else 29545)

    steps_one = [r for r in metric_records(one) if "train/loss" in r]
    steps_two = [r for r in metric_records(two) if "train/loss" in r]
    assert [r["step"] for r in steps_one] == [r["step"] for r in steps_two] == [1, 2, 3, 4]
    worst: dict[str, float] = {}
    for a, b in zip(steps_one, steps_two):
        assert a.keys() == b.keys()
        for key in a:
            if not is_timing_key(key) and isinstance(a[key], float):
                worst[key] = max(worst.get(key, 0.0), abs(a[key] - b[key]) if key in SFT_RM_ABS else rel_diff(a[key], b[key]))
    w_one, w_two = adapter_tensors(one / "adapter"), adapter_tensors(two / "adapter")
    assert w_one.keys() == w_two.keys()
    largest_diff = max((w_one[k] - w_two[k]).abs().max().item() for k in w_one)
    largest_update = max(w_one[k].abs().max().item() for k in w_one if "lora_B" in k)  # lora_B starts at 0
    print(f"{recipe} 2 processes vs 1: worst metric differences (abs for rewards, else rel) {worst}; adapter |diff| {largest_diff:.3g}; "
          f"largest lora_B {largest_update:.3g}")
    for a, b in zip(steps_one, steps_two):
        for key in a:
            if key in SFT_RM_EXACT:
                assert a[key] == b[key], (a["step"], key, a[key], b[key])
            elif key in SFT_RM_REL:
                assert math.isclose(a[key], b[key], rel_tol=1e-6), (a["step"], key, a[key], b[key])
            elif key in SFT_RM_ABS:
                assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
            else:
                assert is_timing_key(key), f"{key}: no tolerance stated for it"
    assert largest_update > 100 * 1e-6, "the adapter barely trained; the comparison would prove little"
    assert largest_diff <= 1e-6, (largest_diff, largest_update)


def local_rank_process(process: subprocess.Popen, rank: int, timeout_s: float):
    """The worker process of a launch whose LOCAL_RANK is `rank` (psutil.Process)."""
    import psutil

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for child in psutil.Process(process.pid).children(recursive=True):
            try:
                if child.environ().get("LOCAL_RANK") == str(rank) and "recipes/" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.05)
    pytest.fail(f"no worker with LOCAL_RANK={rank} within {timeout_s} s")


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_the_same_step_then_resume_matches(tiny_model_dir, tiny_data, two_process_dpo,
                                                                             tmp_path):
    """SIGTERM reaches rank 1 only (a scheduler signalling one worker, or two signals landing in different
    steps). The ranks agree after every step, so both save the same checkpoint and exit 143 (no rank waits in
    an all-reduce the other never joins); `--resume true` on 2 processes then ends bit-identical to the
    uninterrupted run, as after a kill."""
    out = tmp_path / "run"
    with (tmp_path / "1.log").open("w") as log:
        process = subprocess.Popen(launch("dpo", dpo_args(tiny_model_dir, tiny_data, out, batch=2), port=29546), cwd=REPO,
                                   env=launch_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            rank1 = local_rank_process(process, 1, LAUNCH_TIMEOUT_S)
            deadline = time.time() + LAUNCH_TIMEOUT_S
            while not (out / "metrics.jsonl").is_file():  # step 1 is logged: the signal handlers are in place
                if process.poll() is not None or time.time() > deadline:
                    pytest.fail(f"no step logged before exit or timeout:\n{(tmp_path / '1.log').read_text()[-4000:]}")
                time.sleep(0.01)
            rank1.send_signal(15)
            code = process.wait(timeout=TEARDOWN_BOUND_S)
        except subprocess.TimeoutExpired:
            kill_tree(process)
            pytest.fail(f"the launch hung after SIGTERM to rank 1:\n{(tmp_path / '1.log').read_text()[-4000:]}")
    text = (tmp_path / "1.log").read_text()
    checkpoints = complete_checkpoints(out)
    assert checkpoints and checkpoints[-1] < 4, (checkpoints, text[-3000:])  # stopped early, the stop step saved
    stopped_at = checkpoints[-1]
    assert code != 0 and "SIGTERM: saving a checkpoint after this step" in text, text[-3000:]
    assert text.count("stopped by signal after saving a checkpoint") == 2, text[-3000:]  # both ranks, same step
    assert [r["step"] for r in metric_records(out) if "train/loss" in r] == list(range(1, stopped_at + 1))
    assert not (out / "adapter").exists()

    result = run_launch("dpo", dpo_args(tiny_model_dir, tiny_data, out, batch=2, resume="true"), port=29547)
    assert f"resuming from {out / f'checkpoint-{stopped_at}'}" in result.stderr
    assert_same_run(two_process_dpo[0], out, steps=4)


def test_grpo_on_two_processes(tiny_model_dir, tiny_data, tmp_path):
    """GRPO (TRL) on 2 processes: each rank generates and scores its own replies (4 replies per rank, groups of 2),
    the step's metrics are gathered over both, one adapter and one summary are written. Not compared with one
    process: each rank samples its replies from its own generator, so the replies themselves differ."""
    out = tmp_path / "grpo_two"
    argv = recipe_args("grpo", tiny_model_dir, tiny_data, out, max_steps=2, reward_guard="false")
    run_launch("grpo", argv, port=29548)
    metrics = [m for m in metric_records(out) if "train/reward" in m]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert 0 <= m["train/reward"] <= 1 and math.isfinite(m["train/loss"])
    assert metrics[0]["train/kl"] == 0.0  # the reference is the base, adapter disabled, on both ranks
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "grpo" and summary["steps"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
