"""Step records of a benchmarked run, built from the events the trainers send: TRL's TrainerCallback events
(on_step_begin, on_step_end, on_log, whose `num_tokens` gives a step's tokens) and the phases a trainer reports
(align.trainers.phases). The bench listens; it replaces nothing in a trainer."""

from __future__ import annotations

import contextlib
import time

from transformers import TrainerCallback

from .flops import FLOPS_PER_TOKEN, pass_flops, ppo_phase_flops
from .meter import MemoryMeter, Phases, sync


class StepClock(TrainerCallback):
    """Clocks optimizer steps: the memory peak is reset at each step's start and `lap()` (called at its end) gives
    the seconds since the previous step ended (the first: since training began)."""

    def __init__(self, device: str, meter: MemoryMeter):
        self.device, self.meter = device, meter

    def on_train_begin(self, args, state, control, **kwargs):
        sync(self.device)
        self.last = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self.meter.reset()

    def lap(self) -> float:
        sync(self.device)
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds


class TrainerSteps(StepClock):
    """TRL's step events, and the phases the recipe's trainer reports (align.trainers.phases: DPO's precompute_ref,
    which TRL runs inside DPOTrainer.__init__) timed as phases of their own in `phases`."""

    def __init__(self, device: str, meter: MemoryMeter, phases: Phases):
        super().__init__(device, meter)
        self.phases = phases
        self.steps: list[dict] = []
        self.tokens_seen = 0

    def on_phase_start(self, name: str) -> None:
        self.phases.on_phase_start(name)

    def on_phase_end(self, name: str) -> None:
        self.phases.on_phase_end(name)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append({"step": state.global_step, "time_s": self.lap(), "peak_mb": self.meter.peak_mb()})

    def on_log(self, args, state, control, logs=None, **kwargs):
        steps = self.steps
        if not (logs and steps and steps[-1]["step"] == state.global_step):
            return
        if "loss" in logs:
            steps[-1]["loss"] = float(logs["loss"])
        # TRL's num_tokens: the non-padding tokens trained on so far (the attention mask's sum; a padding-free
        # batch's length), counted the same for every arm
        if "num_tokens" in logs:
            steps[-1]["tokens"] = int(logs["num_tokens"]) - self.tokens_seen
            self.tokens_seen = int(logs["num_tokens"])


class PPOSteps:
    """One step record per PPO update, built from the events the trainer reports (align.trainers.phases): its generate,
    score and update phases timed and measured by a `Phases` of their own, then `on_log` with the update's
    rollout. A phase the trainer did not report is an error, not a zero."""

    MEASURED = ("generate", "score", "update")

    def __init__(self, meter: MemoryMeter, device: str, n_params: int, n_head: int, ppo_epochs: int, shared_critic: bool = False):
        self.phases = Phases(meter, device)
        self.n_params, self.n_head, self.ppo_epochs, self.shared_critic = n_params, n_head, ppo_epochs, shared_critic
        self.steps: list[dict] = []
        self.start = time.perf_counter()  # the end of the previous update's log (the caller resets it before training)

    def on_phase_start(self, name: str) -> None:
        self.phases.on_phase_start(name)

    def on_phase_end(self, name: str) -> None:
        self.phases.on_phase_end(name)

    def on_log(self, metrics: dict, rollout) -> None:
        missing = [p for p in self.MEASURED if p not in self.phases.result]
        if missing:
            raise RuntimeError(f"PPO update {len(self.steps) + 1}: the trainer reported no {', '.join(missing)} phase (align.trainers.phases)")
        measured = dict(self.phases.result)
        self.phases.result.clear()  # the next update must report its own
        prompt_tokens, new_tokens = int(rollout.query_mask.sum()), int(rollout.response_mask.sum())
        flops = ppo_phase_flops(self.n_params, self.n_head, prompt_tokens, new_tokens, self.ppo_epochs, self.shared_critic)
        step = ppo_step_record(len(self.steps) + 1, time.perf_counter() - self.start, prompt_tokens, new_tokens, self.ppo_epochs, measured, flops, metrics)
        if not self.steps:  # the first rollout's responses, to check that another arm sampled the same ones
            from bench.trl_ppo.settings import response_hashes

            step["response_hashes"] = response_hashes([row[mask].tolist() for row, mask in zip(rollout.responses, rollout.response_mask.bool())])
        self.steps.append(step)
        self.start = time.perf_counter()


