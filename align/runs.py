"""Never destroy a user's work: what a run may do to the output folder it is given.

The rules every recipe, the pipeline, eval/evaluate.py and eval/compare.py follow (README: "Your runs are safe"):

- A folder holding an earlier run's artefacts (checkpoints, adapter, merged model, summary, ...) is refused at
  start-up, before anything is loaded or written, with one line naming what is there and the ways on:
  `--resume` (training recipes and the pipeline), `--overwrite true` (the earlier run is moved aside to a
  sibling `<folder>.old-<time>`, never deleted) or another output folder.
- `--resume` continues only the same training: `resume_config_changes` compares the earlier run's resolved
  config.yaml with the new one; a difference outside `MAY_CHANGE_ON_RESUME` is refused with the fields named,
  the allowed ones are recorded in run_info.json.
- One run per folder: the main process holds an exclusive `flock` on `<folder>/.align-run.lock` (pid and host
  written in it) for its lifetime. The kernel drops a flock when its process dies, kill -9 included, so a
  killed run's lock is taken over by the next run without guessing from pids. The other processes of one
  `accelerate launch` share the run: only the main process takes the lock, the others wait at a barrier
  until it has claimed the folder (see align.trainers.common.start_run and recipes/ppo.py).
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from align.errors import AlignError, ConfigError

LOCK_NAME = ".align-run.lock"

# What a training run leaves that would be lost to a careless rerun. metrics.jsonl, config.yaml and
# tensorboard/ alone (a run stopped before its first checkpoint) are not listed: nothing there takes hours.
TRAINING_ARTEFACTS = ("adapter", "merged", "critic", "summary.json", "checkpoints")
EVAL_ARTEFACTS = ("summary.json", "generations.jsonl", "prefs.jsonl", "ppl.jsonl")
REPORT_ARTEFACTS = ("summary.json", "report.md", "report.html")

# Config fields --resume may change: none of them changes what a training step computes. Everything else
# (model, data and row limits, LoRA, quantization, dtype, loss and coefficients, batch geometry, learning
# rate and schedule, seed, and any field added later) must equal the earlier run's value.
MAY_CHANGE_ON_RESUME = frozenset({
    # where and how the run is kept and reported
    "output_dir", "resume", "overwrite", "logging_steps", "save_steps", "save_total_limit", "report_to",
    "min_free_gb", "cpu_threads", "return_freed_memory", "mmap_threshold_mb", "push_to_hub", "log_level",
    # the length of the run: extending it (HF's linear schedule is then stretched to the new end from here on)
    "max_steps", "num_train_epochs", "total_updates", "max_train_minutes",
    # what is measured or written after training; health checks only warn or stop after a checkpoint
    "eval_data", "eval_rows", "max_eval_rows", "summary_prompts", "summary_max_new_tokens", "eval_prompts",
    "num_eval_prompts", "merge", "stop_on_health", "health_min_kl", "health_kl_budget", "health_max_ratio",
    "health_eos_drop", "health_saturation_rise", "health_window",
})

_ABSENT = "<absent>"


class RunInUseError(AlignError):
    """Another live process holds the folder's run lock."""


class CheckpointWriteError(AlignError):
    """Writing a checkpoint failed (a full disk, an I/O error); the previous complete checkpoint is kept."""


@dataclass
class ConfigChanges:
    """resume_config_changes' answer: {field: (earlier value, new value)} split by MAY_CHANGE_ON_RESUME."""

    refused: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    allowed: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def resume_config_changes(earlier: Mapping[str, Any], now: Mapping[str, Any],
                          may_change: Iterable[str] = MAY_CHANGE_ON_RESUME) -> ConfigChanges:
    """Compare the earlier run's resolved config with the new one, field by field (pure).

    A field present on one side only (an option added or removed since) counts as a change, with the missing
    side shown as "<absent>"; it is refused unless allowed, like any other.
    """
    may_change = set(may_change)
    changes = ConfigChanges()
    for name in sorted(set(earlier) | set(now)):
        was, new = earlier.get(name, _ABSENT), now.get(name, _ABSENT)
        if was != new:
            (changes.allowed if name in may_change else changes.refused)[name] = (was, new)
    return changes


def describe_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{name} {was!r} -> {new!r}" for name, (was, new) in changes.items())


