"""The recipes survive failures and never destroy a user's work: kills, a kill mid-checkpoint, SIGTERM, a NaN
loss, a full disk mid-checkpoint, a rerun into an earlier run's folder (refused; --overwrite moves it aside),
--resume with other settings (refused), two runs into one folder (refused; a killed run's lock taken over),
an unwritable output directory and bad config. Each run is a real process of
recipes/{sft,reward,dpo}.py on a tiny model (see recipe_harness: forked from a server that imported
torch/transformers/TRL once, so a run costs seconds, not a cold start).

"Matches the uninterrupted run" means bit-identical adapter weights and per-step metrics: CPU, fp32, one
thread, the same seed; resume restores weights, optimizer, scheduler, RNG and data position, so any
difference is a resume bug. The one tolerance is `train_loss` (summary.json and the last metrics record),
the mean over all steps: after a resume it is computed from the checkpoint's logged losses plus this
process's mean, a different summation order than one process's running sum (rel 1e-12).
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from recipe_harness import (  # noqa: F401  (tiny_data is a fixture)
    assert_no_traceback,
    assert_same_run,
    complete_checkpoints,
    recipe_args,
    run_cli,
    run_recipe,
    start_recipe,
    tiny_data,
)

RECIPES = ["sft", "reward", "dpo", "grpo"]
MAX_STEPS = 6
SAVE_STEPS = 2


def model_for(recipe: str, tiny_model_dir: str, tiny_reward_dir: str) -> str:
    return tiny_reward_dir if recipe == "reward" else tiny_model_dir


@pytest.fixture(scope="module")
def runner(tiny_model_dir, tiny_reward_dir, tiny_data):
    """args(recipe, output_dir, **flags) -> argv for the standard short run (6 steps, checkpoint every 2)."""

    def args(recipe: str, output_dir, **flags) -> list[str]:
        model = model_for(recipe, tiny_model_dir, tiny_reward_dir)
        return recipe_args(recipe, model, tiny_data, output_dir, **{"max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, **flags})

    return args


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, runner):
    """uninterrupted(recipe) -> output_dir of one run without faults (made once per recipe, shared)."""
    done: dict[str, Path] = {}

    def get(recipe: str) -> Path:
        if recipe not in done:
            root = tmp_path_factory.mktemp(f"{recipe}_reference")
            code, log = run_recipe(recipe, runner(recipe, root / "run"), root / "run.log")
            assert code == 0, log[-3000:]
            done[recipe] = root / "run"
        return done[recipe]

    return get


def folder_hash(root: Path) -> dict[str, str]:
    """Every file under root (relative path -> sha256) and every directory (-> "dir"): "every byte unchanged"."""
    import hashlib

    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def logged_steps(output_dir: Path) -> list[int]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if "train/loss" in record:
            steps.append(record["step"])
    return steps


# ------------------------------------------------------------------------------------------ kill, resume


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_kill_and_kill_mid_checkpoint_then_resume_match_uninterrupted(recipe, runner, uninterrupted, tmp_path):
    out = tmp_path / "run"

    # 1. SIGKILL from outside once step 3 is logged: checkpoint-2 is complete, step 3 is done but not saved.
    run = start_recipe(recipe, runner(recipe, out), tmp_path / "1.log")
    run.wait_for(lambda: 3 in logged_steps(out), "step 3 in metrics.jsonl")
    run.signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert complete_checkpoints(out)[-1:] in ([2], [4]), complete_checkpoints(out)  # 4 only if step 4 outran the kill

    # 2. Resume, and die (SIGKILL) inside the next checkpoint save: weights written, optimizer/state not, no marker.
    code, log = run_recipe(recipe, runner(recipe, out, resume="true"), tmp_path / "2.log", kill_in_save=True)
    assert code == -signal.SIGKILL, log[-3000:]
    good = complete_checkpoints(out)[-1]
    partial = out / f"checkpoint-{good + SAVE_STEPS}"
    assert partial.is_dir() and (partial / "adapter_model.safetensors").is_file()
    assert not (partial / "trainer_state.json").exists()
    assert max(logged_steps(out)) == good + SAVE_STEPS  # logged, then killed while saving

    # 3. Resume again: the partial checkpoint is not trusted (removed), training continues from the last good one.
    resume_past_a_partial_checkpoint(recipe, runner, uninterrupted, out, partial, good, tmp_path / "3.log")


def resume_past_a_partial_checkpoint(recipe, runner, uninterrupted, out: Path, partial: Path, good: int, log_path: Path) -> None:
    """--resume: the partial checkpoint is not trusted (removed), training continues from checkpoint-`good`, and the
    finished run equals the uninterrupted one."""
    code, log = run_recipe(recipe, runner(recipe, out, resume="true"), log_path)
    assert code == 0, log[-3000:]
    assert f"removing incomplete checkpoint {partial}" in log
    assert f"resuming from {out / f'checkpoint-{good}'}" in log
    assert_same_run(uninterrupted(recipe), out, MAX_STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_fresh_start_then_sigterm_then_nan_then_resume_match_uninterrupted(recipe, runner, uninterrupted, tmp_path):
    out = tmp_path / "run"

    # 0. The output_dir holds an earlier run (checkpoints 4 and 6, metrics, config). A run without --resume is
    #    refused before it loads anything, every byte left as it was; with --overwrite true the earlier run is
    #    moved, intact, to a sibling <out>.old-<time>, and this run starts in an empty folder.
    shutil.copytree(uninterrupted(recipe), out, ignore=shutil.ignore_patterns("adapter", "summary.json"))
    assert complete_checkpoints(out) == [4, 6]
    earlier = folder_hash(out)
    line = start_up_error(recipe, runner(recipe, out), tmp_path / "0.log")
    assert line == (f"error: --output_dir {out} holds an earlier run (checkpoint-4/, checkpoint-6/); nothing was changed. "
                    f"Use --resume true to continue it, or --overwrite true to move it aside to {out}.old-<time>, or "
                    "another --output_dir")
    assert folder_hash(out) == earlier and sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["run"]

    # 1. SIGTERM at the end of step 1 (the run holds there until the signal arrives, see recipe_harness): the step
    #    is saved although it is off the save_steps grid, and the run exits 143.
    run = start_recipe(recipe, runner(recipe, out, overwrite="true"), tmp_path / "1.log", hold_after_step=1)
    run.wait_for(lambda: "[harness] holding after step 1" in run.text(), "step 1")
    run.signal(signal.SIGTERM)
    assert run.wait() == 143, run.text()[-3000:]
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert f"--overwrite: moved what was there (checkpoint-4/, checkpoint-6/) to {aside}; nothing was deleted" in run.text()
    assert folder_hash(aside) == earlier
    assert complete_checkpoints(out) == [1] and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert logged_steps(out) == [1]  # the earlier run's records went with it
    assert "SIGTERM: saving a checkpoint after this step" in run.text() and "rerun with --resume" in run.text()
    assert_no_traceback(run.text())

    # 2. Resume with a NaN loss injected at step 3, one step after this run's checkpoint-2: exit 2, a one-line
    #    error naming the step and the tensor, checkpoint-2 kept, nothing saved or logged at or after step 3.
    code, log = run_recipe(recipe, runner(recipe, out, resume="true"), tmp_path / "2.log", nan_loss_at_step=3)
    assert code == 2, log[-3000:]
    assert "error: step 3: the training loss is nan; stopped before backward; the last good checkpoint is kept" in log
    assert_no_traceback(log)
    assert complete_checkpoints(out) == [1, 2]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert logged_steps(out) == [1, 2]

    # 3. Resume without the fault: finishes and matches the uninterrupted run.
    code, log = run_recipe(recipe, runner(recipe, out, resume="true"), tmp_path / "3.log")
    assert code == 0, log[-3000:]
    assert f"resuming from {out / 'checkpoint-2'}" in log
    assert_same_run(uninterrupted(recipe), out, MAX_STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_nan_gradient_stops_naming_step_and_tensor_then_resume_matches(recipe, runner, uninterrupted, tmp_path):
    """A NaN gradient with a finite loss (nan_grad_at_step=3 poisons the LAST trainable tensor's
    gradient): exit 2 with one line naming step 3 and that tensor, not the first tensor of the model (clipping
    first would have spread the NaN to every gradient); checkpoint-2 kept; nothing logged or saved at or after
    step 3; a resume without the fault then matches the uninterrupted run."""
    import re

    out = tmp_path / "run"
    code, log = run_recipe(recipe, runner(recipe, out), tmp_path / "1.log", nan_grad_at_step=3)
    assert code == 2, log[-3000:]
    assert_no_traceback(log)
    poisoned = re.search(r"test fault: the gradient of (\S+) is NaN at step 3", log)
    assert poisoned, log[-3000:]
    errors = [line[line.index("error: "):] for line in log.splitlines() if "error: " in line]  # after a progress bar
    assert errors == [f"error: step 3: gradient of {poisoned[1]} is not finite (NaN or inf); stopped before the "
                      "optimizer step; the last good checkpoint is kept"], log[-3000:]
    assert "lora_B" in poisoned[1] or "score" in poisoned[1], poisoned[1]  # a trained tensor, last of the model
    assert complete_checkpoints(out) == [2] and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert logged_steps(out) == [1, 2]
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()

    code, log = run_recipe(recipe, runner(recipe, out, resume="true"), tmp_path / "2.log")
    assert code == 0, log[-3000:]
    assert f"resuming from {out / 'checkpoint-2'}" in log
    assert_same_run(uninterrupted(recipe), out, MAX_STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_disk_full_mid_checkpoint_keeps_the_last_good_one_then_resume_matches(recipe, runner, uninterrupted, tmp_path):
    """ENOSPC inside the checkpoint save at step 4 (adapter weights written, optimizer not; recipe_harness raises it
    in the Trainer's own write path): one line naming the checkpoint and the one kept, exit 2, no traceback;
    checkpoint-2 complete and byte-identical, checkpoint-4 unmarked; a resume then matches the uninterrupted run."""
    out = tmp_path / "run"
    code, log = run_recipe(recipe, runner(recipe, out), tmp_path / "1.log", disk_full_at_step=4)
    assert code == 2, log[-3000:]
    assert_no_traceback(log)
    errors = [line[line.index("error: "):] for line in log.splitlines() if "error: " in line]
    assert errors == [f"error: could not write checkpoint {out / 'checkpoint-4'}: No space left on device (free some space); "
                      f"the last complete checkpoint {out / 'checkpoint-2'} is kept; rerun with --resume true to continue "
                      "from it"], log[-3000:]
    assert complete_checkpoints(out) == [2] and (out / "checkpoint-4").is_dir()
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()

    resume_past_a_partial_checkpoint(recipe, runner, uninterrupted, out, out / "checkpoint-4", 2, tmp_path / "2.log")


@pytest.mark.slow
def test_second_run_into_a_live_runs_folder_is_refused_and_a_killed_runs_lock_taken_over(runner, uninterrupted, tmp_path):
    """Run A holds after step 1. Run B into the same folder: exit 2, one line naming A's pid, A's files untouched.
    A is SIGKILLed (its lock file still names it); run C takes the lock over and, resumed, matches the
    uninterrupted run."""
    recipe, out = "dpo", tmp_path / "run"
    first = start_recipe(recipe, runner(recipe, out), tmp_path / "a.log", hold_after_step=1)
    first.wait_for(lambda: "[harness] holding after step 1" in first.text(), "step 1")
    before = folder_hash(out)
    line = start_up_error(recipe, runner(recipe, out, resume="true"), tmp_path / "b.log")
    assert line.startswith(f"error: output folder {out} is in use by another run (pid {first.pid} on "), line
    assert folder_hash(out) == before
    first.signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    assert json.loads((out / ".align-run.lock").read_text())["pid"] == first.pid

    code, log = run_recipe(recipe, runner(recipe, out, resume="true"), tmp_path / "c.log")
    assert code == 0, log[-3000:]
    assert f"took over the run lock of pid {first.pid} on " in log and "which is no longer running" in log
    assert "--resume: no complete checkpoint" in log  # killed before its first checkpoint (step 2)
    assert_same_run(uninterrupted(recipe), out, MAX_STEPS)


DEFAULT_LR = {"sft": 2e-4, "grpo": 5e-5, "dpo": 1e-3, "reward": 1e-3}  # the recipes' defaults on a CPU


@pytest.mark.parametrize("recipe", RECIPES)
def test_resume_with_other_training_settings_is_refused_naming_the_fields(recipe, runner, uninterrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted(recipe), out)
    before = folder_hash(out)
    line = start_up_error(recipe, runner(recipe, out, resume="true", learning_rate=3e-4, seed=8, logging_steps=2),
                          tmp_path / "log")
    assert line.startswith(f"error: --resume: the checkpoint in {out} was trained with other settings, and continuing "
                           f"it with these would train something else: learning_rate {DEFAULT_LR[recipe]} -> 0.0003, "
                           "seed 7 -> 8 ("), line
    assert "logging_steps" not in line  # allowed to change
    assert folder_hash(out) == before


def test_run_train_loss_adds_back_the_steps_before_the_resume():
    """Steps 1-3 logged losses 1, 2, 3 (checkpoint at 3); the resumed call ran steps 4-5 with mean 6:
    whole run = (1 + 2 + 3 + 6 * 2) / 5 = 18 / 5 = 3.6. Logging every 2 steps (1.5 at step 2, nothing at
    step 3, checkpoint at 3): step 3's loss is unknown, so (1.5 * 2 + 6 * 2) / (2 + 2) = 15 / 4 = 3.75."""
    from align.trainers.common import run_train_loss

    every_step = [{"loss": 1.0, "step": 1}, {"loss": 2.0, "step": 2}, {"loss": 3.0, "step": 3}, {"loss": 7.0, "step": 4}]
    assert run_train_loss(every_step, 6.0, first_step=3, global_step=5) == 3.6
    assert run_train_loss([{"loss": 1.5, "step": 2}, {"eval_loss": 9.0, "step": 2}], 6.0, first_step=3, global_step=5) == 3.75
    assert run_train_loss(every_step, 6.0, first_step=0, global_step=5) == 6.0  # not resumed: HF's own number


def test_metrics_lines_kept_when_training_restarts():
    from align.trainers.common import _kept_on_restart

    lines = [json.dumps({"step": s, "train/loss": 0.5}) + "\n" for s in (1, 2, 3)]
    lines.append(json.dumps({"step": 2, "train/train_loss": 0.5, "train/train_runtime": 1.0}) + "\n")  # end of a call
    lines.append('{"step": 4, "train/lo')  # cut short by a kill
    assert [line for line in lines if _kept_on_restart(line, 2)] == lines[:2]
    assert [line for line in lines if _kept_on_restart(line, 0)] == []  # a fresh start keeps nothing


# ------------------------------------------------------------------------------------------ start-up errors


def start_up_error(recipe: str, argv: list[str], log: Path) -> str:
    """Run a recipe that must refuse to start: exit 2, one `error:` line, no traceback, no model loaded."""
    code, text = run_recipe(recipe, argv, log)
    assert code == 2, text[-3000:]
    assert_no_traceback(text)
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text[-3000:]
    assert "[align] data:" not in text  # stopped before loading anything
    return errors[0]


def test_loraplus_ratio_reaches_the_recipes_optimizer_and_is_checked_at_start(runner, tmp_path):
    """--loraplus_lr_ratio 16: the checkpoint's optimizer holds the LoRA B matrices at 16x the A matrices' rate."""
    import torch

    out = tmp_path / "run"
    code, log = run_recipe("dpo", runner("dpo", out, max_steps=2, save_steps=2, loraplus_lr_ratio=16), tmp_path / "run.log")
    assert code == 0, log[-3000:]
    groups = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)["param_groups"]
    # initial_lr: the peak rate of each group, which the schedule scales (at the end of 2 steps both are at 0)
    assert len(groups) == 2 and groups[0]["initial_lr"] > 0 and groups[1]["initial_lr"] == pytest.approx(16 * groups[0]["initial_lr"])
    line = start_up_error("dpo", runner("dpo", tmp_path / "bad", loraplus_lr_ratio=-1), tmp_path / "bad.log")
    assert line == "error: config: loraplus_lr_ratio: expected a ratio > 0 (LoRA+ uses about 16), or none, got -1.0"


