"""The memory planner: hand-computed numbers, exact activation terms, monotonicity, searches, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from align import plan
from align.errors import AlignError, ConfigError
from align.models import architecture
from align.models.lora_dropout import fuse_lora_dropout, share_lora_inputs
from align.models.swiglu import fuse_swiglu
from align.plan import PlanArgs, estimate
from repo_paths import REPO
from saved_tensors import saved_bytes


TINY_CONFIG = {
    "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 160, "vocab_size": 1000,
    "tie_word_embeddings": True, "max_position_embeddings": 512,
}


@pytest.fixture()
def tiny_dir(tmp_path) -> str:
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return str(tmp_path)


def test_hand_computed_weights_adapters_and_optimizer(tiny_dir):
    """Tiny Llama: h=64, 2 layers, 4 heads x 16, 2 KV heads, I=160, vocab 1000, tied embeddings.

    Projections per layer: q 64*64=4096, k 64*32=2048, v 2048, o 4096, gate/up/down 64*160=10240 each
    -> 43008; two layers 86016. Embedding 1000*64 = 64000; norms (2*2+1)*64 = 320. Total 150336.
      none, bf16:  150336 * 2                                   = 300672 bytes
      none, fp32:  150336 * 4                                   = 601344 bytes
      4-bit:       86016 * (0.5 + 1/64 + 4/16384) = 43008 + 1344 + 21 = 44373, plus the rest in fp32
                   (64000 + 320) * 4 = 257280                   -> 301653 bytes
      8-bit:       86016 * 1 + fp32 scale per output row 2*(64+32+32+64+160+160+64)*4 = 4608,
                   plus 257280                                  -> 347904 bytes
    LoRA r=8 on all seven, r*(in+out) per module: q 8*128=1024, k 8*96=768, v 768, o 1024,
    gate 8*224=1792, up 1792, down 8*224=1792 -> 8960 per layer, 17920 in all (DPO: all trainable).
      adapters 17920*4 = 71680, gradients 17920*4 = 71680, AdamW 17920*8 = 143360 bytes (fp32 run: no
      autocast weight cache).
    """
    base = dict(model=tiny_dir, stage="dpo", lora_r=8, seq_len=32, micro_batch=1, target="cpu")
    expected = {("none", "bf16"): 300672, ("none", "fp32"): 601344, ("4bit", "fp32"): 301653, ("8bit", "fp32"): 347904}
    for (quant, dtype), weights in expected.items():
        est = estimate(PlanArgs(**base, quantization=quant, dtype=dtype))
        assert est.components["weights"] == pytest.approx(weights, abs=0.5), (quant, dtype)
    est = estimate(PlanArgs(**base, quantization="none", dtype="fp32"))
    assert est.trainable_params == 17920
    assert est.components["adapters"] == 71680
    assert est.components["gradients"] == 71680
    assert est.components["optimizer"] == 143360
    assert est.peak_bytes == pytest.approx(sum(est.components.values()))


def test_ppo_trains_policy_and_critic_and_keeps_a_frozen_reward_adapter(tiny_dir):
    """PPO: 2 trainable adapters + value head (64+1), frozen reward adapter + reward head.

    trainable = 2*17920 + 65 = 35905; adapters (35905 + frozen 17920 + 65 = 53890) * 4 = 215560 bytes.
    """
    est = estimate(PlanArgs(model=tiny_dir, stage="ppo", lora_r=8, seq_len=64, ppo_response_len=16, dtype="fp32",
                            quantization="none", target="cpu"))
    assert est.trainable_params == 35905
    assert est.components["adapters"] == 215560
    assert set(est.phases) == {"update", "generation", "scoring"}
    assert est.peak_bytes == pytest.approx(max(est.phases.values()))


def test_ppo_sampling_on_a_cpu_in_bf16_holds_a_packed_copy_of_the_linear_weights(tiny_dir):
    """align.models.generation.packed_linear_weights packs every bf16 linear layer (the projections and the LM head)
    for sampling on a CPU: the generation phase counts that copy, in bf16 on a CPU only (float32, quantized and GPU
    weights are not packed), and the estimate's generation total includes it."""
    from align.models.architecture import resolve_arch
    from align.plan import CPU_CALIBRATION, _persistent_bytes, _phase_bytes, numerics

    def generation_parts(args: PlanArgs) -> dict:
        arch, num = resolve_arch(args.model), numerics(args)
        return _phase_bytes(arch, args, num, _persistent_bytes(arch, args, num)[0])[0]["generation"]

    arch = resolve_arch(tiny_dir)
    common = dict(model=tiny_dir, stage="ppo", lora_r=8, seq_len=64, ppo_response_len=16)
    bf16_cpu = PlanArgs(**common, dtype="bf16", quantization="none", target="cpu")
    parts = generation_parts(bf16_cpu)
    assert parts["packed_weights"] == (arch.layers * arch.linear_params_per_layer() + arch.vocab * arch.hidden) * 2
    assert estimate(bf16_cpu).phases["generation"] == pytest.approx(sum(parts.values()) + CPU_CALIBRATION["fixed_bytes"])
    for other in (dict(dtype="fp32", quantization="none", target="cpu"), dict(dtype="bf16", quantization="4bit", target="cpu"),
                  dict(dtype="bf16", quantization="none", target="cuda")):
        assert "packed_weights" not in generation_parts(PlanArgs(**common, **other)), other


