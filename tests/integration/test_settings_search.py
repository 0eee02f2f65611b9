"""bench/settings_search.py end to end on the tiny model: two DPO settings trained with the recipe's own schedule,
judged on the same prompts against the starting model and against the first setting; a second call trains and
evaluates nothing again, and an existing run joins as a reused setting."""

import json

from recipe_harness import recipe_args, run_cli, tiny_data  # noqa: F401  (tiny_data is a fixture)


def _flags(model_dir, data):
    flags = recipe_args("dpo", model_dir, data, "unused", max_steps=2)
    drop = ("--output_dir", "--summary_prompts")
    return [f for i, f in enumerate(flags) if f not in drop and flags[i - 1] not in drop]


def test_two_dpo_settings_side_by_side(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "search"
    cmd = ["bench/settings_search.py", "--recipe", "dpo", "--out", str(out), "--eval_prompts", "2",
           "--variant", "first=", "--variant", "beta=--beta 0.5", "--replies", "0:2", "--", *_flags(tiny_model_dir, tiny_data)]
    result = run_cli(cmd, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    search = json.loads((out / "search.json").read_text())
    first, beta = search["variants"]
    assert (first["name"], first["args"], beta["args"]) == ("first", [], ["--beta", "0.5"])
    assert first["config"]["beta"] == 0.1 and beta["config"]["beta"] == 0.5
    assert first["config"]["lr_scheduler_type"] == "cosine"  # the recipe's own schedule, not a constant one
    assert first["step"] == beta["step"] == 2 and first["tokens"] > 0 and first["train_seconds"] > 0
    assert "vs_first" not in first
    replies = (out / "replies.md").read_text()  # both prompts, each with the start's and both settings' replies
    assert replies.count("## ifprefs-eval-0000") == 2 and replies.count("**start**") == replies.count("**beta**") == 2
    for key in ("coherent_strict", "verifier_strict", "verifier_score", "degenerate", "unasked_format", "eos"):
        m = beta["metrics"][key]
        assert m["n"] == 2 and m["lo"] <= m["mean"] <= m["hi"]
        assert beta["vs_first"][key]["lo"] <= beta["vs_first"][key]["mean"] <= beta["vs_first"][key]["hi"]

    # again, with the first run reused from its folder under another name: nothing is trained or evaluated twice
    # except the reused run's evaluation (a new name, a new evaluation folder)
    again = run_cli([*cmd[:7], "--reuse", f"reused={out / 'first' / 'run'}", *cmd[7:]], timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    launched = [line for line in again.stdout.splitlines() if line.startswith("$ ")]
    assert len(launched) == 1 and "eval/evaluate.py" in launched[0] and "/reused/eval" in launched[0]
    redone = json.loads((out / "search.json").read_text())["variants"]
    assert [v["name"] for v in redone] == ["reused", "first", "beta"] and redone[0]["reused"]
    assert redone[0]["metrics"] == first["metrics"]  # the same run, the same greedy replies
    assert redone[1]["vs_first"]["coherent_strict"]["mean"] == 0.0


def test_a_setting_needs_a_name(tmp_path):
    result = run_cli(["bench/settings_search.py", "--recipe", "dpo", "--out", str(tmp_path / "s"), "--variant", "--beta 0.5"])
    assert result.returncode != 0
    assert "--variant: expected NAME=VALUE with a plain name, got '--beta 0.5'" in result.stderr
    result = run_cli(["bench/settings_search.py", "--recipe", "dpo", "--out", str(tmp_path / "s"), "--variant", "a=",
                      "--replies", "5:3"])
    assert result.returncode != 0 and "--replies: expected FIRST:END" in result.stderr
