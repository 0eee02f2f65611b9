"""Phase events: a trainer says when each phase of its work starts and ends; whoever listens measures it.

A listener is any object with some of these methods (a `transformers.TrainerCallback` can be one too):

    on_phase_start(name: str) -> None
    on_phase_end(name: str) -> None
    on_log(metrics: dict[str, float], rollout) -> None     # the PPO trainer, after it logged an update

Who reports what:
- The PPO trainer (align.rl.ppo.trainer.PPOTrainer, `callbacks=[...]`) reports "generate", "score",
  "advantages" and "update" for every update, in that order, then `on_log` with the update's metrics
  and its rollout (align.rl.ppo.rollout.Rollout).
- A TRL trainer class that mixes in `ReportPhasesMixin` reports "precompute_ref" (DPO's reference
  log-probs, computed once in DPOTrainer's constructor) to its callbacks. TRL's own events
  (on_step_begin, on_step_end, on_log) reach every TrainerCallback as usual.

The benchmark (align.bench) is one listener: it times and measures the phases it hears about, and nothing
in a trainer is replaced to measure it. A phase that stops being reported shows up there as missing.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator


def notify(listeners: Iterable[Any], event: str, *args: Any) -> None:
    """Call `event(*args)` on every listener that has that method, in order."""
    for listener in listeners:
        method = getattr(listener, event, None)
        if method is not None:
            method(*args)


@contextlib.contextmanager
def reported_phase(listeners: Iterable[Any], name: str) -> Iterator[None]:
    """`on_phase_start(name)` before the block and `on_phase_end(name)` after it (also when it raises)."""
    listeners = list(listeners)
    notify(listeners, "on_phase_start", name)
    try:
        yield
    finally:
        notify(listeners, "on_phase_end", name)


class ReportPhasesMixin:
    """Put before a TRL trainer class: its callbacks hear "precompute_ref" around DPO's precomputed reference
    log-probs (TRL computes them in the constructor, after the callbacks are registered and before any
    TrainerCallback event), so that they can be timed apart from the rest of the constructor."""

    def _precompute_ref_logps(self, *args: Any, **kwargs: Any):
        with reported_phase(self.callback_handler.callbacks, "precompute_ref"):
            return super()._precompute_ref_logps(*args, **kwargs)
