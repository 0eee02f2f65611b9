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


def cli_main(fn: F) -> F:
    """Run `fn`; turn an AlignError into `error: <message>` on stderr and exit code 2; release run locks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AlignError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        finally:
            # A run's folder lock, released before the process ends (align.runs; a killed one's the kernel drops)
            runs = sys.modules.get("align.runs")
            if runs is not None:
                runs.release_locks()

    return wrapper  # type: ignore[return-value]
