"""User-facing errors: one clear message and exit code 2, never a traceback.

Anything a user can cause (bad data, bad config, a model that will not fit) raises `AlignError`.
Entry points wrap their body in `cli_main`, which prints the message and exits 2.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable)


class AlignError(Exception):
    """An error the user can fix; its message names the file, line or field and what was expected."""


class ConfigError(AlignError):
    """A config file or command-line flag is wrong."""


class DataError(AlignError):
    """A data file, row or field is wrong."""


def close_process_group() -> None:
    """Destroy this process's torch.distributed group (a multi-process run) once its main has returned. Left to
    interpreter exit, gloo's worker threads were once torn down while still joinable: rank 1 of a finished
    2-process GRPO run aborted with "terminate called without an active exception" (SIGABRT). Local: no collective."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cli_main(fn: F) -> F:
    """Run `fn`; turn an AlignError into `error: <message>` on stderr and exit code 2; once `fn` has returned, destroy
    the torch.distributed process group (close_process_group); release run locks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
            close_process_group()
            return result
        except AlignError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        finally:
            # A run's folder lock, released before the process ends (align.runs; a killed one's the kernel drops)
            runs = sys.modules.get("align.runs")
            if runs is not None:
                runs.release_locks()

    return wrapper  # type: ignore[return-value]
