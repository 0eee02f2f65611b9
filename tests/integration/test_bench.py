"""The stage benchmark end to end (bench/run.py): each stage's arms on a tiny model, 2 steps each in fresh
subprocesses, a well-formed JSON report; unknown arms refused. The harness's own arithmetic and bookkeeping are
tests/unit/bench/test_bench_harness.py."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness.flops import matmul_params
from repo_paths import REPO


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_runs_dpo_on_a_tiny_model(tiny_model_dir, tmp_path):
    """The whole harness: both arms, 2 steps each, fresh subprocesses, a well-formed JSON report."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "bench/run.py", "--stage", "dpo", "--compare", "trl-baseline,align", "--steps", "2",
           "--batch_size", "2", "--max_length", "1024", "--model_name_or_path", tiny_model_dir, "--threads", "1",
           "--output_dir", str(tmp_path), "--data", "synthetic", "--dtype", "fp32"]  # the loss tolerance below is float32's
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench_dpo.json").read_text())
    assert _finite_positive(report["setup"]["peak_flops"])
    from align.models.loading import cpu_bf16_flags

    cpu = report["setup"]["cpu"]  # which machine kind the numbers come from
    assert cpu.endswith("+".join(cpu_bf16_flags()) or "no bf16 matmul (AVX2 only)") and " cores, " in cpu, cpu
    flags = report["setup"]["cpu_flags"]  # lscpu's flags: what the kernels could use (avx2, avx512_bf16, amx_tile, ...)
    assert set(cpu_bf16_flags()) <= set(flags) and ("avx2" in flags) == ("avx2" in Path("/proc/cpuinfo").read_text()), flags
    assert [r["arm"] for r in report["runs"]] == ["trl-baseline", "align"]
    for r in report["runs"]:
        assert "error" not in r, r.get("error")
        for key in ("train_tokens_per_s", "end_to_end_tokens_per_s", "train_flops_per_s", "mfu_train", "peak_mb",
                    "train_peak_mb", "n_params_matmul", "step_time_s_median", "tokens_total"):
            assert _finite_positive(r[key]), (r["arm"], key, r[key])
        assert r["n_params_matmul"] == 26_880
        assert len(r["steps"]) == 2
        for step in r["steps"]:
            for key in ("time_s", "tokens", "tokens_per_s", "peak_mb", "flops", "loss"):
                assert _finite_positive(step[key]), (r["arm"], key, step)
        assert {"load", "init", "train"} <= r["phases"].keys()
    base, ours = report["runs"]
    assert "precompute_ref" not in ours["phases"] and "precompute_ref" not in base["phases"]
    # both arms' steps include a reference forward (2N per token) on top of 4N: 6N per token
    for run in (base, ours):
        assert run["steps"][0]["flops"] == 6 * 26_880 * run["steps"][0]["tokens"]
    ratios = report["summary"]["ratios"]["align"]
    assert ratios["same_lora_init"] and ratios["loss_steps_compared"] == 2
    # the same training computed two ways, in float32 (bf16, auto on avx512_bf16 CPUs, differed by 3.5e-4)
    assert ratios["loss_max_abs_diff"] < 1e-4
    assert "train tok/s" in proc.stdout and "align / trl-baseline" in proc.stdout


