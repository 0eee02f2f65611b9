"""The stage benchmark's harness (bench/harness) on its own: FLOPs accounting by hand, memory and phase bookkeeping,
the summary's ratios, the synthetic data. The real runs of bench/run.py are tests/integration/test_bench.py.
conftest.py puts the checkout on sys.path, as the bench scripts do."""

import time

import pytest

from bench.harness.data import synthetic_pairs
from bench.harness.flops import matmul_params, pass_flops, ppo_phase_flops, stage_flops
from bench.harness.meter import MemoryMeter, Phases
from bench.harness.recorders import PPOSteps
from bench.harness.report import summarize
from bench.harness.stage import BenchArgs
from align.config import build_config
from align.errors import ConfigError


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

    from align.models.loading import ModelArgs, load_model

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
