"""PEFT methods beyond LoRA (`--peft`): each one trains only its own parameters, each supported (stage, method)
trains a step through its recipe, saves, loads back and generates, and each unsupported one is one clear error
before anything loads."""

import json

import pytest
import torch

from align.errors import ConfigError
from align.models.generation import generate_ids
from align.models.loading import (
    PEFT_METHODS,
    PEFT_UNSUPPORTED,
    PROMPT_LEARNING,
    ModelArgs,
    adapter_method,
    check_peft_supported,
    load_model,
    load_trained,
    peft_config,
)
from recipe_harness import assert_no_traceback, recipe_args, run_cli, run_recipe, tiny_data  # noqa: F401  (tiny_data is a fixture)

# The names a method's own trainable parameters carry (reward: plus the score head, which peft trains with it)
OWN_PARAMS = {"lora": ("lora_A", "lora_B"), "dora": ("lora_A", "lora_B", "lora_magnitude_vector"), "ia3": ("ia3_l",),
              "prompt_tuning": ("prompt_encoder",), "p_tuning": ("prompt_encoder",), "prefix_tuning": ("prompt_encoder",)}
PEFT_CLASSES = {"lora": "LoraConfig", "dora": "LoraConfig", "ia3": "IA3Config", "prompt_tuning": "PromptTuningConfig",
                "p_tuning": "PromptEncoderConfig", "prefix_tuning": "PrefixTuningConfig"}


def test_lora_stays_the_default_and_each_method_is_its_peft_config():
    assert ModelArgs().peft == "lora"
    for method in PEFT_METHODS:
        config = peft_config(ModelArgs(peft=method, num_virtual_tokens=3))
        assert type(config).__name__ == PEFT_CLASSES[method], method
        assert getattr(config, "use_dora", False) == (method == "dora")
        if method in PROMPT_LEARNING:
            assert config.num_virtual_tokens == 3
    assert str(peft_config(ModelArgs(peft="ia3"), "reward").task_type) in ("SEQ_CLS", "TaskType.SEQ_CLS")


@pytest.mark.parametrize("task,method", [(task, m) for task, stage in (("causal_lm", "sft"), ("reward", "reward"))
                                         for m in PEFT_METHODS if m not in PEFT_UNSUPPORTED.get(stage, {})])
