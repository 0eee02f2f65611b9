"""align.runs on its own, without a model: what --resume may change, what counts as an earlier run, the refusal
line, --overwrite's move aside, and the one-run-per-folder lock across real processes (kill -9 included)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from align.errors import AlignError, ConfigError
from align.runs import (
    LOCK_NAME,
    MAY_CHANGE_ON_RESUME,
    RunInUseError,
    acquire_lock,
    check_folder,
    check_resume_config,
    claim_output_dir,
    earlier_artefacts,
    lock_holder,
    release_lock,
    resume_config_changes,
    take_folder,
)
from repo_paths import REPO


def folder_hash(root: Path) -> dict[str, str]:
    """Every file under root (relative path -> sha256 of its bytes) and every directory (-> "dir")."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def earlier_run(root: Path) -> Path:
    """A folder as a finished training run leaves it: two checkpoints, the adapter, the summary, metrics."""
    for step in (4, 6):
        (root / f"checkpoint-{step}").mkdir(parents=True)
        (root / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(os.urandom(64))
    (root / "adapter").mkdir()
    (root / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(64))
    (root / "summary.json").write_text('{"steps": 6}\n')
    (root / "metrics.jsonl").write_text('{"step": 1}\n')
    return root


# ------------------------------------------------------------------------------------------ --resume's settings


def test_resume_config_changes_splits_by_the_allow_list():
    earlier = {"model_name_or_path": "m", "lora_r": 8, "learning_rate": 1e-4, "logging_steps": 1, "max_steps": 4, "seed": 7}
    now = {**earlier, "lora_r": 16, "logging_steps": 5, "max_steps": 8, "seed": 8}
    changes = resume_config_changes(earlier, now)
    assert changes.refused == {"lora_r": (8, 16), "seed": (7, 8)}
    assert changes.allowed == {"logging_steps": (1, 5), "max_steps": (4, 8)}
    assert resume_config_changes(earlier, dict(earlier)).refused == {} == resume_config_changes(earlier, dict(earlier)).allowed


def test_a_field_on_one_side_only_is_a_change_and_refused_unless_allowed():
    changes = resume_config_changes({"beta": 0.1}, {"beta": 0.1, "new_loss_knob": 2.0, "report_to": "none"})
    assert changes.refused == {"new_loss_knob": ("<absent>", 2.0)}
    assert changes.allowed == {"report_to": ("<absent>", "none")}


def test_what_changes_training_is_never_on_the_allow_list():
    trains = {"model_name_or_path", "train_data", "max_train_rows", "data_format", "lora_r", "lora_alpha", "lora_dropout",
              "lora_target_modules", "use_lora", "quantization", "dtype", "beta", "loss_type", "label_smoothing", "kl_coef",
              "cliprange", "per_device_train_batch_size", "gradient_accumulation_steps", "rollout_batch_size",
              "minibatch_size", "learning_rate", "lr_scheduler_type", "lr_scheduler", "warmup_steps", "seed", "max_length"}
    assert not trains & MAY_CHANGE_ON_RESUME


@dataclass
class Cfg:
    output_dir: str
    resume: bool = True
    overwrite: bool = False
    learning_rate: float = 1e-4
    max_steps: int = 4
    logging_steps: int = 1


def test_check_resume_config_names_the_field_and_the_file(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"output_dir": str(tmp_path), "resume": False, "overwrite": False,
                                                          "learning_rate": 1e-4, "max_steps": 4, "logging_steps": 1}))
    with pytest.raises(ConfigError) as err:
        check_resume_config(tmp_path, Cfg(str(tmp_path), learning_rate=2e-4, max_steps=8))
    assert "learning_rate 0.0001 -> 0.0002" in str(err.value) and "max_steps" not in str(err.value)
    assert str(tmp_path / "config.yaml") in str(err.value)
    changes = check_resume_config(tmp_path, Cfg(str(tmp_path), max_steps=8, logging_steps=2))
    assert changes.allowed == {"max_steps": (4, 8), "logging_steps": (1, 2), "resume": (False, True)}


def test_claim_with_resume_records_the_allowed_changes(tmp_path):
    out = earlier_run(tmp_path / "run")
    (out / "config.yaml").write_text(yaml.safe_dump({"output_dir": str(out), "resume": True, "overwrite": False,
                                                     "learning_rate": 1e-4, "max_steps": 4, "logging_steps": 1}))
    (out / "run_info.json").write_text(json.dumps({"resumes": [{"time": "earlier", "changed": {}}]}))
    try:
        notes, extra = claim_output_dir(Cfg(str(out), max_steps=6), min_free_gb=0)
    finally:
        release_lock(out)
    assert [entry["changed"] for entry in extra["resumes"]] == [{}, {"max_steps": {"was": 4, "now": 6}}]
    assert notes == ["--resume with changed settings (allowed, recorded in run_info.json): max_steps 4 -> 6"]


# ------------------------------------------------------------------------------------------ refusal, --overwrite


