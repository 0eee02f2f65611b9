"""The trl-ppo arm's virtual environment: TRL 0.11's stack beside this project's, built once and reused.

    python = ensure_venv(Path("outputs/bench"))     # OUTPUT/trl-ppo-venv/bin/python, built on first use

It is `python -m venv --system-site-packages`, so it reuses this interpreter's torch (and numpy, safetensors,
...), with the old stack pinned inside it (`PINS`); its own site-packages shadow the newer system ones. A
marker file records the pins once the install has succeeded; a folder whose marker differs (other pins, or a
build that stopped half way) is removed and built again. torch is pinned to the running one so that pip can
never replace it with another (a CUDA wheel, say).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from align.errors import AlignError

# TRL's last classic PPOTrainer (step(queries, responses, scores)) with a transformers, peft and accelerate of its
# months (checked: they import and run it with torch 2.13 on CPU). The rest are the versions pip resolved for
# these on 2026-12-03, pinned so that a rebuild gets the same environment.
PINS = {
    "trl": "0.11.4", "transformers": "4.46.3", "peft": "0.13.2", "accelerate": "1.0.1", "tokenizers": "0.20.3",
    "huggingface_hub": "0.36.2", "datasets": "5.0.1", "tyro": "1.0.17",
}
VENV_DIR = "trl-ppo-venv"
MARKER = "align-pins.json"


class VenvError(AlignError):
    """The venv could not be built (no registry, a version that does not resolve): one line, exit 2."""


def venv_python(root: Path) -> Path:
    return root / VENV_DIR / "bin" / "python"


def wanted_marker(torch_version: str) -> dict:
    """What a usable venv's marker holds: the pins and the torch they were installed beside."""
    return {"pins": PINS, "torch": torch_version}


def is_built(root: Path, torch_version: str) -> bool:
    """True when root's venv was built to completion with these pins beside this torch."""
    marker = root / VENV_DIR / MARKER
    try:
        built = json.loads(marker.read_text())
        return {k: built.get(k) for k in ("pins", "torch")} == wanted_marker(torch_version) and venv_python(root).exists()
    except (OSError, ValueError):
        return False


def install_command(python: Path, torch_version: str) -> list[str]:
    """pip inside the venv: the pins, and torch held at the running version (a local wheel, never a download)."""
    return [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            f"torch=={torch_version}", *(f"{name}=={version}" for name, version in PINS.items())]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and "is ignored" not in line]
    return lines[-1] if lines else "no output"


def ensure_venv(root: Path, *, torch_version: str | None = None, run: Callable | None = None,
                log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)) -> Path:
    """The venv's python under `root`, built first when it is missing or was built with other pins.

    Raises VenvError (one line: the step that failed and pip's last line) when it cannot be built.
    """
    if torch_version is None:
        import torch

        torch_version = torch.__version__.split("+")[0]
    if is_built(root, torch_version):
        return venv_python(root)
    folder = root / VENV_DIR
    shutil.rmtree(folder, ignore_errors=True)
    started = time.time()
    log(f"[bench] trl-ppo: building {folder} (trl {PINS['trl']}, transformers {PINS['transformers']}, once) ...")
    steps = [("create the venv", [sys.executable, "-m", "venv", "--system-site-packages", str(folder)]),
             ("install the pins", install_command(venv_python(root), torch_version))]
    for what, cmd in steps:
        proc = (run or subprocess.run)(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise VenvError(f"trl-ppo: could not {what} in {folder} (exit {proc.returncode}): "
                            f"{_last_line(proc.stderr + proc.stdout)}; a package registry must be reachable for its first build")
    seconds = round(time.time() - started, 1)
    (folder / MARKER).write_text(json.dumps({**wanted_marker(torch_version), "build_s": seconds}))
    log(f"[bench] trl-ppo: venv built in {seconds:.0f} s")
    return venv_python(root)
