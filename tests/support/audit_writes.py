"""Run a script as `python SCRIPT ARGS` would, recording every file-system write Python makes (PEP 578 audit hooks).

    python tests/support/audit_writes.py LOG SCRIPT [ARGS...]

LOG gets one JSON line per event: {"event", "path"} for opening a file to write, creating, renaming, removing or
linking one, and {"event": "subprocess", "args"} for each command started. What the hooks cannot see: writes by
native code handed a path (safetensors, torch's zip writer, tokenizers) and by subprocesses; see
tests/integration/test_paths.py for how the test covers those.
"""

from __future__ import annotations

import json
import os
import runpy
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.mkdir": (0,), "os.rename": (0, 1), "os.remove": (0,), "os.rmdir": (0,), "os.symlink": (1,),
               "os.link": (1,), "os.truncate": (0,), "shutil.rmtree": (0,), "shutil.copyfile": (1,), "os.chmod": (0,),
               "tempfile.mkstemp": (0,), "tempfile.mkdtemp": (0,)}


def main() -> None:
    log_path, script, *args = sys.argv[1:]
    events: list[dict] = []

    def absolute(path) -> str | None:
        if isinstance(path, int):  # a file descriptor: its opening was recorded
            return None
        path = os.fsdecode(path)
        return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)

    def hook(event: str, event_args: tuple) -> None:
        if event == "open":
            path, mode, flags = event_args
            writes = (mode is not None and any(c in str(mode) for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
            if writes and absolute(path):
                events.append({"event": event, "path": absolute(path)})
        elif event in PATH_EVENTS:
            for i in PATH_EVENTS[event]:
                if absolute(event_args[i]):
                    events.append({"event": event, "path": absolute(event_args[i])})
        elif event == "subprocess.Popen":
            events.append({"event": "subprocess", "args": [os.fsdecode(a) for a in (event_args[1] or [])]})

    sys.addaudithook(hook)
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        lines = "".join(json.dumps(e) + "\n" for e in events)  # before opening LOG, which is not the script's write
        with open(log_path, "w", encoding="utf-8") as f:
            f.write(lines)


if __name__ == "__main__":
    main()
