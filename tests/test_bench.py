"""The stage benchmark (bench/run.py, bench/harness): FLOPs accounting by hand, memory and phase bookkeeping, and a
real 2-step run on a tiny model. conftest.py puts the checkout on sys.path, as the bench scripts do."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.harness.data import synthetic_pairs
from bench.harness.flops import matmul_params, pass_flops, ppo_phase_flops, stage_flops
from bench.harness.meter import MemoryMeter, Phases
from bench.harness.recorders import PPOSteps
from bench.harness.report import summarize
from bench.harness.stage import BenchArgs
from align.config import build_config
from align.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_stage_flops_by_hand():
    """The tiny model of align.testing has N = 26,880 (see test_matmul_params_of_the_tiny_models).

    DPO with LoRA, 100 trained tokens, reference every step on the same 100 tokens:
        4 * 26,880 * 100 + 2 * 26,880 * 100 = 10,752,000 + 5,376,000 = 16,128,000
    Full fine-tuning of the same 100 tokens, reference precomputed (no forward-only tokens in the step):
        6 * 26,880 * 100 = 16,128,000   (the same number: 6N = 4N + 2N)
    SFT with LoRA, 250 tokens: 4 * 26,880 * 250 = 26,880,000.
    """
    assert stage_flops(26_880, trained_tokens=100, forward_tokens=100, lora=True) == 16_128_000
    assert stage_flops(26_880, trained_tokens=100, forward_tokens=0, lora=False) == 16_128_000
    assert stage_flops(26_880, trained_tokens=250, forward_tokens=0, lora=True) == 26_880_000
    assert stage_flops(26_880, trained_tokens=0, forward_tokens=10, lora=True) == 537_600


def test_matmul_params_of_the_tiny_models(tiny_model_dir, tiny_reward_dir):
    """Tiny Llama: hidden 32, intermediate 64, 2 layers, 4 heads of 8, 2 KV heads (K and V are 32 x 16),
    vocabulary 259, tied embeddings.

    per layer: q 32*32 + k 32*16 + v 32*16 + o 32*32 = 1,024 + 512 + 512 + 1,024 = 3,072
               gate, up, down 3 * 32*64 = 6,144; two RMSNorms 2*32 = 64      -> 9,280
    2 layers 18,560 + final norm 32 + embedding 259*32 = 8,288               -> 26,880 parameters
    Causal LM: the embedding is a lookup, but tied, it is also the LM head's matmul: N = 26,880.
    Reward model: no LM head; a score head 32 x 1 = 32: 26,912 parameters, N = 26,912 - 8,288 = 18,624.
    With LoRA, adapters are not counted: N stays 26,880.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from align.models import ModelArgs, load_model

    assert matmul_params(AutoModelForCausalLM.from_pretrained(tiny_model_dir)) == 26_880
    assert matmul_params(AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir)) == 18_624
    peft_model, _ = load_model(ModelArgs(model_name_or_path=tiny_model_dir, dtype="fp32", quantization="none", lora_r=4))
    assert matmul_params(peft_model.get_base_model()) == 26_880


