"""Phase events: a trainer says when each phase of its work starts and ends; whoever listens measures it.

A listener is any object with some of these methods (a `transformers.TrainerCallback` can be one too):

    on_phase_start(name: str) -> None
    on_phase_end(name: str) -> None
    on_log(metrics: dict[str, float], rollout) -> None     # the PPO trainer, after it logged an update
    on_generated(prompt_tokens: int, completion_tokens: int) -> None     # GRPO / RLOO, after "generate"
    on_forward(tokens: int, head_tokens: int, with_grad: bool) -> None   # GRPO / RLOO, each log-prob pass

Who reports what:
- The PPO trainer (align.rl.ppo.trainer.PPOTrainer, `callbacks=[...]`) reports "generate", "score",
  "advantages" and "update" for every update, in that order, then `on_log` with the update's metrics
  and its rollout (align.rl.ppo.rollout.Rollout).
- A TRL trainer class that mixes in `ReportPhasesMixin` reports "precompute_ref" (DPO's reference
  log-probs, computed once in DPOTrainer's constructor) to its callbacks. TRL's own events
  (on_step_begin, on_step_end, on_log) reach every TrainerCallback as usual.
- TRL's GRPOTrainer or RLOOTrainer with `ReportGenerationMixin` reports, within each step, "generate"
  (sampling and decoding) nested in "generate_and_score" (generate, then the no-grad reference and
  old-policy passes and the rewards), the tokens generated, and every log-prob pass with its tokens.

The benchmark (bench/run.py, bench/harness/recorders.py) is one listener: it times and measures the phases it hears about, and nothing
in a trainer is replaced to measure it. A phase that stops being reported shows up there as missing.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch


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


class ReportGenerationMixin:
    """Put before TRL's GRPOTrainer or RLOOTrainer (both have these three methods): its callbacks hear the
    phases "generate_and_score" and, inside it, "generate"; then `on_generated(prompt_tokens,
    completion_tokens)` (every reply's prompt counted, TRL repeats it per generation); and
    `on_forward(tokens, head_tokens, with_grad)` for every pass through `_get_per_token_logps_and_entropies`:
    the real tokens of the batch, those whose logits the LM head computes, and whether it is the loss's pass
    (with gradients) or a reference / old-policy pass (without)."""

    def _generate(self, prompts: list):
        callbacks = self.callback_handler.callbacks
        with reported_phase(callbacks, "generate"):
            out = super()._generate(prompts)
        prompt_ids, completion_ids = out[0], out[1]  # GRPO's and RLOO's _generate both return these first
        notify(callbacks, "on_generated", sum(map(len, prompt_ids)), sum(map(len, completion_ids)))
        return out

    def _generate_and_score_completions(self, *args: Any, **kwargs: Any):
        with reported_phase(self.callback_handler.callbacks, "generate_and_score"):
            return super()._generate_and_score_completions(*args, **kwargs)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args: Any, **kwargs: Any):
        listeners = [c for c in self.callback_handler.callbacks if hasattr(c, "on_forward")]
        if listeners:  # the counts synchronise a GPU: only when someone listens
            tokens, head_tokens = int(attention_mask.sum()), int(attention_mask[:, -logits_to_keep:].sum())
            notify(listeners, "on_forward", tokens, head_tokens, torch.is_grad_enabled())
        return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
