"""PPO-ptx (align.rl.ppo.ptx): the demonstrations' tokens, their order, their loss, and what the trainer does with it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from align.errors import ConfigError, DataError
from align.rl.ppo.config import CRITIC, POLICY
from align.rl.ppo.ptx import demonstration_batch, demonstration_indices, encode_demonstrations, process_share, ptx_loss
from align.rl.ppo.rollout import policy_forward
from align.records import SFTExample
from ppo_engine import tiny_cfg, trainer_for

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

EXAMPLES = [SFTExample(messages=[{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w} {w}."}],
                       source=f"demo{i}") for i, w in enumerate(("apple", "bee", "cat", "dog", "eel"))]


def test_ptx_loss_is_the_token_mean_negative_log_likelihood():
    logprobs = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert float(ptx_loss(logprobs, mask)) == pytest.approx((1 + 2 + 3) / 3)


def test_demonstrations_are_the_chat_template_split_at_the_generation_prompt(tiny_model_dir):
    """prompt + reply is the template's own tokens for the whole chat up to its EOS; the prompt is what the
    rollouts are sampled from; the last assistant turn is the reply (earlier turns are context); a demonstration
    longer than max_length is skipped and counted; a reply with no user turn before it is refused by name."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    multi = SFTExample(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}], source="multi")
    demos, too_long = encode_demonstrations(tok, [EXAMPLES[0], multi], max_length=10_000)
    assert too_long == 0 and len(demos) == 2
    for demo, example in zip(demos, [EXAMPLES[0], multi]):
        full = list(tok.apply_chat_template(example.messages, tokenize=True, return_dict=False))
        assert demo.prompt_ids == list(tok.apply_chat_template(example.messages[:-1], add_generation_prompt=True, tokenize=True,
                                                               return_dict=False))
        assert demo.reply_ids[-1] == tok.eos_token_id and demo.reply_ids.count(tok.eos_token_id) == 1
        assert full[:len(demo.prompt_ids) + len(demo.reply_ids)] == demo.prompt_ids + demo.reply_ids
        assert tok.decode(demo.reply_ids, skip_special_tokens=True).strip() == example.messages[-1]["content"]
    assert demos[1].record.prompt == multi.messages[:3]
    shortest = min(len(d.prompt_ids) + len(d.reply_ids) for d in demos)
    kept, too_long = encode_demonstrations(tok, [EXAMPLES[0], multi], max_length=shortest)
    assert (len(kept), too_long) == (1, 1)
    odd = SFTExample(messages=[{"role": "assistant", "content": "first"}, {"role": "user", "content": "then"}], source="odd.jsonl:3")
    with pytest.raises(DataError, match="odd.jsonl:3.*follow a user turn"):
        encode_demonstrations(tok, [odd], max_length=10_000)


def test_demonstration_order_covers_every_demonstration_per_pass_and_splits_over_processes():
    n, batch = 10, 4
    one = [demonstration_indices(n, step, batch, seed=3) for step in range(5)]  # 20 positions: two passes
    flat = [i for step in one for i in step]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10)) and flat[:10] != flat[10:]
    for step in range(5):  # two processes take the halves of what one process would
        assert process_share(one[step], 0, 2) + process_share(one[step], 1, 2) == one[step]
        assert process_share(one[step], 0, 2) != process_share(one[step], 1, 2)
    assert demonstration_indices(n, 0, batch, seed=4) != one[0]