# ------------------------------------------------------------------------------------------ activations


def _saved_bytes_per_layer_token(layers_a: int, layers_b: int, *, dtype, targets, dropout: float, fused: bool,
                                 autocast: bool = False, rows=2, seq=24) -> float:
    """Bytes autograd saves per extra layer per token: saved(layers_b) - saved(layers_a), over layers and tokens.
    autocast: as the recipes' TRL trainers train a bf16 model (bf16=True)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def saved(layers: int, seq: int = seq) -> int:
        torch.manual_seed(0)
        cfg = LlamaConfig(**{k: v for k, v in TINY_CONFIG.items() if k != "model_type"} | {"num_hidden_layers": layers})
        cfg._attn_implementation = "sdpa"
        model = get_peft_model(LlamaForCausalLM(cfg).to(dtype), LoraConfig(r=8, target_modules=targets, lora_dropout=dropout))
        fuse_lora_dropout(model)  # as align.models.loading.load_model does
        share_lora_inputs(model)
        if fused:
            fuse_swiglu(model)  # as load_model does unless fused_swiglu is off
        model.train()
        ids = torch.randint(0, 1000, (rows, seq), generator=torch.Generator().manual_seed(0))
        with saved_bytes(model) as saved, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(input_ids=ids, labels=ids)
        return saved.total

    per_layer = saved(layers_b) - saved(layers_a)
    if autocast:  # less autocast's bf16 copies of the adapter weights, one per layer whatever the length (the planner
        per_layer = saved(layers_b, 2 * seq) - saved(layers_a, 2 * seq) - per_layer  # counts them as adapters)
    return per_layer / (layers_b - layers_a) / (rows * seq)


@pytest.mark.parametrize(
    "dtype,stage,targets,dropout,fused",
    [
        (torch.float32, "sft", "all-linear", 0.0, True),
        (torch.float32, "sft", "all-linear", 0.0, False),
        (torch.float32, "sft", ["q_proj", "v_proj"], 0.0, True),
        (torch.float32, "sft", "all-linear", 0.1, True),
        (torch.float32, "sft", ["q_proj", "v_proj"], 0.1, True),
        (torch.bfloat16, "ppo", "all-linear", 0.0, True),  # the PPO engine: bf16 model, no autocast
        (torch.bfloat16, "ppo", "all-linear", 0.0, False),
        (torch.bfloat16, "dpo", "all-linear", 0.0, True),  # TRL's trainers: bf16 model under autocast
        (torch.bfloat16, "sft", "all-linear", 0.1, True),
        (torch.bfloat16, "sft", ["q_proj", "v_proj"], 0.0, True),
    ],
)
def test_layer_activations_match_autograd_saved_tensors(dtype, stage, targets, dropout, fused):
    """The per-layer formula equals what autograd really saves (dedup by storage, parameters excluded).

    With dropout, the recipes' fused LoRA dropout saves what no dropout saves (align.models.lora_dropout).
    """
    measured = _saved_bytes_per_layer_token(2, 3, dtype=dtype, targets=targets, dropout=dropout, fused=fused,
                                            autocast=dtype == torch.bfloat16 and stage != "ppo")
    args = PlanArgs(stage=stage, dtype="fp32" if dtype == torch.float32 else "bf16", quantization="none",
                    lora_r=8, lora_dropout=dropout, target="cpu", fused_swiglu=fused,
                    lora_targets=["all-linear"] if targets == "all-linear" else targets)
    arch = architecture.arch_from_config(TINY_CONFIG, "tiny", "test")
    predicted = plan.layer_activation_bytes(arch, args.target_modules(), 8, plan.numerics(args), fused)
    assert predicted == pytest.approx(measured, abs=1e-6)


# ------------------------------------------------------------------------------------------ monotonicity


def _peak(**kw) -> float:
    return estimate(PlanArgs(**kw)).peak_bytes


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo", "grpo"])
def test_more_batch_or_longer_sequences_need_more_memory(stage):
    base = dict(model="Llama-3.1-8B", stage=stage, quantization="4bit", seq_len=512, micro_batch=2, ppo_response_len=128)
    assert _peak(**{**base, "micro_batch": 4}) > _peak(**base)
    assert _peak(**{**base, "seq_len": 1024}) > _peak(**base)


def test_weights_shrink_with_quantization_and_checkpointing_shrinks_activations():
    weights = {q: estimate(PlanArgs(model="Llama-3.1-8B", quantization=q)).components["weights"] for q in ("none", "8bit", "4bit")}
    assert weights["4bit"] < weights["8bit"] < weights["none"]
    for stage in ("sft", "reward", "dpo"):
        on = estimate(PlanArgs(model="Mistral-7B", stage=stage, gradient_checkpointing=True, seq_len=2048))
        off = estimate(PlanArgs(model="Mistral-7B", stage=stage, gradient_checkpointing=False, seq_len=2048))
        assert on.components["activations"] < off.components["activations"] / 3


def test_dpo_doubles_the_batch_of_sft():
    sft = estimate(PlanArgs(model="Qwen2.5-7B", stage="sft", micro_batch=2, gradient_checkpointing=False))
    dpo_1 = estimate(PlanArgs(model="Qwen2.5-7B", stage="dpo", micro_batch=1, gradient_checkpointing=False))
    assert dpo_1.components["activations"] == pytest.approx(sft.components["activations"])


def test_grpo_is_an_sft_step_on_replies_plus_generation_and_no_critic(tiny_dir):
    """GRPO (TRL) trains one adapter with the fused LM head, like SFT over the same rows; its generation phase is
    PPO's (same KV cache for the same batch and lengths); it keeps no critic or reward adapter, so its persistent
    memory is SFT's and below PPO's; beta 0 drops the reference forward."""
    training = dict(model=tiny_dir, quantization="none", seq_len=96, micro_batch=16, ppo_response_len=32, ppo_rollout_batch=1)
    grpo, sft, ppo = (estimate(PlanArgs(stage=stage, **training)) for stage in ("grpo", "sft", "ppo"))
    assert grpo.peak_phase == "train step" and set(grpo.phases) == {"train step", "generation", "reference forward"}
    assert grpo.trainable_params == sft.trainable_params < ppo.trainable_params
    for part in ("weights", "adapters", "gradients", "optimizer", "activations"):
        assert grpo.components[part] == sft.components[part], part
    generating = dict(training, micro_batch=1, ppo_rollout_batch=64)
    grpo_gen = estimate(PlanArgs(stage="grpo", **generating))
    assert grpo_gen.peak_phase == "generation"
    # by hand: 2 (K and V) x 2 layers x 2 KV heads x 16 head_dim x 2 bytes (bf16) x 64 rows x 96 tokens
    assert grpo_gen.components["kv_cache"] == 2 * 2 * 2 * 16 * 2 * 64 * 96
    assert "reference forward" not in estimate(PlanArgs(stage="grpo", grpo_beta=0.0, **training)).phases


def test_a_grpo_reward_model_adds_a_frozen_copy_of_the_base_beside_the_policy(tiny_dir):
    """recipes/grpo.py --reward outputs/reward loads the reward model as a second base (no LM head) with the frozen
    reward adapter and score head: every phase carries it, and scoring the replies is a phase of its own."""
    from align.models.architecture import resolve_arch
    from align.plan import base_weight_bytes, lora_params

    training = dict(model=tiny_dir, stage="grpo", quantization="none", dtype="fp32", seq_len=96, micro_batch=16, ppo_response_len=32)
    program, model = estimate(PlanArgs(**training)), estimate(PlanArgs(**training, grpo_reward_model=True))
    arch = resolve_arch(tiny_dir)
    expected = base_weight_bytes(arch, "none", 4, with_lm_head=False) + (lora_params(arch, PlanArgs().target_modules(), 16) + arch.hidden + 1) * 4
    assert "reward_model" not in program.components
    assert model.components["reward_model"] == pytest.approx(expected)
    assert set(model.phases) == set(program.phases) | {"reward scoring"}
    for phase, total in program.phases.items():
        assert model.phases[phase] == pytest.approx(total + expected), phase
    assert model.trainable_params == program.trainable_params  # frozen: no gradients or optimizer state
    quantized = estimate(PlanArgs(**{**training, "quantization": "4bit"}, grpo_reward_model=True))
    assert quantized.components["reward_model"] < model.components["reward_model"]


# ------------------------------------------------------------------------------------------ searches


@pytest.mark.parametrize(
    "kw",
    [
        dict(model="Llama-3.1-8B", stage="dpo", gpu_gb=24.0),
        dict(model="Qwen2.5-7B", stage="ppo", gpu_gb=16.0, seq_len=768),
        dict(model="Mistral-7B", stage="sft", gpu_gb=16.0, gradient_checkpointing=False, seq_len=512),
    ],
)
def test_largest_fitting_values_agree_with_the_verdict(kw):
    args = PlanArgs(**kw)
    mb = plan.largest_micro_batch(args)
    assert mb >= 1
    assert estimate(PlanArgs(**{**asdict(args), "micro_batch": mb})).fits
    assert not estimate(PlanArgs(**{**asdict(args), "micro_batch": mb + 1})).fits
    seq = plan.largest_seq_len(args)
    assert estimate(PlanArgs(**{**asdict(args), "seq_len": seq})).fits
    if seq < architecture.resolve_arch(args.model).max_positions:
        assert not estimate(PlanArgs(**{**asdict(args), "seq_len": seq + 1})).fits


def test_nothing_fits_gives_zero():
    args = PlanArgs(model="Llama-3.1-8B", quantization="none", stage="sft", gpu_gb=8.0)
    assert estimate(args).verdict == "does not fit"
    assert plan.largest_micro_batch(args) == 0


# ------------------------------------------------------------------------------------------ models


def test_model_sources(tiny_dir, tmp_path, monkeypatch):
    assert architecture.resolve_arch("meta-llama/Llama-3.1-8B-Instruct") is architecture.PRESETS["Llama-3.1-8B"]
    assert architecture.resolve_arch("HuggingFaceTB/SmolLM2-135M-Instruct").hidden == 576
    assert architecture.resolve_arch(tiny_dir).layers == 2
    # a Hub id whose config.json is in the local cache (the standard cache layout), never the network
    snapshot = tmp_path / "hub" / "models--someorg--tiny-llama" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(TINY_CONFIG))
    (tmp_path / "hub" / "models--someorg--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--someorg--tiny-llama" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert architecture.resolve_arch("someorg/tiny-llama").intermediate == 160
    with pytest.raises(AlignError, match="config.json is not in the\\s+local Hugging Face cache"):
        architecture.resolve_arch("someorg/not-cached-model")


def test_unsupported_or_broken_configs_are_clear_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY_CONFIG, "model_type": "gpt2"}))
    with pytest.raises(AlignError, match="model_type 'gpt2'"):
        architecture.resolve_arch(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in TINY_CONFIG.items() if k != "vocab_size"}))
    with pytest.raises(AlignError, match="missing field 'vocab_size'"):
        architecture.resolve_arch(str(tmp_path))
    with pytest.raises(ConfigError, match="lora_targets"):
        estimate(PlanArgs(lora_targets=["qkv_proj"]))


# ------------------------------------------------------------------------------------------ CLI


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "align.plan", *argv], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def test_cli_prints_a_table_and_a_verdict():
    proc = _cli("--model", "Llama-3.1-8B", "--stage", "dpo", "--quantization", "4bit", "--gpu_gb", "24")
    assert proc.returncode == 0, proc.stderr
    assert "verdict for a 24 GB GPU:" in proc.stdout
    assert "largest micro_batch that fits" in proc.stdout
    for key in ("weights", "adapters", "gradients", "optimizer", "activations", "logits"):
        assert key in proc.stdout


def test_cli_json_is_consistent_with_the_function_api():
    proc = _cli("--model", "Mistral-7B", "--stage", "ppo", "--seq_len", "768", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    est = estimate(PlanArgs(model="Mistral-7B", stage="ppo", seq_len=768))
    assert report["peak_bytes"] == pytest.approx(est.peak_bytes)
    assert report["verdict"] == est.verdict
    assert set(report["verdict_by_gpu_gb"]) == {"8", "12", "16", "24", "48", "80"}


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--stage", "rlhf"], "expected one of"),
        (["--micro_btch", "2"], "unknown option 'micro_btch'"),
        (["--seq_len", "long"], "expected an integer"),
        (["--micro_batch", "0"], "micro_batch: expected a positive integer"),
        (["--model", "nobody/unknown-model"], "config.json"),
    ],
)
def test_cli_bad_input_exits_2_with_one_message(argv, message):
    proc = _cli(*argv)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ the harness


def test_peak_rss_sees_an_allocation():
    """In a fresh process, as bench/step_memory.py measures (a long test session's freed heap would hide the block)."""
    code = (
        "import time, torch\n"
        "from bench.harness.meter import PeakRSS, rss_bytes\n"
        "start = rss_bytes()\n"
        "with PeakRSS() as peak:\n"
        "    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched\n"
        "    time.sleep(0.05)  # held, as a training step holds its activations\n"
        "    del block\n"
        "print(peak.method, peak.peak - start)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    method, grown = proc.stdout.split()
    assert int(grown) >= 60 * 2**20, method


def test_validation_logic_without_a_gpu():
    """The GPU script's settings map onto planner arguments, and the comparison leaves out the CUDA overhead."""
    sys.path.insert(0, str(REPO))
    from bench.validate_planner import CPU_SETTINGS
    from bench.validate_planner_gpu import GPU_SETTINGS

    from bench.harness.planner_check import compare, plan_args_for, planner_table

    assert len(GPU_SETTINGS) >= 6 and len(CPU_SETTINGS) >= 7
    for bench in GPU_SETTINGS:
        args = plan_args_for(bench)
        assert args.target == "cuda" and args.dtype == "bf16"
        est = estimate(args)
        row = compare(bench, est.peak_bytes - est.components["runtime_overhead"], 0.25, subtract_overhead=True)
        assert row["ratio"] == pytest.approx(1.0) and row["within_tolerance"]
        row = compare(bench, 2 * est.peak_bytes, 0.25, subtract_overhead=True)
        assert not row["within_tolerance"]
    table = planner_table([row, {"setting": "x", "error": "boom"}])
    assert table.count("\n") == 3 and "| NO |" in table and "error: boom" in table


def test_bench_step_runs_every_stage_on_a_tiny_model(tiny_model_dir):
    """The measured step really trains: the LoRA weights move for each stage's code path."""
    from bench.harness.memory_step import StepArgs, build, train_step, trainable_parameters

    for stage in ("sft", "dpo", "reward", "ppo"):
        bench = StepArgs(model=tiny_model_dir, stage=stage, seq_len=16, micro_batch=2, lora_r=4, ppo_response_len=4,
                          dpo_reference="adapter_disabled")
        model, _, extras = build(bench)
        model.train()
        params = trainable_parameters(model, extras)
        before = [p.detach().clone() for p in params]
        loss = train_step(bench, model, extras, bench.seq_len, torch.optim.AdamW(params, lr=1e-2))
        assert loss == loss  # finite, not NaN
        assert any(not torch.equal(a, b) for a, b in zip(before, params)), stage


def test_scaling_grid_measures_cells_under_the_budget_and_shows_the_prediction_of_the_rest(tiny_model_dir, tmp_path):
    """bench/scaling.py: a cell within --max_predicted_gb is a real measured step; one above it is not run."""
    sys.path.insert(0, str(REPO))
    from bench.harness.planner_check import plan_args_for
    from bench.scaling import ScalingArgs, cell_setting, main, step_dtype

    grid = ScalingArgs(model=tiny_model_dir, stages=["dpo"], seq_lens=[16], micro_batches=[1, 8])
    small, large = (estimate(plan_args_for(cell_setting(grid, "dpo", 16, mb))).peak_bytes / 2**30 for mb in (1, 8))
    assert small < large
    main(["--out_dir", str(tmp_path), "--model", tiny_model_dir, "--stages", "dpo", "--seq_lens", "16",
          "--micro_batches", "1,8", "--max_predicted_gb", str((small + large) / 2)])
    measured, skipped = json.loads((tmp_path / "scaling.json").read_text())["cells"]
    assert measured["micro_batch"] == 1 and measured["measured_mib"] > 0 and measured["step_s"] > 0
    assert measured["tokens"] == 2 * 16 and measured["predicted_over_measured"] > 0
    assert measured["dtype"] == step_dtype("auto") and measured["setting"].endswith(f"{measured['dtype']} ref=precomputed")
    assert skipped["micro_batch"] == 8 and "skipped" in skipped and "measured_mib" not in skipped
    table = (tmp_path / "scaling.md").read_text()
    assert "| 16 | " in table and "not run / " in table and table.count(" tok/s") == 1
    assert f"### dpo, {measured['dtype']}: " in table


def test_scaling_dtype_auto_is_the_recipes_choice_and_a_named_dtype_is_kept(monkeypatch):
    """bench/scaling.py --dtype: auto resolves as the recipes' dtype auto does on a CPU (bf16 where the CPU computes
    it, else fp32); bf16 and fp32 are passed to every cell unchanged."""
    sys.path.insert(0, str(REPO))
    import align.models.loading
    from bench.scaling import ScalingArgs, cell_setting, step_dtype

    if not torch.cuda.is_available():  # on a CPU-only machine the recipes' own resolution agrees
        assert step_dtype("auto") == ("bf16" if align.models.loading.resolve_dtype("auto") == torch.bfloat16 else "fp32")
    for has_bf16, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(align.models.loading, "cpu_has_bf16", lambda: has_bf16)
        assert step_dtype("auto") == expected and cell_setting(ScalingArgs(), "dpo", 256, 1).dtype == expected
        for name in ("bf16", "fp32"):
            assert cell_setting(ScalingArgs(dtype=name), "ppo", 256, 2).dtype == name