def test_memory_meter_sees_an_allocation():
    import torch

    meter = MemoryMeter("cpu")
    with meter.span() as outer:
        start = meter.current_mb()
        big = torch.ones(50 * 2**20 // 4 * 4)  # 200 MiB, touched
        del big
        meter.reset()  # a reset inside the span (as every training step does) must not lose the peak
        small = meter.peak_mb()
    assert outer["peak"] - start >= 150
    assert small < outer["peak"]


def test_nested_spans_with_equal_peaks_close_in_order(monkeypatch):
    """A nested span whose peak equals its parent's (as on a machine whose memory readings coincide) must close
    itself, not its parent: `python bench/run.py --stage ppo` failed with list.remove(x): x not in list."""
    meter = MemoryMeter("cpu")
    monkeypatch.setattr(meter, "peak_mb", lambda: 100.0)
    monkeypatch.setattr(meter, "_clear", lambda: None)
    with meter.span() as outer:
        with meter.span() as inner:
            assert meter.spans == [outer, inner]
        assert len(meter.spans) == 1 and meter.spans[0] is outer
    assert meter.spans == [] and outer["peak"] == inner["peak"] == 100.0


def test_phases_pause_the_outer_clock():
    phases = Phases(MemoryMeter("cpu"), "cpu")
    with phases("init"):
        time.sleep(0.05)
        with phases("precompute_ref"):
            time.sleep(0.2)
    table = phases.table()
    assert table["precompute_ref"]["time_s"] >= 0.2
    assert 0.05 <= table["init"]["time_s"] < 0.2  # the nested 0.2 s are not counted twice


def test_summarize_ratios_by_hand():
    """Repeat 1: 100 vs 160 tok/s (1.6x), repeat 2: 100 vs 200 (2.0x): median 1.8x. Memory 1000 vs 500
    MB: 0.5x. Losses differ by 0.01 at step 2 at most."""
    def run(arm, n, tps, mb, losses):
        return {"stage": "dpo", "arm": arm, "run": n, "train_tokens_per_s": tps, "end_to_end_tokens_per_s": tps, "peak_mb": mb,
                "train_peak_mb": mb, "step_time_s_median": 1.0, "train_flops_per_s": 1.0, "end_to_end_flops_per_s": 1.0,
                "losses": losses, "lora_A_init_abs_sum": 3.0}

    runs = [run("trl-baseline", 1, 100, 1000, [0.69, 0.68]), run("align", 1, 160, 500, [0.69, 0.67]),
            run("trl-baseline", 2, 100, 1000, [0.69, 0.68]), run("align", 2, 200, 500, [0.69, 0.67])]
    ratios = summarize(runs, ["trl-baseline", "align"])["ratios"]["align"]
    assert ratios["train_tokens_per_s"] == pytest.approx(1.8)
    assert ratios["peak_mb"] == pytest.approx(0.5)
    assert ratios["loss_max_abs_diff"] == pytest.approx(0.01)
    assert ratios["same_lora_init"]


def test_synthetic_pairs_are_fixed_by_the_seed():
    a, b = synthetic_pairs(5, seed=3), synthetic_pairs(5, seed=3)
    assert [(p.prompt, p.chosen, p.rejected) for p in a] == [(p.prompt, p.chosen, p.rejected) for p in b]
    assert synthetic_pairs(5, seed=4)[0].chosen != a[0].chosen or synthetic_pairs(5, seed=4)[0].prompt != a[0].prompt


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


def test_ppo_phase_flops_by_hand():
    """The tiny model: N = 26,880, of which the LM head (tied embedding) 259 x 32 = 8,288; decoder D = 18,592.
    One update of P = 100 prompt and R = 20 response tokens (P + R = 120; D x 120 = 2,231,040; 8,288 x 20 = 165,760):
        generate  2 x 2,231,040 + 2 x 165,760            =  4,462,080 +   331,520 =  4,793,600
        score     6 x 2,231,040 + 4 x 165,760            = 13,386,240 +   663,040 = 14,049,280
        update    8 x 2,231,040 + 4 x 165,760 per epoch  = 17,848,320 +   663,040 = 18,511,360; 2 epochs 37,022,720
    """
    flops = ppo_phase_flops(26_880, 8_288, prompt_tokens=100, new_tokens=20, ppo_epochs=2)
    assert flops == {"generate": 4_793_600, "score": 14_049_280, "update": 37_022_720}


def test_ppo_steps_come_from_the_phases_the_trainer_reports():
    """PPOSteps builds a step from the reported phases; a phase that is not reported is an error, also when an
    earlier update reported it (the values are not carried over). Tokens: 2 rows x 3 prompt tokens = 6, 2 x 4
    response tokens = 8; 2 epochs x 14 = 28; FLOPs as ppo_phase_flops (tested above)."""
    from types import SimpleNamespace

    import torch

    recorder = PPOSteps(MemoryMeter("cpu"), "cpu", n_params=1100, n_head=100, ppo_epochs=2)
    rollout = SimpleNamespace(query_mask=torch.ones(2, 3), response_mask=torch.ones(2, 4), responses=torch.ones(2, 4, dtype=torch.long))

    def update(phases):
        for name in phases:
            recorder.on_phase_start(name)
            time.sleep(0.01)
            recorder.on_phase_end(name)
        recorder.on_log({"ppo/policy_loss": 0.5}, rollout)

    update(["generate", "score", "advantages", "update"])
    (step,) = recorder.steps
    assert (step["prompt_tokens"], step["new_tokens"], step["tokens"], step["loss"]) == (6, 8, 28, 0.5)
    assert all(step[f"{p}_s"] >= 0.01 for p in ("generate", "score", "update")) and step["time_s"] >= 0.04
    assert step["update_flops"] == ppo_phase_flops(1100, 100, 6, 8, 2)["update"] == step["train_flops"]
    with pytest.raises(RuntimeError, match="PPO update 2: the trainer reported no score phase"):
        update(["generate", "advantages", "update"])


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


def test_pass_flops_by_hand():
    """The tiny model: N = 26,880, LM head 8,288, decoder D = 18,592. A pass over T = 120 tokens whose LM head scores
    C = 20 of them: forward 2 x (18,592 x 120 + 8,288 x 20) = 2 x (2,231,040 + 165,760) = 4,793,600 (PPO's generate
    phase above: the same pass); LoRA training 4 x 2,396,800 = 9,587,200."""
    assert pass_flops(26_880, 8_288, tokens=120, head_tokens=20, per_token=2) == 4_793_600
    assert pass_flops(26_880, 8_288, tokens=120, head_tokens=20, per_token=4) == 9_587_200
    assert pass_flops(26_880, 8_288, tokens=120, head_tokens=20, per_token=2) == ppo_phase_flops(
        26_880, 8_288, prompt_tokens=100, new_tokens=20, ppo_epochs=1)["generate"]


def test_grpo_bench_refuses_synthetic_data():
    """Synthetic pairs carry no constraints, so the verifier reward would score nothing."""
    with pytest.raises(ConfigError, match="data: synthetic pairs have no constraints"):
        build_config(BenchArgs, {"stage": "grpo", "data": "synthetic"})


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