def test_the_ptx_term_is_the_policys_nll_of_the_demonstrations_and_adds_to_the_ppo_gradient(tiny_model_dir, tmp_path):
    """minibatch_gradient with ptx_step: stats['ptx_nll_sum'] / stats['ptx_tokens'] is the token mean of
    -log pi(reply) computed one unpadded demonstration at a time from the policy's own logits, and the policy's
    gradient is the PPO gradient plus ptx_coef x the NLL's gradient (affine in ptx_coef); the critic's gradient does
    not change."""
    cfg = tiny_cfg(tiny_model_dir, tmp_path, ptx_data="inline", ptx_batch_size=3, ptx_coef=1.0)
    demos, _ = encode_demonstrations(AutoTokenizer.from_pretrained(tiny_model_dir), EXAMPLES, 10_000)
    trainer = trainer_for(cfg, demonstrations=demos)
    with torch.no_grad():  # B != 0: the policy is not the base
        generator = torch.Generator().manual_seed(1)
        for p in trainer.policy_params + trainer.critic_params:
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    models = trainer.models
    rollout = trainer.generate(0)
    trainer.score(rollout, 0)
    from align.rl.ppo.advantages import estimate_advantages

    estimate_advantages(rollout, cfg, trainer.kl_ctl.value, trainer.dist)
    rows, token_counts = torch.arange(4), rollout.response_mask.sum(-1).float()

    def grads(coef: float | None) -> tuple[dict, dict]:
        trainer.cfg.ptx_coef = coef or 1.0
        models.model.train()
        try:
            stats = trainer.minibatch_gradient(rollout, rows, token_counts, update=0, ptx_step=None if coef is None else 2)
        finally:
            models.model.eval()
        return {n: p.grad.detach().clone() for n, p in models.model.named_parameters() if p.grad is not None}, stats

    g0, s0 = grads(None)
    g1, s1 = grads(1.0)
    g2, _ = grads(2.0)
    assert "ptx_tokens" not in s0
    picked = [demos[i] for i in demonstration_indices(len(demos), 2, 3, cfg.seed)]
    with torch.no_grad(), models.phase(POLICY):
        total, count = 0.0, 0
        for d in picked:
            ids = torch.tensor([d.prompt_ids + d.reply_ids])
            logp = torch.log_softmax(models.model(input_ids=ids).logits[0, :-1].float(), -1)
            targets = ids[0, 1:]
            total -= float(logp[torch.arange(len(targets)), targets][len(d.prompt_ids) - 1:].sum())
            count += len(d.reply_ids)
    assert s1["ptx_tokens"] == count and s1["ptx_nll_sum"] / count == pytest.approx(total / count, rel=1e-5)
    moved = 0
    for name in g0:
        if f".{POLICY}." in name:
            torch.testing.assert_close(g2[name] - g1[name], g1[name] - g0[name], rtol=1e-4, atol=1e-6, msg=name)
            moved += bool((g1[name] - g0[name]).abs().max() > 1e-6)
        else:
            torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0, msg=name)
    assert moved, "the ptx term reached no policy parameter"


def test_ptx_teaches_the_demonstrations_where_ppo_alone_does_not(tiny_model_dir, tmp_path):
    """The same 12 updates (reward 0 for every reply, no KL penalty: no PPO signal) with and without the ptx term:
    with it the policy's NLL of the demonstrations falls by more than 0.3 nats a token (measured: 5.46 -> 5.05; the
    tiny model's floor is near 5.0, where 50 plain Adam steps on these two demonstrations also stop), logged as
    ptx/nll every update; without it the policy does not move (every advantage is 0 with a zero reward, no KL and a
    zero-initialised value head)."""
    demos, _ = encode_demonstrations(AutoTokenizer.from_pretrained(tiny_model_dir), EXAMPLES[:2], 10_000)

    def final_nll(**overrides) -> tuple[float, list[dict]]:
        cfg = tiny_cfg(tiny_model_dir, tmp_path / str(len(overrides)), total_updates=12, kl_coef=0.0, **overrides)
        trainer = trainer_for(cfg, reward=lambda records, replies: [0.0] * len(replies), demonstrations=demos)
        start = demonstrations_nll(trainer, demos)
        trainer.train()
        return demonstrations_nll(trainer, demos) - start, trainer.history

    with_ptx, history = final_nll(ptx_data="inline", ptx_batch_size=4)
    without, plain_history = final_nll()
    assert all("ptx/nll" in m for m in history) and not any("ptx/nll" in m for m in plain_history)
    assert with_ptx < -0.3 and without == 0.0, (with_ptx, without)


def demonstrations_nll(trainer, demos) -> float:
    """The policy's token-mean NLL of `demos`, all in one batch."""
    models = trainer.models
    batch = demonstration_batch(demos, models.tokenizer.pad_token_id, models.device)
    with torch.no_grad(), models.phase(POLICY):
        logprobs, _ = policy_forward(models, batch, torch.arange(len(demos)), temperature=1.0)
    return float(ptx_loss(logprobs, batch.response_mask))


