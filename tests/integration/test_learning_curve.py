"""bench/learning_curve.py end to end on the tiny model: one constant-LR SFT run, two checkpoints evaluated
against the starting model, the JSON and the plot; a second call reuses everything already done."""

import json

import pytest

from recipe_harness import REPO, recipe_args, run_cli, tiny_data  # noqa: F401  (tiny_data is a fixture)


def sft_curve_flags(tiny_model_dir, tiny_data) -> list[str]:
    """The SFT recipe's test flags less those the learning-curve script sets itself (output, steps, saving)."""
    flags = recipe_args("sft", tiny_model_dir, tiny_data, "unused")
    drop = ("--output_dir", "--max_steps", "--save_steps", "--save_total_limit")
    return [f for i, f in enumerate(flags) if f not in drop and flags[i - 1] not in drop]


def test_sft_curve_on_the_tiny_model(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "curve"
    flags = sft_curve_flags(tiny_model_dir, tiny_data)
    cmd = ["bench/learning_curve.py", "--recipe", "sft", "--steps", "1,2", "--out", str(out), "--eval_prompts", "2", "--", *flags]
    result = run_cli(cmd, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    curve = json.loads((out / "learning_curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [1, 2]
    assert curve["points"][0]["tokens"] > 0 and curve["points"][1]["tokens"] > curve["points"][0]["tokens"]
    # seconds come from the trainer's log (train_runtime) rounded to 0.1 s: two steps of the tiny model can take under 0.05 s
    assert curve["points"][1]["train_seconds"] >= curve["points"][0]["train_seconds"] >= 0
    for p in curve["points"]:
        for key in ("coherent_strict", "verifier_strict", "verifier_score", "degenerate", "unasked_format", "eos"):
            m = p["metrics"][key]
            assert m["n"] == 2 and m["lo"] <= m["mean"] <= m["hi"]
            assert abs(m["run_mean"] - m["baseline_mean"] - m["mean"]) < 1e-3
    # the starting model is the recipe's own (the tiny model), evaluated on the same two prompts
    base = [json.loads(line) for line in (out / "eval-base" / "generations.jsonl").read_text().splitlines()]
    step2 = [json.loads(line) for line in (out / "eval-step-2" / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt_id"] for r in base] == [r["prompt_id"] for r in step2] and len(base) == 2
    assert "lr_scheduler_type: constant" in (out / "run" / "config.yaml").read_text()
    assert (out / "learning_curve.png").stat().st_size > 1000

    again = run_cli(cmd, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "$ " not in again.stdout  # nothing launched or evaluated again
    assert json.loads((out / "learning_curve.json").read_text())["points"] == curve["points"]

    # a longer curve continues the run from its last checkpoint (same constant schedule) and evaluates only step 3
    longer = run_cli([*cmd[:4], "1,2,3", *cmd[5:]], timeout=600)
    assert longer.returncode == 0, longer.stdout + longer.stderr
    launched = [line for line in longer.stdout.splitlines() if line.startswith("$ ")]
    assert len(launched) == 2 and "--resume true" in launched[0] and "checkpoint-3 " in launched[1]
    extended = json.loads((out / "learning_curve.json").read_text())["points"]
    assert extended[:2] == curve["points"] and extended[2]["step"] == 3
    assert extended[2]["tokens"] > extended[1]["tokens"]


def test_a_linear_schedule_decays_over_the_curve_and_is_not_extended(tiny_model_dir, tiny_data, tmp_path):
    """--lr_scheduler linear: the one run decays its rate to 0 at the last step (the recipe's own schedule, in its
    config.yaml and the JSON); asking that finished run for a longer curve is one clear error, nothing launched."""
    out = tmp_path / "curve"
    flags = sft_curve_flags(tiny_model_dir, tiny_data)
    cmd = ["bench/learning_curve.py", "--lr_scheduler", "linear", "--recipe", "sft", "--steps", "1,2", "--out", str(out),
           "--eval_prompts", "2", "--", *flags]
    result = run_cli(cmd, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lr_scheduler_type: linear" in (out / "run" / "config.yaml").read_text()
    curve = json.loads((out / "learning_curve.json").read_text())
    assert curve["lr_scheduler_type"] == "linear" and [p["step"] for p in curve["points"]] == [1, 2]

    longer = run_cli([*cmd[:6], "1,2,3", *cmd[7:]], timeout=600)
    assert longer.returncode != 0
    assert "--lr_scheduler linear: " in longer.stderr and "cannot be extended to 3; expected a new --out" in longer.stderr
    assert "$ accelerate" not in longer.stdout


def test_bad_steps_are_one_clear_error(tmp_path):
    result = run_cli(["bench/learning_curve.py", "--recipe", "sft", "--steps", "10,x", "--out", str(tmp_path / "c")])
    assert result.returncode != 0
    assert "--steps: expected comma-separated step counts, got '10,x'" in result.stderr


def test_seconds_of_a_resumed_run_add_up(tmp_path):
    """trainer_state.json of a resumed run logs train_runtime from 0 again; the cost sums the segments."""
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    from learning_curve import checkpoint_cost

    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    history = [{"step": 1, "train_runtime": 10.0}, {"step": 2, "train_runtime": 20.0}, {"step": 2, "eval": 1},
               {"step": 3, "train_runtime": 4.0}, {"step": 4, "train_runtime": 9.5, "num_input_tokens_seen": 400}]
    (checkpoint / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert checkpoint_cost(checkpoint) == {"step": 4, "tokens": 400, "train_seconds": 29.5}


@pytest.mark.parametrize("sft_phase", [False, True])
def test_ppo_curve_evaluates_the_policy_adapter_of_each_update(tiny_model_dir, tmp_path, sft_phase):
    """--recipe ppo: one constant-LR PPO run with checkpoints/update-N at every step asked for; each checkpoint's
    policy adapter answers the held-out prompts; tokens and seconds come from the checkpoint's state. With an SFT
    phase (--sft_steps) step 0 is the checkpoint after it: no rollout yet."""
    from test_ppo_recipe import recipe_args as ppo_args, write_demonstrations, write_prompts

    out = tmp_path / "curve"
    drop = {"--output_dir", "--total_updates", "--num_eval_prompts"}
    sft = ["--ptx_data", write_demonstrations(tmp_path / "demos.jsonl"), "--ptx_batch_size", "2", "--sft_steps", "3"] if sft_phase else []
    flags = ppo_args(tiny_model_dir, "unused", write_prompts(tmp_path / "prompts.jsonl"), "--reward", "verifier", *sft)
    flags = [f for i, f in enumerate(flags) if f not in drop and flags[i - 1] not in drop]
    steps = [0, 1, 2] if sft_phase else [1, 2]
    result = run_cli(["bench/learning_curve.py", "--recipe", "ppo", "--steps", ",".join(map(str, steps)), "--out", str(out),
                      "--eval_prompts", "2", "--", *flags], timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    curve = json.loads((out / "learning_curve.json").read_text())
    points = curve["points"]
    assert [p["step"] for p in points] == steps
    if sft_phase:  # the tiny model's 3 steps may take under the 0.1 s the seconds are rounded to
        assert points[0]["tokens"] == 0 and 0 <= points[0]["train_seconds"] <= points[1]["train_seconds"], points[:2]
        points = points[1:]
    assert 0 < points[0]["tokens"] < points[1]["tokens"]
    assert 0 < points[0]["train_seconds"] <= points[1]["train_seconds"]
    evaluated = [line for line in result.stdout.splitlines() if line.startswith("$ ") and "eval/evaluate.py" in line]
    assert evaluated[0].split()[3] == tiny_model_dir and evaluated[-1].split()[3].endswith("checkpoints/update-000002/policy")
    assert "lr_scheduler: constant" in (out / "run" / "config.yaml").read_text()


def test_ppo_curve_needs_an_explicit_starting_model(tmp_path):
    result = run_cli(["bench/learning_curve.py", "--recipe", "ppo", "--steps", "2", "--out", str(tmp_path / "c"), "--", "--reward", "verifier"])
    assert result.returncode != 0
    assert "--recipe ppo: give the starting model after --: --sft_dir DIR (an SFT run) or --sft_dir none" in result.stderr


def test_grpo_side_by_side_on_the_tiny_model(tiny_model_dir, tiny_data, tmp_path):
    """bench/grpo_side_by_side.py: both arms train at once under --max_train_minutes, the start and both runs are
    evaluated on the same prompts, the guarded run is paired against the raw one, and the replies are written side by
    side; a second call reuses the runs and evaluations."""
    out = tmp_path / "sbs"
    cmd = ["bench/grpo_side_by_side.py", "--minutes", "0.02", "--eval_prompts", "2", "--read", "2", "--out", str(out), "--",
           "--model_name_or_path", tiny_model_dir, "--train_data", tiny_data["prompts"], "--max_completion_length", "4"]
    result = run_cli(cmd, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "side_by_side.json").read_text())
    for arm, guard in (("raw", "false"), ("guarded", "true")):
        assert f"reward_guard: {guard}" in (out / arm / "config.yaml").read_text()
        assert "max_train_minutes: 0.02" in (out / arm / "config.yaml").read_text()
        training = report["arms"][arm]["training"]
        assert training["steps"] >= 1 and training["reward_first_10"] is not None
        for key in ("coherent_strict", "verifier_strict", "degenerate", "eos"):
            m = report["arms"][arm]["metrics"][key]
            assert m["n"] == 2 and m["lo"] <= m["mean"] <= m["hi"]
    assert report["guarded_minus_raw"]["coherent_strict"]["n"] == 2
    replies = (out / "replies.md").read_text()
    assert replies.count("**start**") == replies.count("**raw**") == replies.count("**guarded**") == 2
    again = run_cli(cmd, timeout=600)
    assert again.returncode == 0 and "$ " not in again.stdout, again.stdout + again.stderr
