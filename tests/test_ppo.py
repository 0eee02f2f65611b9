"""The PPO engine and recipe on tiny models: identities, invariants, learning, resume, faults, end to end."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from align.config import build_config, parse_config
from align.errors import ConfigError
from align.rl.ppo.checkpoint import list_checkpoints
from align.rl.ppo.config import CRITIC, POLICY, PPOArgs
from align.rl.ppo.health import HealthStop, health_checks
from align.rl.ppo.models import build_models
from align.rl.ppo.rollout import GumbelSampler, row_seed, sample_responses
from align.rl.ppo.trainer import PPOTrainer
from align.records import PromptRecord
from align.train import NonFiniteError
from recipe_harness import reproducible

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [PromptRecord(prompt=[{"role": "user", "content": f"say {w}"}], constraints=[{"type": "lowercase"}], source=f"p{i}")
           for i, w in enumerate(("a", "b", "c", "d", "e", "f", "g", "h", "i", "j"))]


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def tiny_cfg(model_dir: str, out_dir: Path, **overrides) -> PPOArgs:
    # quantization none: these tests check CPU numerics with CPU tensors; auto would mean 4-bit on cuda:0 on a GPU
    # machine (tests/test_ppo_adapters.py covers the 4-bit stack)
    values = dict(model_name_or_path=model_dir, sft_dir=None, reward="verifier", dtype="fp32", quantization="none", output_dir=str(out_dir),
                  rollout_batch_size=8, minibatch_size=4, micro_batch_size=2, forward_batch_size=8, response_length=6,
                  total_updates=2, temperature=1.0, report_to="none", lora_r=4, lora_alpha=8, eval_prompts=None, save_steps=100,
                  learning_rate=1e-2, critic_learning_rate=1e-2)
    values.update(overrides)
    return build_config(PPOArgs, values)


def letters_reward(records, responses):
    """Fraction of characters that are lowercase ASCII letters (26 of the tiny tokenizer's 256 bytes)."""
    return [sum("a" <= c <= "z" for c in r) / max(1, len(r)) for r in responses]


def trainer_for(cfg, reward=letters_reward, prompts=PROMPTS, **kwargs) -> PPOTrainer:
    models, _ = build_models(cfg)
    return PPOTrainer(cfg, models, prompts, reward, **kwargs)


def adapter_state(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    state = {n: p.detach().clone() for n, p in trainer.models.model.named_parameters() if f".{POLICY}." in n or f".{CRITIC}." in n}
    state.update({f"value_head.{n}": p.detach().clone() for n, p in trainer.models.value_head.named_parameters()})
    return state


# --------------------------------------------------------------------------------------------------
# Sampling


def test_gumbel_sampler_draws_from_softmax_over_temperature():
    """20,000 rows (one generator each) sampling from softmax([2, 1, 0, -1] / 0.5) = (0.865, 0.117, 0.016,
    0.002): every token's frequency is within 5 standard errors of its probability."""
    n = 20_000
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(n, 4)
    out = GumbelSampler([row_seed(7, 0, i) for i in range(n)], temperature=0.5)(None, logits)
    assert torch.equal(torch.isfinite(out).sum(-1), torch.ones(n, dtype=torch.long)), "one token per row, the rest -inf"
    freq = torch.bincount(out.argmax(-1), minlength=4).double() / n
    probs = torch.softmax(logits[0].double() / 0.5, -1)
    stderr = torch.sqrt(probs * (1 - probs) / n)
    assert torch.all((freq - probs).abs() < 5 * stderr), (freq, probs)


def test_a_rows_sample_does_not_depend_on_its_batch(tiny_model_dir, tmp_path):
    """Rows 0-3 sampled together equal rows {0, 1} and {2, 3} sampled apart (as two processes would)."""
    trainer = trainer_for(tiny_cfg(tiny_model_dir, tmp_path))
    seeds = [row_seed(0, 5, i) for i in range(4)]
    together = sample_responses(trainer.models, PROMPTS[:4], seeds, temperature=1.0, max_new_tokens=6)[2]
    first = sample_responses(trainer.models, PROMPTS[:2], seeds[:2], temperature=1.0, max_new_tokens=6)[2]
    second = sample_responses(trainer.models, PROMPTS[2:4], seeds[2:], temperature=1.0, max_new_tokens=6)[2]
    width = together.shape[1]
    pad = trainer.models.tokenizer.pad_token_id

    def padded(t):
        return torch.cat([t, torch.full((t.shape[0], width - t.shape[1]), pad)], 1)

    assert torch.equal(together, torch.cat([padded(first), padded(second)]))


# --------------------------------------------------------------------------------------------------
# Identities and invariants


def test_first_minibatch_ratio_is_exactly_one(tiny_model_dir, tmp_path):
    """Dropout is off and the update recomputes the rollout's log-probs on the same rows and widths, so the
    first minibatch (before any optimizer step) has ratio exp(logp - old_logp) == 1 to the last bit."""
    trainer = trainer_for(tiny_cfg(tiny_model_dir, tmp_path, total_updates=2))
    trainer.train()
    assert [h["ppo/first_minibatch_ratio_dev"] for h in trainer.history] == [0.0, 0.0]
    assert trainer.history[0]["objective/kl"] == 0.0, "a fresh LoRA adapter (B = 0) is the reference"


def rollout_with_lengths(trainer: PPOTrainer, lengths: list[int]):
    """Phases 2 and 3 of update 0 on responses of the given lengths (random non-special tokens; a response
    shorter than the longest ends with EOS), so that the test decides every micro-batch's token count."""
    from align.rl.ppo.advantages import estimate_advantages
    from align.rl.ppo.rollout import Rollout, encode_prompts, score_rollout

    cfg, models = trainer.cfg, trainer.models
    records, global_rows = trainer.batch_records(0)
    query, query_mask = encode_prompts(models.tokenizer, records, models.device)
    width, eos, pad = max(lengths), models.tokenizer.eos_token_id, models.tokenizer.pad_token_id
    lengths_t = torch.tensor(lengths)
    responses = torch.randint(3, len(models.tokenizer), (len(lengths), width), generator=torch.Generator().manual_seed(0))
    response_mask = torch.arange(width) < lengths_t[:, None]
    contains_eos = lengths_t < width
    responses[contains_eos, lengths_t[contains_eos] - 1] = eos
    responses[~response_mask] = pad
    texts = [models.tokenizer.decode(r[m].tolist(), skip_special_tokens=True) for r, m in zip(responses, response_mask)]
    rollout = Rollout(records, global_rows, query, query_mask, responses, response_mask, contains_eos, texts)
    score_rollout(models, rollout, lambda records, texts: [(-1.0) ** i * (i + 1) / 4 for i in range(len(texts))], cfg, None)
    estimate_advantages(rollout, cfg, cfg.kl_coef, trainer.dist)
    return rollout


@pytest.mark.parametrize("micro", [1, 2, 3])
def test_gradient_accumulation_gives_the_minibatch_token_mean_gradient(tiny_model_dir, tmp_path, micro):
    """TRL's invariant, on gradients: one minibatch of 8 rollouts as one micro-batch of 8, or as micro-batches
    of `micro` rows with accumulation, gives the same policy LoRA, critic LoRA and value-head gradients just
    before the optimizer step. (Not weights after it: Adam's first step is lr * sign(g) wherever |g| >> eps,
    so rounding-level gradient differences become full-learning-rate weight differences.)

    Response lengths 1 1 6 6 2 1 6 5 (28 tokens): micro-batches of 2 hold 2, 12, 3 and 11 tokens, of 3 hold
    8, 9 and 11 tokens. Each loss is the minibatch's token mean, so a micro-batch's token-mean loss is
    weighted by its tokens / 28. The mean of the micro-batch means (weights 1/4 or 1/3, gradient
    accumulation as TRL's PPO trainer does it) would weight a token of a 2-token micro-batch 6x more than a
    token of a 12-token one.

    Tolerance: fp32, and the two computations differ only in summation order (the same rows at the same
    widths; the gradient sums 1, 3, 4 or 8 partial sums), so an entry's error is a few float32 eps (1.2e-7)
    times the magnitude of the terms summed into it, which its tensor's largest entry bounds (an entry that
    cancels to almost 0 keeps the rounding of its terms): rtol 1e-5 plus atol 1e-5 x the tensor's largest
    |entry|. Measured: at most 0.08 of that tolerance; the mean of micro-batch means is 2e4-8e4 times over it,
    gradients not divided by the number of micro-batches 1e5-8e5 times.
    """
    lengths = [1, 1, 6, 6, 2, 1, 6, 5]
    cfg = tiny_cfg(tiny_model_dir, tmp_path, rollout_batch_size=8, minibatch_size=8, micro_batch_size=8, response_length=6)
    trainer = trainer_for(cfg)
    # B != 0: the policy differs from the reference and the lora_A gradients are not zero
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in trainer.policy_params + trainer.critic_params:
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    rollout = rollout_with_lengths(trainer, lengths)
    rows, token_counts = torch.arange(8), rollout.response_mask.sum(-1).float()

    def gradients(micro_batch_size: int) -> dict[str, torch.Tensor]:
        trainer.cfg.micro_batch_size = micro_batch_size
        trainer.models.model.train()
        try:
            stats = trainer.minibatch_gradient(rollout, rows, token_counts, update=0)
        finally:
            trainer.models.model.eval()
        assert stats["tokens"] == sum(lengths)
        named = [(n, p) for n, p in trainer.models.model.named_parameters() if f".{POLICY}." in n or f".{CRITIC}." in n]
        named += [(f"value_head.{n}", p) for n, p in trainer.models.value_head.named_parameters()]
        return {n: p.grad.detach().clone() for n, p in named}

    whole, accumulated = gradients(8), gradients(micro)
    assert whole.keys() == accumulated.keys()
    for owner in (f".{POLICY}.", f".{CRITIC}.", "value_head."):
        assert any(g.abs().max() > 1e-4 for n, g in whole.items() if owner in n), f"no gradient reaches {owner}"
    # rounding errors scale with a tensor's largest entries, not with an entry that cancels to almost 0
    scale = {n: float(g.abs().max()) for n, g in whole.items()}
    used = max(float(((accumulated[n] - whole[n]).abs() / (1e-5 * scale[n] + 1e-5 * whole[n].abs())).max()) for n in whole)
    print(f"micro {micro}: largest difference {used:.3f} of the tolerance")
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5, atol=1e-5 * scale[name], msg=name)


def test_ppo_learns_a_programmable_reward_with_bounded_kl(tmp_path):
    """Reward = fraction of lowercase letters in the response (about 0.1 for the untrained tiny model).
    Over 20 updates the mean score of the last 5 updates must at least double that of the first 5, while the
    KL to the reference stays below 2 nats per token. Measured (seed 1, 1 thread): 0.09 -> 0.24, KL <= 4.3
    nats over 4 tokens."""
    from align.testing import make_tiny_model

    # initializer_range 0.2 (not 0.02): logits of a 32-wide model must be able to move away from uniform
    model_dir = make_tiny_model(tmp_path / "tiny_r02", initializer_range=0.2)
    cfg = tiny_cfg(model_dir, tmp_path / "out", rollout_batch_size=64, minibatch_size=32, micro_batch_size=64, response_length=4,
                   total_updates=20, lora_r=8, lora_alpha=16, learning_rate=1e-2, critic_learning_rate=3e-3, kl_coef=0.05,
                   lam=1.0, seed=1)
    trainer = trainer_for(cfg)
    started = time.time()
    trainer.train()
    scores = [h["objective/scores"] for h in trainer.history]
    kls = [h["objective/kl"] for h in trainer.history]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    print(f"scores first5 {first:.3f} last5 {last:.3f}; max KL {max(kls):.2f}; {time.time() - started:.1f} s")
    assert last > 2 * first and last - first > 0.08, scores
    # bounded, not growing without limit; the trajectory varies with BLAS thread order, so keep headroom
    assert max(kls) < 3.0 * cfg.response_length, kls


# --------------------------------------------------------------------------------------------------
# Checkpoints and resume


def test_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """4 updates in one go == 2 updates, a checkpoint, a fresh process state, 2 more. Sampling seeds are a
    function of (seed, update, row) and the optimizer, scheduler and KL controller come from the checkpoint,
    so the two runs are bitwise equal (tolerance 0) on one machine with the same thread count."""
    base = dict(total_updates=4, save_steps=2, kl_target=1.0, lr_scheduler="linear")
    whole = trainer_for(tiny_cfg(tiny_model_dir, tmp_path / "whole", **base))
    whole.train()

    cfg = tiny_cfg(tiny_model_dir, tmp_path / "split", **base)
    first = trainer_for(cfg)
    first.train(stop_after=2)
    assert [p.name for p in list_checkpoints(cfg.output_dir)] == ["update-000002"]
    second = trainer_for(cfg)  # new models and optimizer: only the checkpoint carries state
    second.load_checkpoint(list_checkpoints(cfg.output_dir)[-1])
    assert second.update_index == 2 and second.kl_ctl.value == first.kl_ctl.value
    second.train()

    a, b = adapter_state(whole), adapter_state(second)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert whole.kl_ctl.value == second.kl_ctl.value
    metrics = [[reproducible(json.loads(x)) for x in (Path(d) / "metrics.jsonl").read_text().splitlines()]
               for d in (tmp_path / "whole", tmp_path / "split")]
    assert [m["step"] for m in metrics[1]] == [1, 2, 3, 4]
    assert metrics[0] == metrics[1]


def test_checkpoint_files_load_with_weights_only(tiny_model_dir, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tmp_path, total_updates=3, save_steps=1, save_total_limit=2)
    trainer_for(cfg).train()
    checkpoints = list_checkpoints(cfg.output_dir)
    assert [p.name for p in checkpoints] == ["update-000002", "update-000003"], "keep the last save_total_limit"
    last = checkpoints[-1]
    state = torch.load(last / "state.pt", weights_only=True)
    assert state["update"] == 3 and state["data_position"] == 24
    assert {"optimizer", "scheduler", "kl_controller"} <= set(state)
    rng = torch.load(last / "rng-rank0.pt", weights_only=True)
    assert {"torch", "python", "numpy"} <= set(rng)
    for sub in ("policy", "critic"):
        assert (last / sub / "adapter_model.safetensors").is_file() and (last / sub / "adapter_config.json").is_file()
    assert (last / "critic" / "value_head.safetensors").is_file()
    assert not list((Path(cfg.output_dir) / "checkpoints").glob(".tmp-*")), "no temporary directories left"


# --------------------------------------------------------------------------------------------------
# Faults and health


def test_nan_reward_stops_with_the_update_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path):
    calls = []

    def reward(records, responses):
        calls.append(1)
        return [float("nan") if len(calls) == 3 else 0.5] * len(responses)

    cfg = tiny_cfg(tiny_model_dir, tmp_path, total_updates=5, save_steps=1)
    trainer = trainer_for(cfg, reward)
    with pytest.raises(NonFiniteError, match=r"update 3: the reward \(scores\) is not finite \(nan\).*update-000002"):
        trainer.train()
    assert [p.name for p in list_checkpoints(cfg.output_dir)] == ["update-000001", "update-000002"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_nan_loss_stops_before_the_optimizer_step(tiny_model_dir, tmp_path, monkeypatch):
    """The policy loss of update 2 is NaN (align.rl.ppo.losses.policy_loss patched from the second update on)."""
    from align.rl.ppo import losses

    cfg = tiny_cfg(tiny_model_dir, tmp_path, total_updates=3, save_steps=1)
    trainer = trainer_for(cfg)
    ppo_update, policy_loss = PPOTrainer.ppo_update, losses.policy_loss
    poisoned = []

    def update(self, rollout, update):
        poisoned[:] = [update + 1 == 2]
        return ppo_update(self, rollout, update)

    def loss(*args, **kwargs):
        value, stats = policy_loss(*args, **kwargs)
        return (value * float("nan") if poisoned[0] else value), stats

    monkeypatch.setattr(PPOTrainer, "ppo_update", update)
    monkeypatch.setattr(losses, "policy_loss", loss)
    with pytest.raises(NonFiniteError, match=r"update 2: the policy loss is not finite.*stopped before the optimizer step"):
        trainer.train()
    assert [p.name for p in list_checkpoints(cfg.output_dir)] == ["update-000001"]


def _metrics(**overrides):
    values = {"objective/kl": 1.0, "ppo/ratio_max": 1.2, "rollout/eos_rate": 0.2, "rollout/length_saturation": 0.8,
              "objective/scores": 0.0, "rollout/response_length": 10.0}
    values.update(overrides)
    return values


def test_health_checks_name_each_problem(tmp_path):
    cfg = tiny_cfg("unused", tmp_path)  # health_window 6: 3 updates against 3

    def check(history):
        return " | ".join(health_checks(list(history), cfg, reward_is_verifier=False))

    steady = [_metrics()] * 6
    assert check(steady) == "", "a base model that rarely ends within response_length is not flagged for it"
    assert "negative mean KL" in check([_metrics(**{"objective/kl": -0.5})])
    assert "negative mean KL" in check([_metrics(**{"objective/kl": -0.5, "objective/kl_stderr": 0.2})])
    # seen on the default model: mean k1 -0.13 over 8 responses whose KL sums spread widely is noise, not a mismatch
    assert check([_metrics(**{"objective/kl": -0.13, "objective/kl_stderr": 0.09})]) == ""
    assert "beyond the budget" in check([_metrics(**{"objective/kl": 50.0})])
    assert "ratio explosion" in check([_metrics(**{"ppo/ratio_max": 30.0})])
    eos = [_metrics(**{"rollout/eos_rate": e}) for e in (0.9, 0.8, 0.9, 0.6, 0.5, 0.4)]
    assert "losing EOS: 0.50 of responses end with EOS over the last 3 updates, 0.87 at the start" in check(eos)
    sat = [_metrics(**{"rollout/length_saturation": x}) for x in (0.1, 0.0, 0.2, 0.5, 0.6, 0.7)]
    assert "responses saturate the length limit: 0.60" in check(sat)
    rising = [_metrics(**{"objective/scores": 0.1 * i, "objective/verifier": 0.8 - 0.1 * i}) for i in range(6)]
    assert "reward gaming?" in check(rising)
    growing = [_metrics(**{"objective/scores": 0.1 * i, "rollout/response_length": 10.0 + 10 * i}) for i in range(6)]
    assert "length gaming?" in check(growing)
    honest = [_metrics(**{"objective/scores": 0.1 * i, "objective/verifier": 0.1 * i}) for i in range(6)]
    assert check(honest) == ""


def test_hacking_warning_from_the_reward_history_and_the_heldout_evals(tmp_path):
    """The trainer's one-line warning (align.degeneration.hacking_warning) on constructed runs: the mean
    reward of the first 3 updates 0.1 (0.0, 0.1, 0.2) and of the last 3 0.4 (0.3, 0.4, 0.5)."""
    from align.rl.ppo.heldout import hacking_warning

    cfg = tiny_cfg("unused", tmp_path)  # health_window 6
    rising = [_metrics(**{"objective/scores": 0.1 * i}) for i in range(6)]
    def block(coherent, degenerate):  # evaluate_heldout's keys (align.policy_report.generation_block), 16 prompts
        return {"verifier/coherent_strict": coherent, "gen/degenerate_share": degenerate, "rows": [{}] * 16}

    before = block(0.25, 0.30)

    def warning(history, after):
        return hacking_warning(history, before, after, cfg.health_window)

    gamed = block(0.125, 0.6875)
    line = warning(rising, gamed)
    assert line.startswith("reward hacking? the training reward rose 0.100 -> 0.400 while on the 16 held-out prompts (greedy) "
                           "coherent strict fell 0.250 -> 0.125 and the degenerate share rose 0.300 -> 0.688")
    assert "\n" not in line
    honest = block(0.3125, 0.3125)
    assert warning(rising, honest) is None, "a degenerate share up 0.0125 (under DEGENERATE_RISE) with coherent strict up is no sign"
    assert warning(list(reversed(rising)), gamed) is None, "a falling reward is not being hacked"
    assert warning(rising[:5], gamed) is None, "fewer than health_window updates: no start and end to compare"


def test_stop_on_health_saves_a_checkpoint_and_stops(tiny_model_dir, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tmp_path, total_updates=4, stop_on_health=True, health_kl_budget=-1.0)
    trainer = trainer_for(cfg)
    with pytest.raises(HealthStop, match="update 1: stopped by --stop_on_health: mean KL 0.000 nats beyond the budget -1.0"):
        trainer.train()
    assert [p.name for p in list_checkpoints(cfg.output_dir)] == ["update-000001"]
    assert json.loads((tmp_path / "summary.json").read_text())["stopped"].startswith("health: mean KL")


# --------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("name", ["ppo_qlora_8b.yaml"])
def test_configs_parse_strictly(name):
    cfg = parse_config(PPOArgs, ["--config", str(REPO / "recipes" / "configs" / name)])
    assert cfg.rollout_batch_size % cfg.minibatch_size == 0


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="minibatch_size"):
        tiny_cfg("m", tmp_path, rollout_batch_size=8, minibatch_size=3)
    with pytest.raises(ConfigError, match="temperature"):
        tiny_cfg("m", tmp_path, temperature=0.0)


