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
2. A rank that dies mid-run (ALIGN_FAIL_ON_RANK=1: rank 1 raises at step 2) ends the launch with a non-zero
   exit and a message naming the failed rank, within a bound, instead of leaving rank 0 waiting in an
   all-reduce; no checkpoint is marked complete after the failure.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from recipe_harness import REPO, adapter_tensors, complete_checkpoints, metric_records, recipe_args, run_recipe, tiny_data  # noqa: F401

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "recipes/dpo.py"]
LAUNCH_TIMEOUT_S = 300  # two cold processes (imports ~15 CPU-s each) on a loaded 2-core box; a hang fails here
TEARDOWN_BOUND_S = 90  # rank 1 fails -> launcher exits; torchrun's SIGTERM-then-SIGKILL grace is 30 s
EXACT_KEYS = ("step", "tokens_seen", "train/num_input_tokens_seen", "train/num_tokens", "train/epoch", "train/learning_rate")
REL_KEYS = ("train/loss", "train/grad_norm", "logps/chosen", "logps/rejected", "train/entropy")  # rel 1e-6
ABS_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins")  # abs 5e-6 (see the module docstring)


def launch_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "TQDM_DISABLE": "1", "ALIGN_INJECT_NAN_AT_STEP": "", "ALIGN_FAIL_ON_RANK": "", **extra}


def dpo_args(tiny_model_dir, tiny_data, output_dir, batch: int) -> list[str]:
    return recipe_args("dpo", tiny_model_dir, tiny_data, output_dir, max_steps=4, save_steps=2,
                       per_device_train_batch_size=batch, lora_dropout=0.0)


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tiny_model_dir, tiny_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    code, log = run_recipe("dpo", dpo_args(tiny_model_dir, tiny_data, one, batch=4), tmp_path / "one.log")
    assert code == 0, log[-3000:]

    result = subprocess.run([*LAUNCH, *dpo_args(tiny_model_dir, tiny_data, two, batch=2)], cwd=REPO, env=launch_env(),
                            capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "data: 16 training" in result.stderr  # 4 steps x 2 per device x 2 processes rows read, as one process reads

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
    process = subprocess.Popen([*LAUNCH, *dpo_args(tiny_model_dir, tiny_data, out, batch=2)], cwd=REPO,
                               env=launch_env(ALIGN_FAIL_ON_RANK="1"), stdout=log, stderr=subprocess.STDOUT)
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
    assert "rank 1: injected failure at step 2 (ALIGN_FAIL_ON_RANK)" in text
    # torchrun's summary names the rank that failed first
    assert "Root Cause (first observed failure)" in text and "rank      : 1 (local_rank: 1)" in text, text[-4000:]
    assert [r["step"] for r in metric_records(out) if "train/loss" in r] == [1]
    assert complete_checkpoints(out) == []
    print(f"launch exited {code} {torn_down_after:.1f} s after step 1 was logged")