def earlier_artefacts(folder: str | os.PathLike, names: Iterable[str] = TRAINING_ARTEFACTS) -> list[str]:
    """What in `folder` an earlier run left: the listed names that exist (a directory only when not empty) and
    any checkpoint-N/ directory (HF Trainer's), in the order they would be listed."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = [f"{p.name}/" for p in sorted(root.glob("checkpoint-*"), key=_step) if p.is_dir() and p.name[11:].isdigit()]
    for name in names:
        path = root / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(f"{name}/" if path.is_dir() else name)
    return found


def _step(path: Path) -> int:
    tail = path.name.split("-")[-1]
    return int(tail) if tail.isdigit() else -1


def refusal(folder: str | os.PathLike, found: list[str], dir_flag: str, resumable: bool, what: str = "an earlier run") -> str:
    """The one line that says what is in `folder` and the ways on."""
    ways = (["--resume true to continue it"] if resumable else []) + [
        f"--overwrite true to move it aside to {folder}.old-<time>", f"another {dir_flag}"]
    return (f"{dir_flag} {folder} holds {what} ({', '.join(found)}); nothing was changed. Use "
            + ", or ".join(ways))


# ------------------------------------------------------------------------------------------ the lock


_held: dict[str, int] = {}  # lock path -> open descriptor holding the flock, in this process
_found: dict[str, bytes | None] = {}  # lock path -> its bytes before this process took it (None: no file)


def _key(folder: str | os.PathLike) -> str:
    return os.path.abspath(os.path.join(folder, LOCK_NAME))


def _read_holder(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError):
        holder = {}
    return holder if isinstance(holder, dict) else {}


def _who(holder: Mapping[str, Any]) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} (started {holder.get('started', '?')})"


def lock_holder(folder: str | os.PathLike) -> dict[str, Any] | None:
    """Who holds `folder`'s run lock now ({} when unknown), or None when nobody does. Reads only."""
    path = Path(folder) / LOCK_NAME
    if _key(folder) in _held:
        return {"pid": os.getpid(), "host": socket.gethostname()}
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def in_use_message(folder: str | os.PathLike, holder: Mapping[str, Any]) -> str:
    return (f"output folder {folder} is in use by another run ({_who(holder)}); one run per folder: wait for it, "
            f"stop it, or choose another output folder")


def acquire_lock(folder: str | os.PathLike) -> str | None:
    """Take `folder`'s run lock for this process (released at exit, by the kernel if need be).

    Returns a note when the lock file names an earlier holder that is gone (a killed run's lock, taken over);
    raises RunInUseError when a live process holds it."""
    path = Path(folder) / LOCK_NAME
    if _key(folder) in _held:
        return None
    existed = path.is_file()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunInUseError(in_use_message(folder, holder)) from None
    os.lseek(fd, 0, os.SEEK_SET)
    _found[_key(folder)] = os.read(fd, 1 << 16) if existed else None
    previous = _read_holder(fd)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(me) + "\n").encode("utf-8"))
    os.fsync(fd)
    _held[_key(folder)] = fd
    if previous:  # a run that ended normally empties the file (release_locks): this one was killed
        return f"took over the run lock of {_who(previous)}, which is no longer running"
    return None


def release_lock(folder: str | os.PathLike) -> None:
    """Empty and unlock `folder`'s lock file. The file stays: unlinking it would let a process that opened it
    just before lock a file no one else can see."""
    _found.pop(_key(folder), None)
    fd = _held.pop(_key(folder), None)
    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def release_locks() -> None:
    for key in list(_held):
        release_lock(os.path.dirname(key))


atexit.register(release_locks)


# ------------------------------------------------------------------------------------------ claiming a folder


