"""bench/learning_curve.py end to end on the tiny model: one constant-LR SFT run, two checkpoints evaluated
against the starting model, the JSON and the plot; a second call reuses everything already done."""

import json

from recipe_harness import recipe_args, run_cli, tiny_data  # noqa: F401  (tiny_data is a fixture)


def test_sft_curve_on_the_tiny_model(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "curve"
    flags = recipe_args("sft", tiny_model_dir, tiny_data, "unused")
    flags = [f for i, f in enumerate(flags) if f not in ("--output_dir", "--max_steps", "--save_steps", "--save_total_limit")
             and flags[i - 1] not in ("--output_dir", "--max_steps", "--save_steps", "--save_total_limit")]
    cmd = ["bench/learning_curve.py", "--recipe", "sft", "--steps", "1,2", "--out", str(out), "--eval_prompts", "2", "--", *flags]
    result = run_cli(cmd, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    curve = json.loads((out / "learning_curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [1, 2]
    assert curve["points"][0]["tokens"] > 0 and curve["points"][1]["tokens"] > curve["points"][0]["tokens"]
    assert curve["points"][1]["train_seconds"] > 0
    for p in curve["points"]:
        for key in ("coherent_strict", "verifier_strict", "verifier_score", "degenerate", "eos"):
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


def test_bad_steps_are_one_clear_error(tmp_path):
    result = run_cli(["bench/learning_curve.py", "--recipe", "sft", "--steps", "10,x", "--out", str(tmp_path / "c")])
    assert result.returncode != 0
    assert "--steps: expected comma-separated step counts, got '10,x'" in result.stderr
