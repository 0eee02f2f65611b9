"""The PPO engine (align.rl.ppo) in process on tiny models: sampling, identities, invariants, learning, resume,
faults, health, config, rewards. The recipe as a process is tests/integration/test_ppo_recipe.py."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import pytest
import torch

from align.config import parse_config
from align.errors import ConfigError
from align.rl.ppo.checkpoint import list_checkpoints
from align.rl.ppo.config import CRITIC, POLICY, PPOArgs
from align.rl.ppo.advantages import leave_one_out_baseline
from align.rl.ppo.health import HealthStop, health_checks, rollout_metrics
from align.rl.ppo.models import build_models
from align.rl.ppo.rollout import GumbelSampler, row_seed, sample_responses
from align.rl.ppo.trainer import PPOTrainer
from align.trainers.common import NonFiniteError
from ppo_engine import PROMPTS, adapter_state, resume_from_update_2_matches, tiny_cfg, trainer_for
from recipe_harness import reproducible
from repo_paths import REPO

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


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


@pytest.mark.parametrize("critic", ["adapter", "shared"])
def test_rollouts_sample_with_the_adapter_merged_and_leave_every_weight_as_it_was(tiny_model_dir, tmp_path, monkeypatch,
                                                                                   critic):
    """sample_responses merges the trained policy adapter into the base for the sampling (float32: the same draws as
    the unmerged policy on these rows), and afterwards every parameter (base, policy, critic, heads) is bit for bit
    what it was and no layer is left merged; the next update still starts at ratio exactly 1."""
    import align.models.generation as generation
    import align.rl.ppo.rollout as rollout_module

    trainer = trainer_for(tiny_cfg(tiny_model_dir, tmp_path, total_updates=3, critic=critic))
    trainer.train()  # a trained (nonzero) adapter: a merge changes the base weights
    model = trainer.models.model
    assert any(float(p.abs().max()) > 0 for n, p in model.named_parameters() if f"lora_B.{POLICY}" in n)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merges = []

    class counting_merge(generation.merged_adapter):
        def __enter__(self):
            out = super().__enter__()
            merges.append(any(getattr(m, "merged", False) for m in self.model.modules()))
            return out

    seeds = [row_seed(0, 9, i) for i in range(4)]
    monkeypatch.setattr(rollout_module, "merged_adapter", counting_merge)
    merged = sample_responses(trainer.models, PROMPTS[:4], seeds, temperature=1.0, max_new_tokens=6)[2]
    monkeypatch.setattr(rollout_module, "merged_adapter", lambda model: contextlib.nullcontext())
    unmerged = sample_responses(trainer.models, PROMPTS[:4], seeds, temperature=1.0, max_new_tokens=6)[2]
    assert merges == [True], "the policy adapter was merged while sampling"
    assert torch.equal(merged, unmerged)
    assert not any(getattr(m, "merged", False) for m in model.modules())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    monkeypatch.undo()
    trainer.cfg.total_updates = 4
    trainer.train()
    assert trainer.history[-1]["ppo/first_minibatch_ratio_dev"] == 0.0


# --------------------------------------------------------------------------------------------------
# Identities and invariants


@pytest.mark.parametrize("critic", ["adapter", "shared"])
def test_first_minibatch_ratio_is_exactly_one(tiny_model_dir, tmp_path, critic):
    """Dropout is off and the update recomputes the rollout's log-probs on the same rows and widths, so the
    first minibatch (before any optimizer step) has ratio exp(logp - old_logp) == 1 to the last bit; with a
    shared critic too, whose values come out of the same pass."""
    trainer = trainer_for(tiny_cfg(tiny_model_dir, tmp_path, total_updates=2, critic=critic))
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


def test_samples_of_one_prompt_are_adjacent_rows_and_their_scores_are_baselined(tiny_model_dir, tmp_path):
    """samples_per_prompt 2: update u's 8 rows answer the prompts u*4 .. u*4+3 of the shuffle, each twice in adjacent
    rows (the prompts a 4-row update of one sample each would take), and each row's score enters the rewards minus its
    partner's (with no KL penalty the per-token rewards of a row sum to that); the update's metrics count the prompts
    whose samples all scored alike."""
    pairs = trainer_for(tiny_cfg(tiny_model_dir, tmp_path / "k2", rollout_batch_size=8, samples_per_prompt=2, kl_coef=0.0))
    single = trainer_for(tiny_cfg(tiny_model_dir, tmp_path / "k1", rollout_batch_size=4, minibatch_size=4))
    for update in (0, 1):
        records = pairs.batch_records(update)[0]
        assert records[0::2] == records[1::2]
        assert records[0::2] == single.batch_records(update)[0]
        assert len({r.source for r in records}) == 4
    rollout = rollout_with_lengths(pairs, [1, 1, 6, 6, 2, 1, 6, 5])
    torch.testing.assert_close(rollout.rewards.sum(-1), leave_one_out_baseline(rollout.scores, 2))
    assert not torch.allclose(rollout.rewards.sum(-1), rollout.scores)
    assert rollout_metrics(rollout, pairs.cfg, 0.0, pairs.dist)["rollout/groups_without_spread"] == 0.0
    rollout.scores = torch.tensor([0.5, 0.5, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    assert rollout_metrics(rollout, pairs.cfg, 0.0, pairs.dist)["rollout/groups_without_spread"] == 0.75
    assert "rollout/groups_without_spread" not in rollout_metrics(rollout, single.cfg, 0.0, single.dist)


@pytest.mark.parametrize("critic", ["adapter", "shared"])
def test_update_metrics_report_the_critics_explained_variance(tiny_model_dir, tmp_path, critic):
    """values/explained_variance in the update's metrics (from token sums, so processes add up) is
    align.ops.masked.explained_variance of the rollout's values and GAE returns; before any update the critic
    (an untrained head) explains almost nothing of the returns of a reward of +-1/4..+-2."""
    from align.ops.masked import explained_variance

    cfg = tiny_cfg(tiny_model_dir, tmp_path, rollout_batch_size=8, minibatch_size=8, micro_batch_size=8, response_length=6,
                   critic=critic)
    trainer = trainer_for(cfg)
    rollout = rollout_with_lengths(trainer, [1, 1, 6, 6, 2, 1, 6, 5])
    metrics = rollout_metrics(rollout, cfg, cfg.kl_coef, trainer.dist)
    expected = explained_variance(rollout.old_values, rollout.returns, rollout.response_mask)
    assert metrics["values/explained_variance"] == pytest.approx(expected, abs=1e-9)
    assert expected < 0.5


@pytest.mark.parametrize("micro,critic", [(1, "adapter"), (2, "adapter"), (3, "adapter"), (3, "shared")])
def test_gradient_accumulation_gives_the_minibatch_token_mean_gradient(tiny_model_dir, tmp_path, micro, critic):
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
    cfg = tiny_cfg(tiny_model_dir, tmp_path, rollout_batch_size=8, minibatch_size=8, micro_batch_size=8, response_length=6,
                   critic=critic)
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
    for owner in (f".{POLICY}.", "value_head.") + ((f".{CRITIC}.",) if critic == "adapter" else ()):
        assert any(g.abs().max() > 1e-4 for n, g in whole.items() if owner in n), f"no gradient reaches {owner}"
    # rounding errors scale with a tensor's largest entries, not with an entry that cancels to almost 0
    scale = {n: float(g.abs().max()) for n, g in whole.items()}
    used = max(float(((accumulated[n] - whole[n]).abs() / (1e-5 * scale[n] + 1e-5 * whole[n].abs())).max()) for n in whole)
    print(f"micro {micro}: largest difference {used:.3f} of the tolerance")
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5, atol=1e-5 * scale[name], msg=name)


def test_a_shared_critic_is_one_pass_whose_value_loss_also_trains_the_policy(tiny_model_dir, tmp_path):
    """--critic shared: no critic adapter, the value head is the critic's only parameters, and one backward of
    pg_loss + vf_coef * vf_loss: the value head's gradient is proportional to vf_coef (0 at 0) and the policy
    adapter's gradient is affine in vf_coef, moved by the value loss."""
    cfg = tiny_cfg(tiny_model_dir, tmp_path, rollout_batch_size=8, minibatch_size=8, micro_batch_size=3, response_length=6,
                   critic="shared")
    trainer = trainer_for(cfg)
    assert CRITIC not in trainer.models.model.peft_config
    assert trainer.critic_params == list(trainer.models.value_head.parameters())
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in trainer.policy_params + trainer.critic_params:
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    rollout = rollout_with_lengths(trainer, [1, 1, 6, 6, 2, 1, 6, 5])
    rows, token_counts = torch.arange(8), rollout.response_mask.sum(-1).float()

    def gradients(vf_coef: float) -> dict[str, torch.Tensor]:
        trainer.cfg.vf_coef = vf_coef
        trainer.models.model.train()
        try:
            trainer.minibatch_gradient(rollout, rows, token_counts, update=0)
        finally:
            trainer.models.model.eval()
        named = [(n, p) for n, p in trainer.models.model.named_parameters() if f".{POLICY}." in n]
        named += [(f"value_head.{n}", p) for n, p in trainer.models.value_head.named_parameters()]
        return {n: p.grad.detach().clone() for n, p in named}

    g0, g1, g2 = gradients(0.0), gradients(1.0), gradients(2.0)
    heads = [n for n in g0 if n.startswith("value_head.")]
    assert heads and all(float(g0[n].abs().max()) == 0.0 and float(g1[n].abs().max()) > 0 for n in heads)
    for name in heads:
        torch.testing.assert_close(g2[name], 2 * g1[name])
    policy = [n for n in g0 if not n.startswith("value_head.")]
    assert max(float((g1[n] - g0[n]).abs().max()) for n in policy) > 1e-4, "the value loss does not reach the policy"
    for name in policy:
        torch.testing.assert_close(g2[name] - g1[name], g1[name] - g0[name], rtol=1e-4, atol=1e-6)


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