def moved_aside_name(folder: Path, now: float | None = None) -> Path:
    """`<folder>.old-YYYYmmdd-HHMMSS` (with -2, -3, ... when taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    candidate = folder.with_name(f"{folder.name}.old-{stamp}")
    n = 2
    while candidate.exists():
        candidate = folder.with_name(f"{folder.name}.old-{stamp}-{n}")
        n += 1
    return candidate


def check_folder(folder: str | os.PathLike, *, resume: bool, overwrite: bool, names: Iterable[str] = TRAINING_ARTEFACTS,
                 dir_flag: str = "--output_dir", resumable: bool = True, what: str = "an earlier run") -> list[str]:
    """The read-only half of claiming `folder`: refuse a live run's folder, or an earlier run's without
    --resume / --overwrite. Returns the earlier artefacts found. Writes nothing."""
    if resume and overwrite:
        raise ConfigError("config: resume and overwrite: choose one (--resume continues the earlier run, "
                          "--overwrite true moves it aside)")
    holder = lock_holder(folder)
    if holder is not None:
        raise RunInUseError(in_use_message(folder, holder))
    found = earlier_artefacts(folder, names)
    if found and not resume and not overwrite:
        raise AlignError(refusal(folder, found, dir_flag, resumable, what))
    return found


def take_folder(folder: str | os.PathLike, found: list[str], *, overwrite: bool) -> list[str]:
    """The writing half: lock `folder` (created if need be) and, under --overwrite, move the earlier run to a
    sibling first. Returns the lines to print. Call check_folder (and check_writable) before."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    notes = [note for note in [acquire_lock(folder)] if note]
    if overwrite and found:
        aside = moved_aside_name(folder)
        # Locked first, so no run starts in the folder between the check and the move. The flock moves with the
        # renamed folder's lock file; it is dropped once the new folder is locked.
        os.rename(folder, aside)
        moved_fd, found_bytes = _held.pop(_key(folder)), _found.pop(_key(folder))
        folder.mkdir()
        acquire_lock(folder)
        # the moved run's lock file as it was before this run wrote its pid in it (or gone, if this run made it)
        if found_bytes is None:
            (aside / LOCK_NAME).unlink(missing_ok=True)
        else:
            os.ftruncate(moved_fd, 0)
            os.pwrite(moved_fd, found_bytes, 0)
        fcntl.flock(moved_fd, fcntl.LOCK_UN)
        os.close(moved_fd)
        notes.append(f"--overwrite: moved what was there ({', '.join(found)}) to {aside}; nothing was deleted")
    return notes


def checkpoint_write_error(target: str | os.PathLike, err: BaseException, last_good: str | os.PathLike | None) -> CheckpointWriteError:
    """The one line for a checkpoint that could not be written (a full disk, an I/O error)."""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (free some space)"
    kept = f"the last complete checkpoint {last_good} is kept; rerun with --resume true to continue from it" \
        if last_good else "no complete checkpoint had been written yet"
    return CheckpointWriteError(f"could not write checkpoint {target}: {reason}; {kept}")


# ------------------------------------------------------------------------------------------ a training run


def check_resume_config(folder: str | os.PathLike, cfg: Any) -> ConfigChanges:
    """Compare `cfg` (resolved) with the config.yaml the earlier run in `folder` wrote; refuse a change that
    would train something else. Returns the changes, all allowed. No config.yaml: nothing to compare."""
    import dataclasses

    import yaml

    path = Path(folder) / "config.yaml"
    if not path.is_file():
        return ConfigChanges()
    earlier = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    # through YAML as config.yaml was written, so that tuples and lists, ints and floats compare alike
    now = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    changes = resume_config_changes(earlier, now)
    if changes.refused:
        raise ConfigError(
            f"--resume: the checkpoint in {folder} was trained with other settings, and continuing it with these would "
            f"train something else: {describe_changes(changes.refused)} (see {path}). Use the earlier values, or start a "
            "new run with --overwrite true or another --output_dir")
    return changes


def resume_history(folder: str | os.PathLike, changes: ConfigChanges) -> list[dict[str, Any]]:
    """run_info.json's `resumes` list: the earlier run's entries plus this resume, with the allowed changes."""
    path = Path(folder) / "run_info.json"
    try:
        history = json.loads(path.read_text(encoding="utf-8")).get("resumes", [])
    except (OSError, ValueError, AttributeError):
        history = []
    entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"),
             "changed": {name: {"was": was, "now": new} for name, (was, new) in changes.allowed.items()}}
    return [*history, entry] if isinstance(history, list) else [entry]


def claim_output_dir(cfg: Any, min_free_gb: float) -> tuple[list[str], dict[str, Any]]:
    """Everything a training run does to its output_dir before loading anything (main process only): refuse a
    live or earlier run's folder, check what --resume continues, check the disk, lock, move aside on
    --overwrite. Returns the lines to print and the run_info.json fields to add."""
    from align.io import check_writable

    found = check_folder(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite)
    extra: dict[str, Any] = {}
    notes: list[str] = []
    if cfg.resume and found and not any(name.startswith("checkpoint") for name in found):
        # nothing to continue from, and starting from scratch would write over what is there
        raise AlignError(f"--resume: {cfg.output_dir} holds {', '.join(found)} but no checkpoint to continue from; nothing "
                         "was changed. Use --overwrite true to move it aside and start over, or another --output_dir")
    if cfg.resume and found:
        changes = check_resume_config(cfg.output_dir, cfg)
        extra["resumes"] = resume_history(cfg.output_dir, changes)
        if changes.allowed:
            notes.append(f"--resume with changed settings (allowed, recorded in run_info.json): {describe_changes(changes.allowed)}")
    check_writable(cfg.output_dir, min_free_gb)
    notes = take_folder(cfg.output_dir, found, overwrite=cfg.overwrite) + notes
    return notes, extra