def test_one_step_changes_only_the_methods_own_parameters(tiny_model_dir, tiny_reward_dir, one_thread, method, task):
    """Every trainable parameter is the method's own (or the reward score head); one AdamW step moves them and
    leaves every frozen base weight bit-identical."""
    directory = tiny_reward_dir if task == "reward" else tiny_model_dir
    torch.manual_seed(0)
    model, tok = load_model(ModelArgs(model_name_or_path=directory, quantization="none", dtype="fp32", peft=method, lora_r=4,
                                      lora_dropout=0.0, num_virtual_tokens=4), task=task)
    assert adapter_method(model) == method
    own = OWN_PARAMS[method] + (("score",) if task == "reward" else ())
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(key in n for key in own) for n in trainable), sorted(trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = tok(["hello there", "a longer piece of text"], return_tensors="pt", padding=True)
    out = model(**batch) if task == "reward" else model(**batch, labels=batch["input_ids"])
    loss = out.logits.pow(2).mean() if task == "reward" else out.loss
    loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    moved = [n for n, p in trainable.items() if not torch.equal(params[n], p)]
    assert moved and any(not any(k == "score" for k in n.split(".")) for n in moved), moved


def test_weight_methods_start_as_the_base_model(tiny_model_dir):
    """LoRA (B = 0), DoRA (magnitude = the weights' norms) and IA3 (scales = 1) leave a fresh model unchanged."""
    plain, tok = load_model(ModelArgs(model_name_or_path=tiny_model_dir, quantization="none", dtype="fp32"), lora=False)
    batch = tok(["hello there"], return_tensors="pt")
    with torch.no_grad():
        expected = plain(**batch).logits
        for method in ("lora", "dora", "ia3"):
            model, _ = load_model(ModelArgs(model_name_or_path=tiny_model_dir, quantization="none", dtype="fp32", peft=method,
                                            lora_r=4, lora_dropout=0.0))
            torch.testing.assert_close(model.eval()(**batch).logits, expected, rtol=0, atol=1e-5, msg=method)


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("stage,method", [(s, m) for s, methods in PEFT_UNSUPPORTED.items() for m in methods])
def test_unsupported_combination_is_one_clear_error(stage, method):
    with pytest.raises(ConfigError, match=rf"^config: peft: {stage} cannot train {method} \(.+\); use one of lora"):
        check_peft_supported(ModelArgs(peft=method), stage)


def test_adapter_method_without_an_adapter_is_refused():
    with pytest.raises(ConfigError, match="peft: ia3 is an adapter method, but use_lora is false"):
        check_peft_supported(ModelArgs(peft="ia3", use_lora=False), "sft")
    with pytest.raises(ConfigError, match="num_virtual_tokens: expected a positive number, got 0"):
        check_peft_supported(ModelArgs(peft="prompt_tuning", num_virtual_tokens=0), "sft")
    check_peft_supported(ModelArgs(use_lora=False), "sft")  # full fine-tuning, the default method name: fine


def test_ppo_refuses_prompt_tuning_before_loading_anything(tmp_path):
    """The real command line: exit 2, one line, no traceback, nothing written (no model named exists)."""
    out = tmp_path / "ppo"
    result = run_cli(["recipes/ppo.py", "--peft", "prompt_tuning", "--model_name_or_path", str(tmp_path / "no-model"),
                      "--output_dir", str(out)])
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [lines[0]] and "peft: ppo cannot train prompt_tuning" in lines[0], result.stderr[-2000:]
    assert_no_traceback(result.stderr)
    assert not out.exists()


# ------------------------------------------------------------------------------------------ recipes

SUPPORTED = [(stage, method) for stage in ("sft", "reward", "dpo", "grpo") for method in PEFT_METHODS
             if method not in PEFT_UNSUPPORTED.get(stage, {})]


@pytest.mark.parametrize("stage,method", SUPPORTED)
def test_recipe_trains_saves_and_loads_each_method(tiny_model_dir, tiny_data, tmp_path, stage, method):
    """One optimizer step through the recipe; the adapter it saves is the method's, loads back (load_trained /
    load_reward_model) and generates (scores); the model card names the method."""
    out = tmp_path / "run"
    argv = recipe_args(stage, tiny_model_dir, tiny_data, out, max_steps=1, save_steps=10, peft=method, lora_r=4,
                       num_virtual_tokens=4)
    code, log = run_recipe(stage, argv, tmp_path / "run.log")
    assert code == 0, log[-4000:]
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    from align.models.loading import method_of_config

    assert method_of_config(config) == method
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["train_loss"] == summary["train_loss"]  # finite, not NaN
    card = (adapter / "README.md").read_text()
    assert f"{method} adapter" in card.lower() or f"peft method {method}" in card.lower(), card[:1500]
    assert ("generate_ids(model" in card) == (method in PROMPT_LEARNING and stage != "reward")  # peft's generate is wrong for them
    if stage == "dpo" and method in PROMPT_LEARNING:
        assert "prompt-learning adapter" in log and "stock log-probs" in log  # the fast path steps aside
    if stage == "reward":
        from align.models.reward_model import load_reward_model, score_texts

        model, tok = load_reward_model(str(out), dtype="fp32")
        scores = score_texts(model, tok, [[{"role": "user", "content": "hi"}]], ["hello"], batch_size=1)
        assert len(scores) == 1 and scores[0] == scores[0]
        return
    model, tok = load_trained(str(out), dtype="fp32")
    assert adapter_method(model) == method
    batch = tok(["hello"], return_tensors="pt")
    with torch.no_grad():
        generated = generate_ids(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 3


def test_sft_with_prompt_tuning_skips_the_merge(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    argv = recipe_args("sft", tiny_model_dir, tiny_data, out, max_steps=1, save_steps=10, peft="prompt_tuning",
                       num_virtual_tokens=4, merge="true")
    code, log = run_recipe("sft", argv, tmp_path / "run.log")
    assert code == 0, log[-4000:]
    assert "merge false: a prompt_tuning adapter is virtual tokens" in log
    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / "merged").exists()
    assert "merge: false" in (out / "config.yaml").read_text()


def test_ppo_trains_a_dora_policy_and_critic(tiny_model_dir, tmp_path, one_thread):
    """PPO's shared base takes DoRA (a LoRA variant: the same adapter switching): one update moves only the policy
    and critic adapters' own parameters, and the saved policy adapter is DoRA and loads back."""
    from ppo_engine import PROMPTS, letters_reward, tiny_cfg

    from align.rl.ppo.checkpoint import export_adapter
    from align.rl.ppo.config import CRITIC, POLICY
    from align.rl.ppo.models import build_models
    from align.rl.ppo.trainer import PPOTrainer

    cfg = tiny_cfg(tiny_model_dir, tmp_path / "ppo", peft="dora", total_updates=1)
    models, _ = build_models(cfg)
    params = dict(models.model.named_parameters())
    assert any("lora_magnitude_vector" in n and f".{POLICY}" in n for n in params)
    before = {n: p.detach().clone() for n, p in params.items()}
    PPOTrainer(cfg, models, PROMPTS, letters_reward).train()
    moved = [n for n, p in models.model.named_parameters() if not torch.equal(p, before[n])]
    assert moved and all(("lora_" in n) and (f".{POLICY}" in n or f".{CRITIC}" in n) for n in moved), moved
    export_adapter(models, POLICY, tmp_path / "saved")  # as the recipe saves output_dir/adapter
    model, tok = load_trained(str(tmp_path / "saved"), dtype="fp32")
    assert adapter_method(model) == "dora"
    with torch.no_grad():
        logits = model(**tok(["hello"], return_tensors="pt")).logits
        reference = models.model(**tok(["hello"], return_tensors="pt")).logits  # the policy adapter is active
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)
