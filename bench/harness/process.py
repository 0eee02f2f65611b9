"""Run a command in a fresh process (so peak memory never mixes between measurements) and read the JSON it writes."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

from . import REPO


class ChildFailed(Exception):
    """The child exited non-zero, ran past its time limit or wrote no result. `exit` is its exit code or
    "timeout"; `output` the tail of what it printed."""

    def __init__(self, exit: int | str, seconds: float, output: str):
        super().__init__(f"exit {exit} after {seconds:.0f} s")
        self.exit, self.seconds, self.output = exit, seconds, output


def run_json_child(argv: list[str], result_path: str | os.PathLike, *, timeout_s: float, env: dict[str, str] | None = None,
                   cwd: str | os.PathLike | None = None, log_path: str | os.PathLike | None = None, tail: int = 2000) -> dict:
    """Run `argv`, which writes one JSON object to `result_path`, and return that object; ChildFailed if it does not.

    The child gets this checkout first on PYTHONPATH and HF_HUB_OFFLINE=1 unless that is set, then `env` over
    both. Its stdout and stderr go to `log_path` when given, else are kept; the last `tail` characters of either
    come with a ChildFailed.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    started = time.time()
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(log_path, "w")) if log_path else subprocess.PIPE
        try:
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd, timeout=timeout_s)
            code, output = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as err:
            code, output = "timeout", err.output
    if log_path:
        output = Path(log_path).read_text(errors="replace")
    if isinstance(output, bytes):  # TimeoutExpired keeps what was read as bytes
        output = output.decode(errors="replace")
    if code != 0 or not os.path.exists(result_path):
        raise ChildFailed(code, time.time() - started, (output or "")[-tail:])
    return json.loads(Path(result_path).read_text())
