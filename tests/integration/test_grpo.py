"""GRPO and RLOO (recipes/grpo.py over TRL's GRPOTrainer / RLOOTrainer): the recipe as a real process on the tiny
model with the verifier, with a reward model plus a weighted function, with RLOO; resume after SIGTERM equals an
uninterrupted run; bad reward specs end with one line and exit 2; and the reward adapter (align.trainers.grpo) on its own."""

from __future__ import annotations

import json
import math
import runpy
import signal
import sys

import pytest

from recipe_harness import (  # noqa: F401  (tiny_data is a fixture)
    REPO,
    adapter_tensors,
    assert_no_traceback,
    assert_same_run,
    complete_checkpoints,
    metric_records,
    recipe_args,
    run_recipe,
    start_recipe,
    tiny_data,
)

from align.errors import ConfigError
from align.records import PromptRecord
from align.trainers.common import NonFiniteError
from align.trainers.grpo import parse_rewards, prompt_dataset, trl_reward_func

# What TRL logs each step, namespaced by align.trainers.common.MetricsFile (plus completions/eos_rate from align.trainers.grpo).
STEP_KEYS = ("train/loss", "train/reward", "train/reward_std", "train/kl", "train/entropy", "clip_ratio/region_mean",
             "completions/mean_length", "completions/clipped_ratio", "completions/eos_rate")


def _steps(out) -> list[dict]:
    return [m for m in metric_records(out) if "train/loss" in m]


# ------------------------------------------------------------------------------------------ the reward adapter


RECORDS = [PromptRecord([{"role": "user", "content": f"q{i}"}], source=f"p.jsonl line {i + 1}", constraints=[{"type": "lowercase"}])
           for i in range(3)]


def test_trl_reward_func_passes_each_reply_its_own_prompt_record():
    seen = []

    def fn(records, responses):
        seen.append(([r.source for r in records], responses))
        return [len(r) for r in responses]

    reward = trl_reward_func(fn, "length", RECORDS)
    completions = [[{"role": "assistant", "content": "ab"}], [{"role": "assistant", "content": "abcd"}], [{"role": "assistant", "content": "x"}]]
    # TRL repeats each dataset column once per reply: replies 0 and 1 answer prompt 2, reply 2 answers prompt 0
    assert reward(prompts=[None] * 3, completions=completions, record=[2, 2, 0], constraints=["[]"] * 3) == [2.0, 4.0, 1.0]
    assert seen == [(["p.jsonl line 3", "p.jsonl line 3", "p.jsonl line 1"], ["ab", "abcd", "x"])]
    assert reward.__name__ == "length"  # TRL logs rewards/length/mean


def test_a_nan_reward_stops_naming_the_reward_and_the_prompt():
    reward = trl_reward_func(lambda records, responses: [0.5, float("nan")], "mine", RECORDS)
    with pytest.raises(NonFiniteError, match=r"reward mine is nan for p.jsonl line 2"):
        reward(prompts=[None] * 2, completions=["a", "b"], record=[0, 1])


def test_prompt_rows_keep_the_constraints_and_the_record_index():
    rows = prompt_dataset(RECORDS)
    assert rows[1]["record"] == 1 and json.loads(rows[1]["constraints"]) == [{"type": "lowercase"}]
    assert rows[1]["prompt"] == [{"role": "user", "content": "q1"}]


def test_reward_specs(tmp_path, tiny_reward_dir):
    (tmp_path / "mine.py").write_text("def score(records, responses):\n    return [0.0] * len(responses)\n")
    specs = parse_rewards(["verifier", tiny_reward_dir, f"{tmp_path / 'mine.py'}:score", tiny_reward_dir])
    assert [(s.kind, s.name) for s in specs] == [("verifier", "verifier"), ("model", "reward_model"), ("function", "score"),
                                                 ("model", "reward_model_2")]
    for bad, message in [("verifer", "is not 'verifier', an existing reward-model directory"),
                         (str(tmp_path), "is a directory but holds no reward model"),
                         (f"{tmp_path / 'nope.py'}:score", "not found"),
                         (f"{tmp_path / 'mine.py'}:missing", "has no function 'missing'")]:
        with pytest.raises(ConfigError, match=f"config: reward: .*{message}"):
            parse_rewards([bad])