def ppo_step_record(index: int, time_s: float, prompt_tokens: int, new_tokens: int, ppo_epochs: int,
                    measured: dict[str, dict], flops: dict[str, float], metrics: dict) -> dict:
    """One PPO update's step record from its phases' time and peak (`measured`: generate, score, update), their
    FLOPs and the trainer's metrics (align's names: ppo/policy_loss, ppo/value_loss, objective/kl, objective/scores)."""
    gen, score, update = (measured[p] for p in PPOSteps.MEASURED)
    step = {
        "step": index, "time_s": time_s,
        "tokens": ppo_epochs * (prompt_tokens + new_tokens), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
        "peak_mb": max(gen["peak_mb"], score["peak_mb"], update["peak_mb"]),
        "generate_s": gen["time_s"], "score_s": score["time_s"], "update_s": update["time_s"],
        "generate_peak_mb": gen["peak_mb"], "score_peak_mb": score["peak_mb"], "update_peak_mb": update["peak_mb"],
        "generate_flops": flops["generate"], "score_flops": flops["score"], "update_flops": flops["update"],
        "flops": sum(flops.values()), "train_flops": flops["update"], "train_time_s": update["time_s"],
        **{key: float(metrics.get(name, float("nan"))) for key, name in (
            ("loss", "ppo/policy_loss"), ("value_loss", "ppo/value_loss"), ("kl", "objective/kl"), ("score", "objective/scores"))},
    }
    step["tokens_per_s"] = step["tokens"] / step["update_s"]
    return step


class GRPOSteps(StepClock):
    """TRL's step events, and what the trainer reports inside a step (align.trainers.phases.ReportGenerationMixin):
    generate, nested in generate_and_score (whose rest is the score phase), the tokens generated, and
    every log-prob pass (no grad: score; with grad: the loss's, in update). Set n_params, n_head and
    trained_per_token (FLOPS_PER_TOKEN) before training."""

    def __init__(self, device: str, meter: MemoryMeter):
        super().__init__(device, meter)
        self.step: dict[str, float] = {}
        self.steps: list[dict] = []
        self.started: dict[str, float] = {}
        self.n_params = self.n_head = self.trained_per_token = 0

    def on_step_begin(self, args, state, control, **kwargs):
        super().on_step_begin(args, state, control, **kwargs)
        self.step.update(generate_s=0.0, score_s=0.0, generate_peak_mb=0.0, score_peak_mb=0.0, prompt_tokens=0, new_tokens=0,
                         tokens=0, forward_passes=0, generate_flops=0, score_flops=0, update_flops=0)

    def on_phase_start(self, name: str) -> None:
        sync(self.device)
        self.started[name] = time.perf_counter()
        if name == "generate":
            self.span_stack = contextlib.ExitStack()
            self.span = self.span_stack.enter_context(self.meter.span())
        elif name == "generate_and_score":
            self.generated_before = self.step["generate_s"]

    def on_phase_end(self, name: str) -> None:
        if name == "generate":
            self.span_stack.close()
            sync(self.device)
            self.step["generate_s"] += time.perf_counter() - self.started.pop(name)
            self.step["generate_peak_mb"] = max(self.step["generate_peak_mb"], self.span["peak"])
            self.meter.reset()  # the scoring's peak starts here
        elif name == "generate_and_score":
            sync(self.device)
            self.step["score_s"] += time.perf_counter() - self.started.pop(name) - (self.step["generate_s"] - self.generated_before)
            self.step["score_peak_mb"] = max(self.step["score_peak_mb"], self.meter.peak_mb())
            self.meter.reset()  # the update's peak starts here

    def on_generated(self, prompt_tokens: int, new_tokens: int) -> None:
        self.step["prompt_tokens"] += prompt_tokens
        self.step["new_tokens"] += new_tokens
        self.step["generate_flops"] += pass_flops(self.n_params, self.n_head, prompt_tokens + new_tokens, new_tokens,
                                                  FLOPS_PER_TOKEN["forward"])

    def on_forward(self, tokens: int, head_tokens: int, with_grad: bool) -> None:
        if with_grad:  # the loss's pass; TRL makes the reference and old-policy passes under no_grad
            self.step["tokens"] += tokens
            self.step["update_flops"] += pass_flops(self.n_params, self.n_head, tokens, head_tokens, self.trained_per_token)
        else:
            self.step["forward_passes"] += 1
            self.step["score_flops"] += pass_flops(self.n_params, self.n_head, tokens, head_tokens, FLOPS_PER_TOKEN["forward"])

    def on_step_end(self, args, state, control, **kwargs):
        record = {"step": state.global_step, "time_s": self.lap(), **self.step, "update_peak_mb": self.meter.peak_mb()}
        record["update_s"] = record["time_s"] - record["generate_s"] - record["score_s"]
        record["peak_mb"] = max(record["generate_peak_mb"], record["score_peak_mb"], record["update_peak_mb"])
        record["flops"] = record["generate_flops"] + record["score_flops"] + record["update_flops"]
        record["train_flops"], record["train_time_s"] = record["update_flops"], record["update_s"]
        record["tokens_per_s"] = record["tokens"] / record["update_s"]
        record["generate_tokens_per_s"] = record["new_tokens"] / record["generate_s"] if record["generate_s"] else None
        self.steps.append(record)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and self.steps and self.steps[-1]["step"] == state.global_step:
            for key in ("loss", "reward"):
                if logs.get(key) is not None:
                    self.steps[-1][key] = float(logs[key])