def test_bench_runs_ppo_on_a_tiny_model(tiny_model_dir, tmp_path):
    """PPO (align.rl.ppo, verifier reward) next to the DPO recipe on the same base: per-update phases."""
    from transformers import AutoModelForCausalLM

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "bench/run.py", "--stage", "ppo", "--compare", "dpo-align,align", "--steps", "2",
           "--warmup_steps", "0", "--max_length", "1024", "--model_name_or_path", tiny_model_dir, "--threads", "1",
           "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench_ppo.json").read_text())
    assert [r["arm"] for r in report["runs"]] == ["dpo-align", "align"]
    dpo, ppo = report["runs"]
    assert "error" not in dpo and "error" not in ppo, (dpo.get("error"), ppo.get("error"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n_params, n_head = matmul_params(model), model.get_output_embeddings().weight.numel()
    assert (ppo["n_params_matmul"], ppo["n_params_lm_head"]) == (n_params, n_head) == (26_880, 8_288)
    decoder, epochs = n_params - n_head, ppo["ppo_config"]["ppo_epochs"]
    assert len(ppo["steps"]) == 2
    for step in ppo["steps"]:
        for phase in ("generate", "score", "update"):
            for key in (f"{phase}_s", f"{phase}_peak_mb", f"{phase}_flops"):
                assert _finite_positive(step[key]), (key, step)
        prompt, new = step["prompt_tokens"], step["new_tokens"]
        assert new > 0 and prompt > 0 and new <= ppo["ppo_config"]["rollout_batch_size"] * ppo["ppo_config"]["response_length"]
        # the decoder on every token, the LM head on response tokens only (see ppo_phase_flops)
        assert step["generate_flops"] == 2 * decoder * (prompt + new) + 2 * n_head * new
        assert step["score_flops"] == 3 * 2 * decoder * (prompt + new) + 2 * 2 * n_head * new
        assert step["update_flops"] == epochs * (2 * 4 * decoder * (prompt + new) + 4 * n_head * new)
        assert step["tokens"] == epochs * (prompt + new) and step["train_flops"] == step["update_flops"]
        assert step["flops"] == step["generate_flops"] + step["score_flops"] + step["update_flops"]
    assert _finite_positive(report["summary"]["ratios"]["align"]["peak_mb"])
    ratios = report["summary"]["ratios"]["align"]
    assert ratios["loss_max_abs_diff"] is None and ratios["same_lora_init"] is None, "PPO and DPO: losses and adapters not compared"
    assert "per update: generate" in proc.stdout


@pytest.mark.parametrize("stage, arm", [("ppo", "trl-baseline"), ("grpo", "dpo-align"), ("grpo", "trl")])
def test_bench_rejects_unknown_arms(tmp_path, stage, arm):
    proc = subprocess.run([sys.executable, "bench/run.py", "--stage", stage, "--compare", f"align,{arm}",
                           "--output_dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 2 and f"unknown arm '{arm}' for stage {stage}" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / f"bench_{stage}.json").exists()


def test_bench_runs_grpo_on_a_tiny_model(tiny_model_dir, tmp_path):
    """TRL's documented GRPO script and the grpo recipe, 2 steps each on the same ifprefs prompts with the verifier:
    per-step generate / score / update, tokens and FLOPs tied to the tokens generated."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "bench/run.py", "--stage", "grpo", "--compare", "trl-baseline,align", "--steps", "2",
           "--warmup_steps", "0", "--batch_size", "2", "--max_length", "1024", "--model_name_or_path", tiny_model_dir,
           "--threads", "1", "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench_grpo.json").read_text())
    assert [r["arm"] for r in report["runs"]] == ["trl-baseline", "align"]
    base, ours = report["runs"]
    assert "error" not in base and "error" not in ours, (base.get("error"), ours.get("error"))
    assert base["data"] == ours["data"] == "ifprefs:prefs_train"
    decoder, n_head = 26_880 - 8_288, 8_288
    for r in (base, ours):
        assert (r["n_params_matmul"], r["n_params_lm_head"]) == (26_880, 8_288)
        for key in ("train_tokens_per_s", "end_to_end_tokens_per_s", "mfu_train", "mfu_end_to_end", "peak_mb", "step_time_s_median"):
            assert _finite_positive(r[key]), (r["arm"], key, r[key])
        config = r["grpo_config"]
        replies = config["per_device_train_batch_size"]
        assert replies == 2 * config["num_generations"] == 8  # --batch_size 2 prompts x the recipe's 4 replies
        assert len(r["steps"]) == 2
        for step in r["steps"]:
            for key in ("time_s", "generate_s", "update_s", "generate_peak_mb", "update_peak_mb", "peak_mb", "prompt_tokens",
                        "new_tokens", "tokens_per_s", "generate_tokens_per_s", "generate_flops", "update_flops"):
                assert _finite_positive(step[key]), (r["arm"], key, step)
            assert step["generate_s"] < step["time_s"] and 0 <= step["score_s"] < step["time_s"], step
            assert step["generate_s"] + step["score_s"] + step["update_s"] == pytest.approx(step["time_s"], abs=1e-3)
            prompt, new = step["prompt_tokens"], step["new_tokens"]
            assert new <= replies * config["max_completion_length"]
            assert step["generate_tokens_per_s"] == pytest.approx(new / step["generate_s"], rel=1e-2)
            # the loss's pass trains on exactly the tokens that were generated: the replies and their prompts
            assert step["tokens"] == prompt + new
            assert step["generate_flops"] == 2 * decoder * (prompt + new) + 2 * n_head * new
            assert step["update_flops"] == 4 * decoder * (prompt + new) + 4 * n_head * new == step["train_flops"]
            assert step["score_flops"] == step["forward_passes"] * step["generate_flops"]  # each a forward pass, no grad
            assert step["flops"] == step["generate_flops"] + step["score_flops"] + step["update_flops"]
            assert 0.0 <= step["reward"] <= 1.0 and math.isfinite(step["loss"])
    # the same prompts in the same order in both arms (the replies differ: sampling)
    assert [s["prompt_tokens"] for s in base["steps"]] == [s["prompt_tokens"] for s in ours["steps"]]
    # TRL's default beta 0 makes no reference pass; the recipe's beta 0.05 makes one per step
    assert (base["grpo_config"]["beta"], ours["grpo_config"]["beta"]) == (0.0, 0.05)
    assert [s["forward_passes"] for s in base["steps"]] == [0, 0] and [s["forward_passes"] for s in ours["steps"]] == [1, 1]
    shared = ("num_generations", "max_completion_length", "learning_rate")
    assert [base["grpo_config"][k] for k in shared] == [ours["grpo_config"][k] for k in shared]
    ratios = report["summary"]["ratios"]["align"]
    assert _finite_positive(ratios["train_tokens_per_s"]) and ratios["loss_max_abs_diff"] is None
    assert "grpo align run 1, per step: generate" in proc.stdout and "align / trl-baseline" in proc.stdout


def test_bench_sft_arms_train_the_same_loss(tiny_model_dir, tmp_path):
    """SFT's TRL arm trains assistant-only, on the recipe's marked template: at step 1 (LoRA B = 0, so dropout is
    moot) both arms compute the same loss over the same tokens, in float32, though align's runs padding-free,
    LM head on assistant tokens only, with selective checkpointing."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "bench/run.py", "--stage", "sft", "--compare", "trl-baseline,align", "--steps", "2",
           "--batch_size", "2", "--max_length", "1024", "--model_name_or_path", tiny_model_dir, "--threads", "1",
           "--output_dir", str(tmp_path), "--data", "synthetic", "--dtype", "fp32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench_sft.json").read_text())
    base, ours = report["runs"]
    for r in (base, ours):
        assert "error" not in r, r.get("error")
        assert _finite_positive(r["train_tokens_per_s"]) and _finite_positive(r["peak_mb"])
    assert report["summary"]["ratios"]["align"]["same_lora_init"]
    assert [s["tokens"] for s in ours["steps"]] == [s["tokens"] for s in base["steps"]]  # padding is not counted
    assert abs(ours["steps"][0]["loss"] - base["steps"][0]["loss"]) < 1e-4