def test_an_sft_phase_trains_the_demonstrations_alone_before_the_first_update(tiny_model_dir, tmp_path, monkeypatch):
    """sft_steps=20: twenty optimizer steps of the demonstrations' NLL alone, before any rollout, on ptx steps 0-19 (the
    first update's ptx step is then 20: no demonstration is seen twice before a pass ends); the NLL falls, the
    critic's adapter and value head do not move, the policy's scheduled learning rate is back after the phase (the
    PPO schedule starts from its first value), and a checkpoint at update 0 records the phase."""
    from align.rl.ppo import trainer as trainer_module
    from align.rl.ppo.checkpoint import list_checkpoints

    demos, _ = encode_demonstrations(AutoTokenizer.from_pretrained(tiny_model_dir), EXAMPLES, 10_000)
    cfg = tiny_cfg(tiny_model_dir, tmp_path, ptx_data="inline", ptx_batch_size=2, sft_steps=20, total_updates=1,
                   rollout_batch_size=4, lr_scheduler="linear")
    trainer = trainer_for(cfg, demonstrations=demos)
    steps, indices = [], trainer_module.demonstration_indices
    monkeypatch.setattr(trainer_module, "demonstration_indices", lambda n, step, *a: steps.append(step) or indices(n, step, *a))
    critic_before = {n: p.detach().clone() for n, p in trainer.models.model.named_parameters() if f".{CRITIC}." in n}
    head_before = [p.detach().clone() for p in trainer.models.value_head.parameters()]
    scheduled_lr, start_nll = trainer.optimizer.param_groups[0]["lr"], demonstrations_nll(trainer, demos)

    trainer.train(stop_after=0)  # the SFT phase and its checkpoint, no update
    assert steps == list(range(20)) and trainer.update_index == 0
    end_nll = demonstrations_nll(trainer, demos)
    assert end_nll < start_nll - 0.1, (start_nll, end_nll)  # measured 5.53 -> 5.30
    for n, p in trainer.models.model.named_parameters():
        if f".{CRITIC}." in n:
            assert torch.equal(p, critic_before[n]), n
    assert all(torch.equal(p, q) for p, q in zip(trainer.models.value_head.parameters(), head_before))
    assert trainer.optimizer.param_groups[0]["lr"] == scheduled_lr
    assert [c.name for c in list_checkpoints(cfg.output_dir)] == ["update-000000"]
    state = torch.load(list_checkpoints(cfg.output_dir)[0] / "state.pt", weights_only=False)
    assert state["sft_steps"] == 20
    phase = trainer.summary()["sft_phase"]
    assert phase["steps"] == 20 and phase["nll_last_10"] < phase["nll_first_10"]

    trainer.train()  # resumes with the first update: no second SFT phase
    assert steps == list(range(21)) and trainer.update_index == 1


def test_a_non_finite_loss_in_the_sft_phase_names_its_step(tiny_model_dir, tmp_path, monkeypatch):
    """A NaN NLL at the phase's third step stops the run before that optimizer step, named as the phase's step (not
    as an update), with no checkpoint written."""
    from align.rl.ppo import trainer as trainer_module
    from align.rl.ppo.checkpoint import list_checkpoints
    from align.trainers.common import NonFiniteError

    demos, _ = encode_demonstrations(AutoTokenizer.from_pretrained(tiny_model_dir), EXAMPLES, 10_000)
    cfg = tiny_cfg(tiny_model_dir, tmp_path, ptx_data="inline", ptx_batch_size=2, sft_steps=5)
    trainer = trainer_for(cfg, demonstrations=demos)
    calls = []

    def poisoned(logprobs, mask):
        calls.append(1)
        return ptx_loss(logprobs, mask) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(trainer_module, "ptx_loss", poisoned)
    with pytest.raises(NonFiniteError, match=r"^SFT phase step 3: the ptx loss is not finite \(nan\); stopped before the optimizer step"):
        trainer.train()
    assert trainer.sft_steps_done == 0 and not list_checkpoints(cfg.output_dir)


def test_ptx_settings_are_checked(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="ptx_coef"):
        tiny_cfg(tiny_model_dir, tmp_path, ptx_data="ifprefs:sft", ptx_coef=0.0).validate()
    with pytest.raises(ConfigError, match="ptx_batch_size"):
        tiny_cfg(tiny_model_dir, tmp_path, ptx_data="ifprefs:sft", ptx_batch_size=0).validate()
    with pytest.raises(ConfigError, match="no demonstrations"):
        trainer_for(tiny_cfg(tiny_model_dir, tmp_path, ptx_data="ifprefs:sft"), demonstrations=[])
    with pytest.raises(ConfigError, match="sft_steps: 5 steps of SFT need demonstrations"):
        tiny_cfg(tiny_model_dir, tmp_path, sft_steps=5).validate()
    with pytest.raises(ConfigError, match="sft_steps: expected 0 or more"):
        tiny_cfg(tiny_model_dir, tmp_path, ptx_data="ifprefs:sft", sft_steps=-1).validate()