def test_sft_phase_runs_first_then_dpo_and_is_checked_at_start(runner, tmp_path):
    """--sft_steps 2 of 3: steps 1-2 log the SFT phase's NLL and no DPO reward, step 3 DPO's rewards; the summary says
    how many steps were SFT; SFT steps that leave no DPO step are refused at start in one line."""
    import json

    out = tmp_path / "run"
    code, log = run_recipe("dpo", runner("dpo", out, max_steps=3, sft_steps=2, logging_steps=1), tmp_path / "run.log")
    assert code == 0, log[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {row["step"]: row for row in rows if "train/loss" in row}
    assert sorted(by_step) == [1, 2, 3]
    assert all("sft_phase/nll" in by_step[s] and "rewards/margins" not in by_step[s] for s in (1, 2))
    assert "rewards/margins" in by_step[3] and "sft_phase/nll" not in by_step[3]
    assert json.loads((out / "summary.json").read_text())["sft_steps"] == 2
    line = start_up_error("dpo", runner("dpo", tmp_path / "bad", max_steps=2, sft_steps=2), tmp_path / "bad.log")
    assert line == "error: config: sft_steps: 2 SFT steps leave none of max_steps 2 for DPO; expected fewer SFT steps than max_steps"


@pytest.mark.parametrize("recipe", RECIPES)
def test_output_dir_under_a_regular_file_fails_at_start(recipe, runner, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where a directory is expected\n")
    # A model path that does not exist: had the recipe loaded the model first, the error would name it instead.
    argv = runner(recipe, blocker / "out", model_name_or_path=str(tmp_path / "no_such_model"))
    line = start_up_error(recipe, argv, tmp_path / "log")
    assert line == f"error: output_dir {blocker / 'out'}: cannot write there (Not a directory)"


def test_output_dir_in_proc_and_full_disk_fail_at_start(runner, tmp_path):
    argv = runner("dpo", "/proc/align_out", model_name_or_path=str(tmp_path / "no_such_model"))
    line = start_up_error("dpo", argv, tmp_path / "proc.log")
    assert line.startswith("error: output_dir /proc/align_out: cannot write there (")

    argv = runner("dpo", tmp_path / "out", min_free_gb=1e9, model_name_or_path=str(tmp_path / "no_such_model"))
    line = start_up_error("dpo", argv, tmp_path / "full.log")
    assert "GB free on its disk, need at least 1000000000.0 GB" in line


@pytest.mark.slow
def test_unwritable_output_dir_real_command_line(tiny_model_dir, tiny_data, tmp_path):
    """The same check through `python recipes/dpo.py` itself: exit code and stderr as a user sees them."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = recipe_args("dpo", str(tmp_path / "no_such_model"), tiny_data, blocker / "out")
    result = run_cli(["recipes/dpo.py", *argv])
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: output_dir {blocker / 'out'}: cannot write there (Not a directory)"
    assert_no_traceback(result.stderr)


@pytest.mark.parametrize("recipe", RECIPES)
def test_unknown_flag_names_the_close_valid_one(recipe, runner, tmp_path):
    argv = runner(recipe, tmp_path / "out") + ["--learning_rat", "1e-4"]
    line = start_up_error(recipe, argv, tmp_path / "log")
    assert line == "error: command line: unknown option 'learning_rat'; did you mean learning_rate?"


@pytest.mark.parametrize("recipe", RECIPES)
def test_wrong_type_names_the_field_and_the_type(recipe, runner, tmp_path):
    argv = runner(recipe, tmp_path / "out", save_steps="four")
    line = start_up_error(recipe, argv, tmp_path / "log")
    assert line == "error: config: save_steps: expected an integer, got 'four'"


def test_unknown_yaml_key_names_the_file(runner, tmp_path):
    config = tmp_path / "dpo.yaml"
    config.write_text("beta: 0.1\nbetta: 0.2\n")
    argv = runner("dpo", tmp_path / "out") + ["--config", str(config)]
    line = start_up_error("dpo", argv, tmp_path / "log")
    assert line == f"error: {config}: unknown option 'betta'; did you mean beta?"


def test_unknown_dpo_loss_type_lists_the_valid_ones(runner, tmp_path):
    argv = runner("dpo", tmp_path / "out", loss_type="sigmod")
    line = start_up_error("dpo", argv, tmp_path / "log")
    assert line.startswith("error: config: loss_type: unknown DPO loss 'sigmod'; expected one of ")
    assert "sigmoid" in line and "ipo" in line


def test_dpo_loss_weights_must_match_the_loss_types(runner, tmp_path):
    argv = runner("dpo", tmp_path / "out", loss_type="sigmoid,sft", loss_weights="0.2")
    line = start_up_error("dpo", argv, tmp_path / "log")
    assert line == "error: config: loss_weights: expected 2 weight(s), one per loss_type (sigmoid,sft), got 1"


def test_reproducible_drops_wall_time_at_any_depth():
    """A resumed run's summary `before` block held {"time_s": 0.6} against 0.0 uninterrupted: every equality check
    of two runs goes through recipe_harness.reproducible, which drops timing fields wherever they are."""
    from recipe_harness import reproducible

    ran = {"steps": 4, "before": {"verifier": 0.5, "time_s": 0.0}, "metrics": [{"step": 1, "time/generate": 2.0, "perf/tokens_per_s": 9.0,
                                                                                "ppo/kl": 0.1}], "wall_time_s": 12.0}
    resumed = {"steps": 4, "before": {"verifier": 0.5, "time_s": 0.6}, "metrics": [{"step": 1, "time/generate": 2.5, "perf/tokens_per_s": 7.0,
                                                                                    "ppo/kl": 0.1}], "wall_time_s": 30.0}
    assert ran != resumed and reproducible(ran) == reproducible(resumed) == {"steps": 4, "before": {"verifier": 0.5},
                                                                            "metrics": [{"step": 1, "ppo/kl": 0.1}]}
    resumed["before"]["verifier"] = 0.25
    assert reproducible(ran) != reproducible(resumed)


# ------------------------------------------------------------------------------------------ time budget


def test_time_budget_stops_after_the_step_that_crosses_it_and_finishes_the_run(runner, tmp_path):
    """--max_train_minutes 0.0001 (6 ms): the first step already ends past it, so it is the last: saved as a complete
    checkpoint, then the adapter and the summary as after any last step; exit 0. A budget of 0 is refused at start."""
    out = tmp_path / "run"
    code, log = run_recipe("sft", runner("sft", out, max_steps=50, max_train_minutes=0.0001), tmp_path / "run.log")
    assert code == 0, log[-3000:]
    assert logged_steps(out) == [1]
    assert "--max_train_minutes 0.0001: stopping after step 1" in log
    assert complete_checkpoints(out) == [1] and (out / "adapter" / "adapter_config.json").exists()
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    line = start_up_error("sft", runner("sft", tmp_path / "zero", max_train_minutes=0), tmp_path / "zero.log")
    assert line == "error: config: max_train_minutes: expected minutes > 0 (or none), got 0.0"
