"""Atomic file output and run bookkeeping.

Everything a run writes goes to a temporary name in the same directory and is renamed into place, so a
crash or kill leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import yaml

from align.errors import AlignError, ConfigError

PACKAGES = ("align", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "gguf")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename.

    A kill before the rename leaves only a `.tmp-*` directory that readers ignore.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".old-{path.name}-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def inside(root: str | os.PathLike, *parts: str | os.PathLike, field: str) -> Path:
    """`root/part/...`, refused when it resolves outside `root`.

    For a path built from a name that came from input (a file name in a summary, a checkpoint directory
    found on disk): `..`, an absolute part or a symlink must not take a write (or a read meant to stay in a
    run) elsewhere. Symlinks are resolved on both sides, so a root that is itself a symlink is fine.
    Raises ConfigError naming `field`, the name and the root.
    """
    path = Path(root).joinpath(*parts)
    if not path.resolve().is_relative_to(Path(root).resolve()):
        shown = "/".join(str(p) for p in parts)
        raise ConfigError(f"{field}: {shown!r} leads outside {root} (to {path.resolve()}); refused")
    return path


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line (a metrics record); one write call so a line is never interleaved."""
    line = json.dumps(record, default=float) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_revision() -> str:
    here = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        # --no-optional-locks: `git status` may otherwise rewrite the repository's index (a write outside the run)
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
            text=True, timeout=5,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_writable(out_dir: str | os.PathLike, min_free_gb: float = 1.0) -> Path:
    """Fail at start-up, not after an hour, when the output directory cannot take a checkpoint."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as err:
        raise AlignError(f"output_dir {out}: cannot write there ({err.strerror or err})") from None
    free_gb = shutil.disk_usage(out).free / 1e9
    if free_gb < min_free_gb:
        raise AlignError(
            f"output_dir {out}: only {free_gb:.2f} GB free on its disk, need at least {min_free_gb} GB "
            "for checkpoints (free space or choose another --output_dir)"
        )
    return out


def write_run_info(cfg: Any, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Write the fully resolved config (config.yaml) plus versions, git revision and the CPU it ran on
    (align.models.loading.cpu_description: machines of one kind differ in speed) (run_info.json)."""
    from align.models.loading import cpu_description

    out = Path(out_dir)
    values = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(values, sort_keys=False))
    info = {"versions": package_versions(), "git_revision": git_revision(), "cpu": cpu_description(), **(extra or {})}
    atomic_write_json(out / "run_info.json", info)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise AlignError(f"{path} line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise AlignError(f"{path} line {number}: expected a JSON object")
            rows.append(row)
    return rows