# ------------------------------------------------------------------------------------------ the recipe, end to end


def test_grpo_with_the_verifier(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    # The raw verifier score: the tiny random model writes a few bytes, which the guard pays 0 as no answer, and a
    # reward of 0 everywhere would leave nothing to learn (the guard is the default: test_the_verifier_reward_is_guarded_by_default)
    argv = recipe_args("grpo", tiny_model_dir, tiny_data, out, eval_data=tiny_data["prompts"], summary_prompts=4,
                       summary_max_new_tokens=8, reward_guard="false")
    code, log = run_recipe("grpo", argv, tmp_path / "run.log")
    assert code == 0, log[-3000:]
    for name in ("adapter/adapter_model.safetensors", "config.yaml", "run_info.json", "metrics.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "run_info.json").read_text())["stage"] == "grpo"
    assert "grpo: reward 1 x the built-in verifier (align.evaluation.verifier, unguarded)" in log
    assert "grpo: malloc: mmap threshold" in log  # freed activations go back to the OS (return_freed_memory)

    steps = _steps(out)
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    for key in STEP_KEYS + ("rewards/verifier/mean",):
        assert all(math.isfinite(m[key]) for m in steps), key
    for m in steps:  # one reward of weight 1: the total is the verifier's, a share of constraints met
        assert m["train/reward"] == pytest.approx(m["rewards/verifier/mean"]) and 0 <= m["train/reward"] <= 1
        assert m["completions/eos_rate"] == pytest.approx(1 - m["completions/clipped_ratio"])
    # The reference is the base with the adapter disabled: at step 1 the fresh LoRA (B = 0) IS the base, so the KL is
    # exactly 0; it is not once the adapter has moved.
    assert steps[0]["train/kl"] == 0.0
    assert max(m["train/kl"] for m in steps[1:]) > 0
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter_tensors(out / "adapter").items())

    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "grpo" and summary["steps"] == 4 and summary["peak_memory_mb"] > 0
    for block in ("before", "after"):
        assert summary[block]["verifier/prompts"] == 4 and len(summary[block]["rows"]) == 4
    assert "[align] starting model -> trained policy (0 pairs, 4 prompts):" in log
    assert "coherent strict (strict and not degenerate):" in log and "paired 95% CI" in log
    card = (out / "adapter" / "README.md").read_text()  # align.publish.model_card's, with the summary's numbers
    assert "Method: GRPO, advantage (reward - group mean) / group std" in card and f"`{tiny_data['prompts']}` (8 prompts used)" in card
    assert f"| coherent strict (strict and not degenerate) | {summary['before']['verifier/coherent_strict']:.3f} |" in card


def test_grpo_with_a_reward_model_and_a_weighted_function(tiny_model_dir, tiny_reward_dir, tiny_data, tmp_path):
    (tmp_path / "my_rewards.py").write_text("def shortness(records, responses):\n"
                                            "    return [-len(r) / 10 for r in responses]\n")
    out = tmp_path / "run"
    argv = recipe_args("grpo", tiny_model_dir, tiny_data, out, max_steps=2,
                       reward=f"{tiny_reward_dir},{tmp_path / 'my_rewards.py'}:shortness", reward_weights="1.0,0.5")
    code, log = run_recipe("grpo", argv, tmp_path / "run.log")
    assert code == 0, log[-3000:]
    assert f"1 x the reward model {tiny_reward_dir} + 0.5 x the Python function" in log
    for m in _steps(out):  # TRL's weighted sum, per step: the total is 1.0 x the model's mean + 0.5 x the function's
        expected = m["rewards/reward_model/mean"] + 0.5 * m["rewards/shortness/mean"]
        assert m["train/reward"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert m["rewards/shortness/mean"] < 0 and m["rewards/reward_model/std"] > 0  # both really scored


def test_rloo_with_the_verifier(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    code, log = run_recipe("grpo", recipe_args("grpo", tiny_model_dir, tiny_data, out, algorithm="rloo", max_steps=2),
                           tmp_path / "run.log")
    assert code == 0, log[-3000:]
    steps = _steps(out)
    assert [m["step"] for m in steps] == [1, 2]
    for key in STEP_KEYS:
        assert all(math.isfinite(m[key]) for m in steps), key
    # RLOO folds the KL into the reward (reward - beta * KL); at step 1 the KL is 0, so the total is the verifier's
    assert steps[0]["train/kl"] == 0.0 and steps[0]["train/reward"] == pytest.approx(steps[0]["rewards/verifier/mean"])
    assert json.loads((out / "summary.json").read_text())["method"] == "rloo"
    assert json.loads((out / "run_info.json").read_text())["stage"] == "rloo"


def test_sigterm_then_resume_equals_an_uninterrupted_run(tiny_model_dir, tiny_data, tmp_path):
    """Sampling resumes bit for bit: replies are drawn from torch's global generator, which the HF Trainer saves in
    each checkpoint (rng_state.pth) and restores on --resume, and TRL's prompt order (RepeatSampler) is a fixed
    permutation of the seed. Generation happens every step (steps_per_generation = gradient accumulation = 1), so
    no buffered replies are lost with the process."""
    reference = tmp_path / "reference"
    code, log = run_recipe("grpo", recipe_args("grpo", tiny_model_dir, tiny_data, reference), tmp_path / "reference.log")
    assert code == 0, log[-3000:]

    out = tmp_path / "run"
    run = start_recipe("grpo", recipe_args("grpo", tiny_model_dir, tiny_data, out, save_steps=3), tmp_path / "1.log", hold_after_step=2)
    run.wait_for(lambda: "[harness] holding after step 2" in run.text(), "step 2")
    run.signal(signal.SIGTERM)
    assert run.wait() == 143, run.text()[-3000:]
    assert complete_checkpoints(out) == [2]  # off the save_steps grid: saved because of the signal
    assert_no_traceback(run.text())

    code, log = run_recipe("grpo", recipe_args("grpo", tiny_model_dir, tiny_data, out, save_steps=3, resume="true"), tmp_path / "2.log")
    assert code == 0, log[-3000:]
    assert f"resuming from {out / 'checkpoint-2'}" in log
    assert_same_run(reference, out, 4)


def test_bad_reward_specs_and_vllm_on_a_cpu_end_with_one_line_and_exit_2(tiny_model_dir, tiny_data, tmp_path, monkeypatch, capsys):
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": f"say {w}"}) + "\n" for w in ("a", "b")))
    cases = [
        (dict(reward="verifer"), "error: config: reward: 'verifer' is not 'verifier', an existing reward-model directory"),
        (dict(reward=f"{tmp_path / 'none.py'}:score"), f"error: config: reward: file {tmp_path / 'none.py'} not found"),
        (dict(reward=str(tmp_path)), f"error: config: reward: {tmp_path} is a directory but holds no reward model"),
        (dict(reward="verifier", reward_weights="1.0,0.5"), "error: config: reward_weights: 2 weights for 1 rewards (verifier)"),
        (dict(train_data=str(plain)), "error: reward: the verifier scores prompts by their constraints, and"),
        (dict(use_vllm="true"), "error: config: use_vllm: vLLM generation needs a CUDA GPU, and this machine has none"),
        (dict(num_generations=3), "error: config: num_generations (3) must divide the replies per step"),
    ]
    for flags, message in cases:  # in-process: main() under cli_main, as `python recipes/grpo.py` runs it
        monkeypatch.setattr(sys, "argv", ["grpo.py", *recipe_args("grpo", tiny_model_dir, tiny_data, tmp_path / "out", **flags)])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(REPO / "recipes" / "grpo.py"), run_name="__main__")
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err[-2000:]
        assert message in err, err[-2000:]
        assert [line for line in err.splitlines() if line.startswith("error:")] == [err.strip().splitlines()[-1]]
        assert_no_traceback(err)


def test_the_verifier_reward_is_guarded_by_default():
    """GRPOArgs.reward_guard defaults to true (tests/unit/test_config.py parses the recipe configs strictly)."""
    from align.evaluation.verifier import guarded_verifier_reward
    from align.trainers.grpo import load_reward, parse_rewards
    (spec,) = parse_rewards(["verifier"])
    assert spec.describe(True) == "the built-in verifier (align.evaluation.verifier, guarded: 0 for a degenerate reply)"
    assert load_reward(spec, guard=True) is guarded_verifier_reward
