"""align's diagnostics: `logging` loggers under the "align" namespace, one handler, one line a message.

    from align.log import get_logger
    logger = get_logger(__name__)            # "[align] ..."; get_logger(__name__, tag="ppo") gives "[ppo] ..."
    logger.info("data: 16 training records")
    logger.warning("will be slow")

The handler writes `[tag] message` to whatever `sys.stderr` is when the line is written (so pytest's capture
and a redirected stderr see it) and the "align" logger does not propagate: a handler the user adds to the root
logger does not print each line a second time.

The level is --log_level (every recipe's config, `LogArgs`), else the ALIGN_LOG_LEVEL environment variable,
else info. In a run of several processes (accelerate launch, torchrun) only the main process says info and
debug; the others say warnings and errors, as `[align rank 1] ...`, so a line every rank reaches is printed
once. A warning that every rank reaches with the same text (computed from all-reduced numbers) passes
`extra=MAIN_ONLY` to be said once too.

Program output (a chat reply, `align plan`'s table, the summary JSON on stdout) stays `print`; an error that
ends a run stays align.errors' one line `error: ...`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Literal

from align.config import arg

ROOT = "align"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
HANDLER = "align-stderr"
MAIN_ONLY = {"main_only": True}  # extra= for a warning every process reaches with the same text: said once


@dataclass
class LogArgs:
    log_level: Literal["debug", "info", "warning", "error"] | None = arg(
        None, "what align says on stderr: debug | info | warning | error; none = $ALIGN_LOG_LEVEL, else info "
              "(the other processes of a multi-process run say only warnings and errors)")


def rank() -> int:
    """This process's rank: torch.distributed's once initialised, else RANK or LOCAL_RANK (set by the
    launchers before any code runs), else 0."""
    dist = sys.modules.get("torch.distributed")  # not imported here: logging must not load torch
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


class _Stderr(logging.Handler):
    """`[tag] message` (`[tag rank N] message` off the main process) on the current sys.stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            where = rank()
            if where != 0 and (record.levelno < logging.WARNING or getattr(record, "main_only", False)):
                return
            # the tag get_logger gave the logger (one made with logging.getLogger has none: "align")
            tag = getattr(logging.Logger.manager.loggerDict.get(record.name), "align_tag", ROOT)
            prefix = f"[{tag}]" if where == 0 else f"[{tag} rank {where}]"
            stream = sys.stderr
            stream.write(f"{prefix} {record.getMessage()}\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - as logging.StreamHandler: a failed write never ends the run
            self.handleError(record)


def _setup() -> logging.Logger:
    root = logging.getLogger(ROOT)
    for old in [h for h in root.handlers if h.get_name() == HANDLER]:  # this module imported again (a reload)
        root.removeHandler(old)
    handler = _Stderr()
    handler.set_name(HANDLER)
    root.addHandler(handler)
    root.propagate = False
    root.setLevel(LEVELS.get(os.environ.get("ALIGN_LOG_LEVEL", "").lower(), logging.INFO))  # a bad value: said by set_level
    return root


_root = _setup()


def set_level(level: str | None = None) -> None:
    """Set align's level: `level` (debug | info | warning | error), else $ALIGN_LOG_LEVEL, else info."""
    name = (level or os.environ.get("ALIGN_LOG_LEVEL") or "info").lower()
    if name not in LEVELS:
        from align.errors import ConfigError

        raise ConfigError(f"ALIGN_LOG_LEVEL: expected one of {', '.join(LEVELS)}, got {name!r}")
    _root.setLevel(LEVELS[name])


def get_logger(name: str, tag: str = ROOT) -> logging.Logger:
    """A logger under "align" (a recipe's `__main__` becomes "align.__main__"); its lines start `[tag]`."""
    full = name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}"
    logger = logging.getLogger(full)
    logger.align_tag = tag  # type: ignore[attr-defined] - read by the handler
    return logger