def test_earlier_artefacts_lists_what_a_rerun_would_lose(tmp_path):
    out = earlier_run(tmp_path / "run")
    (out / "checkpoint-10").mkdir()
    (out / "merged").mkdir()  # empty: nothing to lose
    assert earlier_artefacts(out) == ["checkpoint-4/", "checkpoint-6/", "checkpoint-10/", "adapter/", "summary.json"]
    assert earlier_artefacts(tmp_path / "missing") == []
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "metrics.jsonl").write_text("{}\n")  # a run stopped before its first checkpoint
    assert earlier_artefacts(tmp_path / "fresh") == []


def test_refusal_names_what_is_there_and_the_three_ways_on_and_touches_nothing(tmp_path):
    out = earlier_run(tmp_path / "run")
    before = folder_hash(out), os.stat(out).st_mtime_ns
    with pytest.raises(AlignError) as err:
        check_folder(out, resume=False, overwrite=False)
    assert str(err.value) == (
        f"--output_dir {out} holds an earlier run (checkpoint-4/, checkpoint-6/, adapter/, summary.json); nothing was "
        f"changed. Use --resume true to continue it, or --overwrite true to move it aside to {out}.old-<time>, "
        "or another --output_dir")
    assert (folder_hash(out), os.stat(out).st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_resume_and_overwrite_together_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="resume and overwrite: choose one"):
        check_folder(tmp_path, resume=True, overwrite=True)


def test_overwrite_moves_the_earlier_run_aside_intact(tmp_path):
    out = earlier_run(tmp_path / "run")
    before = folder_hash(out)
    found = check_folder(out, resume=False, overwrite=True)
    try:
        notes = take_folder(out, found, overwrite=True)
        aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
        assert len(aside) == 1 and folder_hash(aside[0]) == before  # every byte, and no lock file left in it
        assert notes == [f"--overwrite: moved what was there (checkpoint-4/, checkpoint-6/, adapter/, summary.json) to "
                         f"{aside[0]}; nothing was deleted"]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # a fresh folder, locked by this process
        assert lock_holder(out)["pid"] == os.getpid()
    finally:
        release_lock(out)
    assert lock_holder(out) is None


# ------------------------------------------------------------------------------------------ the lock


HOLD = """
import sys, time
from align.runs import acquire_lock
note = acquire_lock(sys.argv[1])
print("locked", note, flush=True)
time.sleep(120)
"""


def start_holder(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    assert line.startswith("locked"), line
    return proc


def test_lock_refuses_a_second_process_and_is_taken_over_after_kill_9(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    first = start_holder(folder)
    try:
        holder = lock_holder(folder)
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        with pytest.raises(RunInUseError) as err:
            check_folder(folder, resume=False, overwrite=False)
        assert str(err.value).startswith(f"output folder {folder} is in use by another run (pid {first.pid} on {socket.gethostname()}")
        with pytest.raises(RunInUseError):
            acquire_lock(folder)  # the race past check_folder is refused by the lock itself
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert lock_holder(folder) is None  # the kernel dropped the dead process's flock
    try:
        note = acquire_lock(folder)
        assert note == f"took over the run lock of pid {first.pid} on {socket.gethostname()} (started {holder['started']}), " \
                       "which is no longer running"
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        release_lock(folder)
    assert (folder / LOCK_NAME).read_text() == ""  # released normally: the next run takes it over silently
    assert acquire_lock(folder) is None
    release_lock(folder)


def test_lock_free_after_the_holder_exits_normally(tmp_path):
    code = "import sys\nfrom align.errors import cli_main\nfrom align.runs import acquire_lock\ncli_main(lambda: acquire_lock(sys.argv[1]))()"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, timeout=60)
    assert lock_holder(tmp_path) is None and (tmp_path / LOCK_NAME).read_text() == ""
    t0 = time.time()
    assert acquire_lock(tmp_path) is None and time.time() - t0 < 5
    release_lock(tmp_path)


def test_overwrite_keeps_the_earlier_runs_own_lock_file_as_it_was(tmp_path):
    out = earlier_run(tmp_path / "run")
    (out / LOCK_NAME).write_text('{"pid": 1, "host": "elsewhere"}\n')  # left by a killed run
    before = folder_hash(out)
    try:
        notes = take_folder(out, check_folder(out, resume=False, overwrite=True), overwrite=True)
        (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
        assert folder_hash(aside) == before
        assert notes[0].startswith("took over the run lock of pid 1 on elsewhere")
    finally:
        release_lock(out)


def test_resume_with_nothing_to_continue_from_refuses_to_write_over_the_outputs(tmp_path):
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"w")
    (out / "summary.json").write_text("{}\n")
    before = folder_hash(out)
    with pytest.raises(AlignError) as err:
        claim_output_dir(Cfg(str(out)), min_free_gb=0)
    assert str(err.value) == (f"--resume: {out} holds adapter/, summary.json but no checkpoint to continue from; nothing was "
                              "changed. Use --overwrite true to move it aside and start over, or another --output_dir")
    assert folder_hash(out) == before


def test_a_relative_and_an_absolute_name_are_one_lock(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    acquire_lock("run")
    try:
        assert acquire_lock(tmp_path / "run") is None and lock_holder(tmp_path / "run")["pid"] == os.getpid()
    finally:
        release_lock(str(tmp_path / "run"))
    assert lock_holder("run") is None
