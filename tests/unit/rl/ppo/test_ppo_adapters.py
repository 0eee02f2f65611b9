"""One base, several adapters: the policy, critic and reward adapters and the reference share one tiny model.

Every test builds the real stack (align.rl.ppo.models.build_models) on a tiny random Llama, with a reward adapter
saved the way recipes/reward.py saves one (a PEFT SEQ_CLS LoRA adapter with the `score` head).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align.config import build_config
from align.errors import ConfigError
from align.records import PromptRecord
from align.rl.ppo.config import CRITIC, POLICY, REWARD, PPOArgs
from align.rl.ppo.models import adapter_phase, build_models, plan_reward
from align.rl.ppo.rewards import reward_function
from align.rl.ppo.trainer import PPOTrainer
from ppo_engine import make_reward_adapter

PROMPTS = [PromptRecord(prompt=[{"role": "user", "content": f"write about {w}"}], constraints=[{"type": "lowercase"}])
           for w in ("rain", "snow", "sun", "wind", "fog", "hail", "mist", "ice")]


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py




def tiny_cfg(model_dir: str, out_dir: Path, **overrides) -> PPOArgs:
    values = dict(model_name_or_path=model_dir, sft_dir=None, reward="verifier", dtype="fp32", output_dir=str(out_dir),
                  rollout_batch_size=8, minibatch_size=4, micro_batch_size=2, forward_batch_size=8, response_length=6,
                  total_updates=2, temperature=1.0, report_to="none", lora_r=4, lora_alpha=8, eval_prompts=None, save_steps=100,
                  learning_rate=1e-2, critic_learning_rate=1e-2)
    values.update(overrides)
    return build_config(PPOArgs, values)


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, tmp_path_factory) -> str:
    return make_reward_adapter(tiny_model_dir, tmp_path_factory.mktemp("rm") / "adapter")


@pytest.fixture(scope="module")
def quant_reward_dir(tiny_quant_model_dir, tmp_path_factory) -> str:
    return make_reward_adapter(tiny_quant_model_dir, tmp_path_factory.mktemp("rm_quant") / "adapter")


@pytest.fixture(params=["none", "4bit"])
def stack(request, tmp_path):
    """The shared stack on a float32 base and on a 4-bit NF4 base (QLoRA: the recipe's default on a GPU;
    bitsandbytes quantizes on the CPU too; the 4-bit stack on the 64-wide tiny model, see conftest.py).
    Tests read the base and reward adapter from cfg.model_name_or_path and cfg.reward_model."""
    quantized = request.param == "4bit"
    base = request.getfixturevalue("tiny_quant_model_dir" if quantized else "tiny_model_dir")
    reward = request.getfixturevalue("quant_reward_dir" if quantized else "reward_dir")
    cfg = tiny_cfg(base, tmp_path / "out", reward="model", reward_model=reward, quantization=request.param)
    models, plan = build_models(cfg)
    assert plan.kind == "shared"
    from align.models.loading import is_quantized

    assert is_quantized(models.model) == (request.param == "4bit")
    return cfg, models, plan


def trainable_names(models) -> set[str]:
    named = list(models.model.named_parameters()) + [(f"value_head.{n}", p) for n, p in models.value_head.named_parameters()]
    named += [(f"reward_head.{n}", p) for n, p in models.reward_head.named_parameters()]
    return {n for n, p in named if p.requires_grad}


def owners(names: set[str]) -> set[str]:
    out = set()
    for n in names:
        for tag, owner in ((f".{POLICY}.", POLICY), (f".{CRITIC}.", CRITIC), (f".{REWARD}.", REWARD), ("value_head.", "value_head"), ("reward_head.", "reward_head")):
            if tag in f".{n}" or n.startswith(tag):
                out.add(owner)
                break
        else:
            out.add("base")
    return out


def test_phases_make_only_their_own_adapter_trainable(stack):
    _, models, _ = stack
    assert trainable_names(models) == set(), "nothing may be trainable outside a training phase"
    with models.phase(POLICY, trainable=True):
        assert models.model.active_adapter == POLICY
        assert owners(trainable_names(models)) == {POLICY}
    with models.phase(CRITIC, trainable=True):
        assert models.model.active_adapter == CRITIC
        assert owners(trainable_names(models)) == {CRITIC, "value_head"}
    # PEFT's set_adapter alone would mark the reward adapter trainable; a scoring phase must not.
    with models.phase(REWARD):
        assert models.model.active_adapter == REWARD
        assert trainable_names(models) == set()
    with models.phase(None):
        assert trainable_names(models) == set()
    assert trainable_names(models) == set()
    assert models.model.active_adapter == POLICY


def test_phase_restores_state_after_an_exception(stack):
    _, models, _ = stack
    with pytest.raises(RuntimeError):
        with models.phase(CRITIC, trainable=True):
            raise RuntimeError("boom")
    assert models.model.active_adapter == POLICY
    assert trainable_names(models) == set()
    with pytest.raises(ValueError, match="no adapter named"):
        with adapter_phase(models.model, "nope"):
            pass


def _logits(models, ids, name):
    mask = torch.ones_like(ids)
    with torch.no_grad(), models.phase(name):
        hidden = models.response_hidden(ids, mask, 1, ids.shape[1] - 1)
        return models.lm_head(hidden)


def test_reference_is_the_base_with_adapters_disabled(stack):
    from align.models.loading import ModelArgs, load_model

    cfg, models, _ = stack
    with torch.no_grad():  # make the policy differ from the base
        for n, p in models.model.named_parameters():
            if f"lora_B.{POLICY}." in n:
                p.normal_(0.0, 0.5)
    ids = torch.tensor([[5, 70, 71, 72, 73, 74, 75, 76]])
    base, _ = load_model(ModelArgs(model_name_or_path=cfg.model_name_or_path, dtype="fp32", quantization=cfg.quantization), lora=False)
    base.eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits[:, :-1]
    torch.testing.assert_close(_logits(models, ids, None), base_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(models, ids, POLICY), base_logits, atol=1e-3)


def test_shared_reward_adapter_scores_like_the_reward_model(stack):
    from align.models.reward_model import load_reward_model, score_texts

    cfg, models, plan = stack
    reward = reward_function(cfg, plan, models)
    replies = ["rain falls softly.", "SNOW", "the sun is out", "wind!", "", "hail hail", "mist", "ice ice baby"]
    rm, rm_tokenizer = load_reward_model(cfg.reward_model, dtype="fp32", quantization=cfg.quantization)
    expected = score_texts(rm, rm_tokenizer, [p.prompt for p in PROMPTS], replies)
    assert len(set(round(x, 4) for x in expected)) > 1, "the tiny reward model must tell replies apart"
    assert reward(PROMPTS, replies) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_critic_starts_as_the_reward_model(stack):
    _, models, _ = stack
    params = dict(models.model.named_parameters())
    reward_lora = {n.replace(f".{REWARD}.", "."): p for n, p in params.items() if f".{REWARD}." in n}
    critic_lora = {n.replace(f".{CRITIC}.", "."): p for n, p in params.items() if f".{CRITIC}." in n}
    assert reward_lora.keys() == critic_lora.keys() and reward_lora
    for key in reward_lora:
        assert torch.equal(reward_lora[key], critic_lora[key])
        assert reward_lora[key].data_ptr() != critic_lora[key].data_ptr(), "the critic must own a copy, not share the reward's"
    assert torch.equal(models.value_head.weight, models.reward_head.weight)


def test_an_update_changes_policy_and_critic_only(stack):
    cfg, models, plan = stack
    reward = reward_function(cfg, plan, models)
    ids = torch.tensor([[5, 70, 71, 72, 73, 74, 75, 76]])
    ref_before = _logits(models, ids, None)

    def snapshot(tag):
        return {n: p.detach().clone() for n, p in models.model.named_parameters() if tag(n)}

    base_before = snapshot(lambda n: "lora_" not in n)
    reward_before = snapshot(lambda n: f".{REWARD}." in n)
    policy_before = snapshot(lambda n: f".{POLICY}." in n)
    critic_before = snapshot(lambda n: f".{CRITIC}." in n)
    reward_head_before = models.reward_head.weight.detach().clone()
    value_head_before = models.value_head.weight.detach().clone()

    PPOTrainer(cfg, models, PROMPTS, reward).train()

    params = dict(models.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in base_before.items()), "base weights changed"
    assert all(torch.equal(params[n], v) for n, v in reward_before.items()), "the reward adapter changed"
    assert torch.equal(models.reward_head.weight, reward_head_before), "the reward head changed"
    assert any(not torch.equal(params[n], v) for n, v in policy_before.items()), "the policy did not train"
    assert any(not torch.equal(params[n], v) for n, v in critic_before.items()), "the critic adapter did not train"
    assert not torch.equal(models.value_head.weight, value_head_before), "the value head did not train"
    torch.testing.assert_close(_logits(models, ids, None), ref_before, rtol=0, atol=0)


def test_reward_plans(tiny_model_dir, reward_dir, tmp_path):
    from align.rl.ppo.models import BaseInfo, _identity

    same = BaseInfo(tiny_model_dir, _identity(tiny_model_dir), "tiny")
    other = BaseInfo("/elsewhere", "/elsewhere", "another base")

    def plan(base, **kw):
        return plan_reward(tiny_cfg(tiny_model_dir, tmp_path, **kw), base)

    assert plan(same, reward="auto", reward_model=reward_dir).kind == "shared"
    separate = plan(other, reward="auto", reward_model=reward_dir)
    assert separate.kind == "separate" and "trained on" in separate.description
    assert plan(same, reward="auto", reward_model=reward_dir, reward_placement="separate").kind == "separate"
    missing = plan(same, reward="auto", reward_model=str(tmp_path / "none"))
    assert (missing.kind, missing.function) == ("function", "verifier") and "no reward model" in missing.description
    assert plan(same, reward="tests.helpers:fn").function == "tests.helpers:fn"
    with pytest.raises(ConfigError, match="reward_model"):
        plan(same, reward="model", reward_model=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="expected auto, model, verifier"):
        plan(same, reward="gold")


def test_separate_reward_model_with_another_tokenizer(tiny_model_dir, tmp_path):
    """A reward model with a different tokenizer and chat template scores the decoded text, re-encoded its way."""
    from align.models.reward_model import load_reward_model, score_texts
    from align.testing import make_tiny_model

    rm_dir = make_tiny_model(tmp_path / "rm_full", task="reward", seed=3)
    config = json.loads((Path(rm_dir) / "tokenizer_config.json").read_text())
    template = "{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}\n{% endfor %}"
    (Path(rm_dir) / "chat_template.jinja").write_text(template)
    config.pop("chat_template", None)
    (Path(rm_dir) / "tokenizer_config.json").write_text(json.dumps(config))
    cfg = tiny_cfg(tiny_model_dir, tmp_path / "out", reward="model", reward_model=rm_dir)
    models, plan = build_models(cfg)
    assert plan.kind == "separate"
    assert REWARD not in models.model.peft_config and models.reward_head is None
    reward = reward_function(cfg, plan, models)
    replies = ["one", "two words", "three more words", "x", "", "yes", "no", "maybe so"]
    rm, rm_tokenizer = load_reward_model(rm_dir, dtype="fp32")
    assert "[user]: write about rain" in rm_tokenizer.apply_chat_template(PROMPTS[0].prompt, tokenize=False)
    assert reward(PROMPTS, replies) == pytest.approx(score_texts(rm, rm_tokenizer, [p.prompt for p in PROMPTS], replies), abs=1e-6)