@pytest.mark.parametrize("critic,ptx,sft_steps,split", [("adapter", False, 0, 2), ("shared", False, 0, 2), ("adapter", True, 0, 2),
                                                       ("shared", True, 3, 2), ("shared", True, 3, 0)])
def test_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path, critic, ptx, sft_steps, split):
    """4 updates in one go == `split` updates, a checkpoint, a fresh process state, the rest. Sampling seeds are a
    function of (seed, update, row) and the optimizer, scheduler and KL controller come from the checkpoint,
    so the two runs are bitwise equal (tolerance 0) on one machine with the same thread count. With PPO-ptx the
    demonstrations of a step are a function of (seed, step): 3 of 5 a step, so the resumed half starts mid-pass.
    With an SFT phase (sft_steps) the resumed run does not repeat it, whether it stopped after an update or right
    after the phase (the checkpoint at update 0)."""
    from transformers import AutoTokenizer

    from align.records import SFTExample
    from align.rl.ppo.ptx import encode_demonstrations

    base = dict(total_updates=4, save_steps=2, kl_target=1.0, lr_scheduler="linear", critic=critic)
    demos = []
    if ptx:
        base |= dict(ptx_data="inline", ptx_batch_size=3, sft_steps=sft_steps)
        examples = [SFTExample(messages=[{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} " * (i + 1)}])
                    for i, w in enumerate("abcde")]
        demos = encode_demonstrations(AutoTokenizer.from_pretrained(tiny_model_dir), examples, 10_000)[0]
    whole = trainer_for(tiny_cfg(tiny_model_dir, tmp_path / "whole", **base), demonstrations=demos)
    whole.train()

    cfg = tiny_cfg(tiny_model_dir, tmp_path / "split", **base)
    first = trainer_for(cfg, demonstrations=demos)
    first.train(stop_after=split)
    assert [p.name for p in list_checkpoints(cfg.output_dir)][-1] == f"update-{split:06d}"
    second = trainer_for(cfg, demonstrations=demos)  # new models and optimizer: only the checkpoint carries state
    second.load_checkpoint(list_checkpoints(cfg.output_dir)[-1])
    assert second.update_index == split and second.kl_ctl.value == first.kl_ctl.value
    assert second.sft_steps_done == sft_steps
    second.train()

    a, b = adapter_state(whole), adapter_state(second)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert whole.kl_ctl.value == second.kl_ctl.value
    metrics = [[reproducible(json.loads(x)) for x in (Path(d) / "metrics.jsonl").read_text().splitlines()]
               for d in (tmp_path / "whole", tmp_path / "split")]
    assert [m["step"] for m in metrics[1]] == [1, 2, 3, 4]
    assert metrics[0] == metrics[1]
    assert all(("ptx/nll" in m) == ptx for m in metrics[1])


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
    """The trainer's one-line warning (align.evaluation.degeneration.hacking_warning) on constructed runs: the mean
    reward of the first 3 updates 0.1 (0.0, 0.1, 0.2) and of the last 3 0.4 (0.3, 0.4, 0.5)."""
    from align.rl.ppo.heldout import hacking_warning

    cfg = tiny_cfg("unused", tmp_path)  # health_window 6
    rising = [_metrics(**{"objective/scores": 0.1 * i}) for i in range(6)]
    def block(coherent, degenerate):  # evaluate_heldout's keys (align.evaluation.policy_report.generation_block), 16 prompts
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
    with pytest.raises(ConfigError, match=r"samples_per_prompt \(3\) must divide rollout_batch_size \(8\)"):
        tiny_cfg("m", tmp_path, rollout_batch_size=8, samples_per_prompt=3)
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        tiny_cfg("m", tmp_path, samples_per_prompt=0)


# --------------------------------------------------------------------------------------------------
# Rewards and the SFT base


def test_reward_function_from_a_file(tiny_model_dir, tmp_path):
    from align.rl.ppo.rewards import reward_function

    (tmp_path / "my_rewards.py").write_text("def shortness(prompts, responses):\n    return [-len(r) for r in responses]\n")
    cfg = tiny_cfg(tiny_model_dir, tmp_path, reward=f"{tmp_path / 'my_rewards.py'}:shortness")
    models, plan = build_models(cfg)
    assert plan.kind == "function"
    fn = reward_function(cfg, plan, models)
    assert fn(PROMPTS[:2], ["abc", ""]) == [-3, 0]


def test_verifier_reward_is_guarded_by_default(tiny_model_dir, tmp_path):
    from align.evaluation.verifier import guarded_verifier_reward
    from align.rl.ppo.rewards import reward_function

    cfg = tiny_cfg(tiny_model_dir, tmp_path, reward="verifier")
    assert cfg.reward_guard is True and PPOArgs().reward_guard is True
    models, plan = build_models(cfg)
    assert plan.description == "the built-in verifier (align.evaluation.verifier, guarded: 0 for a degenerate reply)"
    assert reward_function(cfg, plan, models) is guarded_verifier_reward


def test_sft_adapter_is_merged_and_the_policy_loads_on_it(tiny_model_dir, tmp_path):
    """sft_dir holding only an adapter: the base is that adapter merged (so the reference is the SFT model),
    and the saved policy adapter names a merged copy as its base, so load_trained reproduces the policy."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from align.models.loading import ModelArgs, load_model, load_trained, lora_config

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