# --------------------------------------------------------------------------------------------------
# The recipe, end to end (subprocesses)


def write_prompts(path: Path, n: int = 8, constraints: bool = True) -> str:
    rows = [{"prompt": f"write {i} words about the sea", **({"constraints": [{"type": "lowercase"}]} if constraints else {})}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def recipe_args(model_dir: str, out_dir: Path, prompts: str, *extra: str) -> list[str]:
    return ["--model_name_or_path", model_dir, "--sft_dir", "none", "--dtype", "fp32", "--output_dir", str(out_dir),
            "--prompts", prompts, "--eval_prompts", prompts, "--num_eval_prompts", "4", "--rollout_batch_size", "4",
            "--minibatch_size", "2", "--micro_batch_size", "2", "--forward_batch_size", "4", "--response_length", "6",
            "--total_updates", "2", "--lora_r", "4", "--lora_alpha", "8", "--temperature", "1.0", "--cpu_threads", "1", *extra]


def run_recipe(args: list[str], launcher: list[str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = (launcher or [sys.executable]) + [str(REPO / "recipes" / "ppo.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_recipe_end_to_end_with_the_verifier(tiny_model_dir, tmp_path):
    from align.models import load_trained

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    # raw verifier score: the tiny random model's few bytes are no answer to the guard (0 everywhere, nothing to learn);
    # the guard is the default (test_verifier_reward_is_guarded_by_default)
    result = run_recipe(recipe_args(tiny_model_dir, out, prompts, "--reward", "verifier", "--reward_guard", "false"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reward: the built-in verifier" in result.stderr
    assert "sft_dir is none: the base is the plain model" in result.stderr
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "critic/value_head.safetensors",
                 "config.yaml", "run_info.json", "metrics.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ("objective/kl", "objective/scores", "objective/rlhf_reward", "ppo/approx_kl", "ppo/clipfrac", "ppo/ratio_mean",
                "ppo/ratio_max", "ppo/value_loss", "ppo/value_clipfrac", "objective/entropy", "rollout/response_length",
                "rollout/eos_rate", "objective/beta", "time_s", "perf/tokens"):
        assert all(math.isfinite(m[key]) for m in metrics), key
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates"] == 2 and summary["peak_memory_mb"] > 0 and summary["method"] == "ppo"
    for side in ("heldout_before", "heldout_after"):  # greedy, the block of the other recipes' summaries
        assert set(summary[side]) >= {"verifier/coherent_strict", "verifier/strict", "verifier/score", "gen/degenerate_share",
                                      "gen/unasked_format_share", "verifier/by_constraint", "rows"}
        assert [r["prompt_id"] for r in summary[side]["rows"]] == [r["prompt_id"] for r in summary["heldout_before"]["rows"]]
    assert len(summary["heldout_after"]["rows"]) == 4
    assert "unguarded (reward_guard false)" in summary["reward"]
    assert "coherent strict (strict and not degenerate):" in result.stderr
    card = (out / "adapter" / "README.md").read_text()  # align.model_card's, with the held-out numbers
    assert "Method: PPO with a LoRA critic" in card and f"BASE = {str(Path(tiny_model_dir).resolve())!r}" in card
    assert f"| coherent strict (strict and not degenerate) | {summary['heldout_before']['verifier/coherent_strict']:.3f} |" in card
    model, _ = load_trained(str(out), dtype="fp32")  # the policy loads like any other adapter
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


def test_recipe_end_to_end_with_a_reward_adapter(tiny_model_dir, tmp_path):
    from tests.test_ppo_adapters import make_reward_adapter

    make_reward_adapter(tiny_model_dir, tmp_path / "reward" / "adapter")  # as recipes/reward.py writes outputs/reward
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    result = run_recipe(recipe_args(tiny_model_dir, out, prompts, "--reward_model", str(tmp_path / "reward")))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert "on the shared base" in summary["reward"]
    assert set(summary["heldout_before"]) >= {"verifier/score", "reward"}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("objective/verifier" in m for m in metrics), "the verifier is logged next to a learned reward"


def test_recipe_user_errors_exit_2_with_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import runpy

    prompts = write_prompts(tmp_path / "plain.jsonl", constraints=False)
    cases = [
        (["--reward", "verifier"], "error: reward: the verifier scores prompts by their constraints, and"),
        (["--reward", "no_such_module_xyz:score"], "error: config: reward: cannot import no_such_module_xyz"),
        (["--reward", "model", "--reward_model", str(tmp_path / "nowhere")], "error: config: reward_model:"),
        (["--rollout_batch_size", "5"], "error: config: minibatch_size (2) must divide rollout_batch_size (5)"),
    ]
    for extra, message in cases:  # in-process: the recipe's main() under cli_main, as `python recipes/ppo.py` runs it
        monkeypatch.setattr(sys, "argv", ["ppo.py", *recipe_args(tiny_model_dir, tmp_path / "out", prompts, *extra)])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(REPO / "recipes" / "ppo.py"), run_name="__main__")
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err[-2000:]
        assert message in err and "Traceback" not in err, err[-2000:]


def test_recipe_stop_on_health_exits_after_a_checkpoint(tiny_model_dir, tmp_path):
    """A health check crossing its threshold under --stop_on_health, end to end: the recipe checkpoints,
    writes summary.json with the reason, and exits 2 with one `error:` line naming the check and the
    checkpoint (no traceback). A KL budget of -1 nats is crossed by the first update (KL 0: B = 0)."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    result = run_recipe(recipe_args(tiny_model_dir, out, prompts, "--reward", "verifier", "--num_eval_prompts", "0",
                                    "--total_updates", "4", "--stop_on_health", "true", "--health_kl_budget", "-1"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    checkpoint = out / "checkpoints" / "update-000001"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: update 1: stopped by --stop_on_health: mean KL 0.000 nats beyond the budget -1.0: the policy is "
                      f"drifting far from the reference (checkpoint {checkpoint}; --resume continues)"], result.stderr[-3000:]
    assert [p.name for p in list_checkpoints(out)] == ["update-000001"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates"] == 1 and summary["stopped"].startswith("health: mean KL 0.000 nats beyond the budget")
    assert not (out / "adapter").exists(), "a stopped run leaves a checkpoint, not a final adapter"


def test_reward_function_from_a_file(tiny_model_dir, tmp_path):
    from align.rl.ppo.rewards import reward_function

    (tmp_path / "my_rewards.py").write_text("def shortness(prompts, responses):\n    return [-len(r) for r in responses]\n")
    cfg = tiny_cfg(tiny_model_dir, tmp_path, reward=f"{tmp_path / 'my_rewards.py'}:shortness")
    models, plan = build_models(cfg)
    assert plan.kind == "function"
    fn = reward_function(cfg, plan, models)
    assert fn(PROMPTS[:2], ["abc", ""]) == [-3, 0]


def test_sft_adapter_is_merged_and_the_policy_loads_on_it(tiny_model_dir, tmp_path):
    """sft_dir holding only an adapter: the base is that adapter merged (so the reference is the SFT model),
    and the saved policy adapter names a merged copy as its base, so load_trained reproduces the policy."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from align.models import ModelArgs, load_model, load_trained, lora_config

    sft, tokenizer = load_model(ModelArgs(model_name_or_path=tiny_model_dir, dtype="fp32", quantization="none", lora_r=4), lora=False)
    sft = get_peft_model(sft, lora_config(ModelArgs(lora_r=4, lora_alpha=8)))
    with torch.no_grad():
        for n, p in sft.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5)
    sft.save_pretrained(str(tmp_path / "sft" / "adapter"))
    tokenizer.save_pretrained(str(tmp_path / "sft" / "adapter"))

    cfg = tiny_cfg(tiny_model_dir, tmp_path / "out", sft_dir=str(tmp_path / "sft"), total_updates=1)
    trainer = trainer_for(cfg)
    assert trainer.models.base.name == str(tmp_path / "out" / "sft_merged")
    ids = torch.tensor([[5, 70, 71, 72, 73, 74]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, str(tmp_path / "sft" / "adapter")).eval()
    with torch.no_grad(), trainer.models.phase(None):
        reference = trainer.models.lm_head(trainer.models.response_hidden(ids, torch.ones_like(ids), 1, 5))
        torch.testing.assert_close(reference, expected(input_ids=ids).logits[:, :-1], rtol=1e-4, atol=1e-4)
    trainer.train()
    trainer.save_final()
    loaded, _ = load_trained(str(tmp_path / "out"), dtype="fp32")
    with torch.no_grad(), trainer.models.phase(POLICY):
        policy = trainer.models.lm_head(trainer.models.response_hidden(ids, torch.ones_like(ids), 1, 5))
        torch.testing.assert_close(loaded(input_ids=ids).logits[:, :-1], policy, rtol=1e-4, atol=1e-4)


def test_recipe_sigterm_saves_a_checkpoint_and_resumes(tiny_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    args = recipe_args(tiny_model_dir, out, prompts, "--reward", "verifier", "--total_updates", "40", "--save_steps", "100",
                       "--num_eval_prompts", "0")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "recipes" / "ppo.py"), *args], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    for line in proc.stderr:  # wait for the first update, then interrupt
        lines.append(line)
        if line.startswith("[ppo] update 1/40"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=300)[1]
    assert proc.returncode == 128 + signal.SIGTERM, "".join(lines) + rest
    assert "SIGTERM: checkpoint" in rest
    saved = list_checkpoints(out)
    assert len(saved) == 1
    assert json.loads((out / "summary.json").read_text())["stopped"] == "SIGTERM"
    done = int(saved[0].name.split("-")[1])
    result = run_recipe(args[:-4] + ["--total_updates", str(done + 1), "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {saved[0]}" in result.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, done + 2))


@pytest.mark.slow
def test_two_processes_equal_one(tiny_model_dir, tmp_path):
    """The same global batch on 1 process and on 2 (accelerate, gloo): same prompts, same sampled tokens (each
    row's sampler is seeded by its global index), advantages whitened over the global batch, gradients summed
    over processes. Only float summation order differs (different padding widths, all-reduce), so the final
    adapters agree to 1e-4 and the logged metrics to 1e-3 (relative) after 2 updates."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    extra = ["--reward", "verifier", "--num_eval_prompts", "0", "--report_to", "none", "--micro_batch_size", "1"]
    one = run_recipe(recipe_args(tiny_model_dir, tmp_path / "one", prompts, *extra))
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533"]
    two = run_recipe(recipe_args(tiny_model_dir, tmp_path / "two", prompts, *extra), launcher=launcher)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 process(es)" in two.stderr
    from safetensors.torch import load_file

    for sub, name in (("adapter", "adapter_model.safetensors"), ("critic", "adapter_model.safetensors"), ("critic", "value_head.safetensors")):
        a, b = (load_file(str(tmp_path / run / sub / name)) for run in ("one", "two"))
        assert a.keys() == b.keys()
        worst = max(float((b[k] - a[k]).abs().max()) for k in a)
        print(f"{sub}/{name}: max |2 processes - 1 process| = {worst:.2e}")
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4, msg=f"{sub}/{name}: {key}")
    m1, m2 = ([reproducible(json.loads(x)) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("one", "two"))
    assert len(m1) == len(m2) == 2
    for r1, r2 in zip(m1, m2):
        assert r1.keys() == r2.keys()
        for key in r1:
            assert r2[key] == pytest.approx(r1[key], rel=1e-3, abs=1e-5), key


@pytest.mark.slow
def test_two_process_run_killed_then_resumed_matches_uninterrupted(tiny_model_dir, tmp_path):
    """2 processes, 4 updates, a checkpoint after each. Once update-000001 is complete the launcher and both workers
    are SIGKILLed; `--resume` on 2 processes then ends bitwise equal (tolerance 0) to the uninterrupted 2-process
    run: each row's sampler is seeded by (seed, update, global row), the optimizer, scheduler, KL controller and
    prompt position come from the checkpoint, and gloo sums the same two tensors in the same order."""
    from recipe_harness import kill_tree
    from safetensors.torch import load_file

    prompts = write_prompts(tmp_path / "prompts.jsonl")

    def args(out_dir: Path, *extra: str) -> list[str]:
        argv = recipe_args(tiny_model_dir, out_dir, prompts, "--reward", "verifier", "--num_eval_prompts", "0",
                           "--report_to", "none", "--micro_batch_size", "1", "--save_steps", "1", "--kl_target", "1.0", *extra)
        argv[argv.index("--total_updates") + 1] = "4"
        return argv

    def launcher(port: int) -> list[str]:
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]

    whole = run_recipe(args(tmp_path / "whole"), launcher=launcher(29536))
    assert whole.returncode == 0, whole.stderr[-3000:]

    split = tmp_path / "split"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with (tmp_path / "split.log").open("w") as log:
        process = subprocess.Popen(launcher(29537) + [str(REPO / "recipes" / "ppo.py"), *args(split)], cwd=REPO, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            while not list_checkpoints(split):  # a checkpoint directory appears only once complete (atomic rename)
                if process.poll() is not None or time.time() > deadline:
                    pytest.fail(f"no checkpoint before exit or timeout:\n{(tmp_path / 'split.log').read_text()[-3000:]}")
                time.sleep(0.01)
        finally:
            kill_tree(process)
    saved = [p.name for p in list_checkpoints(split)]
    assert saved[-1] != "update-000004" and not (split / "adapter").exists(), f"the run outran the kill: {saved}"

    resumed = run_recipe(args(split, "--resume"), launcher=launcher(29538))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {split / 'checkpoints' / saved[-1]}" in resumed.stderr
    for sub, name in (("adapter", "adapter_model.safetensors"), ("critic", "adapter_model.safetensors"), ("critic", "value_head.safetensors")):
        a, b = (load_file(str(run / sub / name)) for run in (tmp_path / "whole", split))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{sub}/{name}: {key}"
    m_whole, m_split = ([reproducible(json.loads(x)) for x in (run / "metrics.jsonl").read_text().splitlines()] for run in (tmp_path / "whole", split))
    assert [m["step"] for m in m_split] == [1, 2, 3, 4]
    assert m_whole == m_split


def resume_from_update_2_matches(whole: PPOTrainer, cfg: PPOArgs, whole_dir: Path, out: Path) -> list[list[dict]]:
    """Resume `cfg`'s run from its last checkpoint (update 2), train to the end, and check the adapters are bitwise
    those of the uninterrupted trainer `whole`; returns both runs' reproducible metrics, whole's first."""
    resumed = trainer_for(cfg)
    resumed.load_checkpoint(list_checkpoints(out)[-1])
    assert resumed.update_index == 2
    resumed.train()
    a, b = adapter_state(whole), adapter_state(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    return [[reproducible(json.loads(x)) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (whole_dir, out)]


KILL_MID_CHECKPOINT = """
import os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_ppo import tiny_cfg, trainer_for
trainer = trainer_for(tiny_cfg({model!r}, Path({out!r}), **{options!r}))
real_save = torch.save
def save(obj, f, *args, **kwargs):  # checkpoint 3: the adapters are written, state.pt is not
    if str(f).endswith("state.pt") and trainer.update_index == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
trainer.train()
"""


def test_kill_in_the_middle_of_a_checkpoint_then_resume_matches_uninterrupted(tiny_model_dir, tmp_path):
    """SIGKILL while checkpoint 3 is being written (policy and critic adapters on disk, optimizer state not):
    the half-written checkpoint is never seen under its final name, resume continues from update 2, and the
    finished run is bitwise equal to an uninterrupted one (as in test_resume_equals_an_uninterrupted_run)."""
    options = dict(total_updates=4, save_steps=1, kl_target=1.0, lr_scheduler="linear")
    whole = trainer_for(tiny_cfg(tiny_model_dir, tmp_path / "whole", **options))
    whole.train()

    out = tmp_path / "killed"
    code = KILL_MID_CHECKPOINT.format(tests=str(REPO / "tests"), model=tiny_model_dir, out=str(out), options=options)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [p.name for p in list_checkpoints(out)] == ["update-000001", "update-000002"]  # save_total_limit 2

    cfg = tiny_cfg(tiny_model_dir, out, **options)
    metrics = resume_from_update_2_matches(whole, cfg, tmp_path / "whole", out)
    assert [m["step"] for m in metrics[1]] == [1, 2, 3, 4]
    assert metrics[0] == metrics[1]


def test_disk_full_while_writing_a_checkpoint_keeps_the_last_good_one_then_resume_matches(tiny_model_dir, tmp_path, monkeypatch):
    """ENOSPC from torch.save while checkpoint 3 is written (its policy and critic adapters already on disk): a
    CheckpointWriteError whose one line names the checkpoint and the one kept; no partial copy is left (the
    checkpoint is written to a temporary directory and renamed); resuming from update 2 then equals an
    uninterrupted run, bitwise."""
    import errno

    from align.runs import CheckpointWriteError

    options = dict(total_updates=4, save_steps=1, kl_target=1.0, lr_scheduler="linear")
    whole = trainer_for(tiny_cfg(tiny_model_dir, tmp_path / "whole", **options))
    whole.train()

    out = tmp_path / "full"
    cfg = tiny_cfg(tiny_model_dir, out, **options)
    failing = trainer_for(cfg)
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if Path(f).name == "state.pt" and failing.update_index == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointWriteError) as err:
        failing.train()
    monkeypatch.setattr(torch, "save", real_save)
    kept = out / "checkpoints" / "update-000002"
    assert str(err.value) == (f"could not write checkpoint {out / 'checkpoints' / 'update-000003'}: No space left on device "
                              f"(free some space); the last complete checkpoint {kept} is kept; rerun with --resume true to "
                              "continue from it")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["update-000001", "update-000002"]  # no .tmp-* left

    metrics = resume_from_update_2_matches(whole, cfg, tmp_path / "whole", out)
    assert metrics[0] == metrics[1]


def test_verifier_reward_is_guarded_by_default(tiny_model_dir, tmp_path):
    from align.rl.ppo.rewards import reward_function
    from align.verifier import guarded_verifier_reward

    cfg = tiny_cfg(tiny_model_dir, tmp_path, reward="verifier")
    assert cfg.reward_guard is True and PPOArgs().reward_guard is True
    models, plan = build_models(cfg)
    assert plan.description == "the built-in verifier (align.verifier, guarded: 0 for a degenerate reply)"
    assert reward_function(cfg, plan, models) is guarded_verifier_reward
