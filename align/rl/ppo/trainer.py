"""PPOTrainer: the PPO loop, one update at a time, each update in five named phases.

    trainer = PPOTrainer(cfg, models, prompts, reward_fn, dist=dist, callbacks=[...])
    trainer.train()      # run_update() until total_updates: generate, score, advantages, update, log

The phases' math lives elsewhere (align.rl.ppo.rollout, .advantages, .losses, align.ops); this module owns the
order they run in, the optimizer, the data order, the all-reduce of gradients, the non-finite checks,
logging, checkpoints and signals. Every phase is reported to `callbacks` (align.trainers.phases), which is how the
benchmark measures them.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from align.errors import ConfigError
from align.io import append_jsonl, atomic_dir, atomic_write_json
from align.log import MAIN_ONLY, get_logger
from align.records import PromptRecord
from align.rl.ppo import checkpoint, losses
from align.rl.ppo.advantages import estimate_advantages
from align.rl.ppo.checkpoint import CHECKPOINT_PREFIX
from align.rl.ppo.config import CRITIC, POLICY, PPOArgs, RewardFn
from align.rl.ppo.dist import Dist
from align.rl.ppo.health import HealthStop, health_checks, rollout_metrics
from align.rl.ppo.heldout import evaluate_heldout, hacking_warning, heldout_line
from align.rl.ppo.kl_control import AdaptiveKLController, FixedKLController
from align.rl.ppo.models import PPOModels, _adapter_of
from align.rl.ppo.ptx import Demonstration, demonstration_batch, demonstration_indices, process_share, ptx_loss
from align.rl.ppo.rollout import (Rollout, critic_forward, decode_responses, policy_and_values_forward, policy_forward, row_seed,
                                  sample_responses, score_rollout)
from align.trainers.common import NonFiniteError, peak_memory_mb
from align.trainers.phases import notify, reported_phase

# token-weighted sums that minibatch_gradient returns ("tokens": the weight)
logger = get_logger(__name__, tag="ppo")
_LOSS_STATS = ("policy_loss", "value_loss", "clipfrac", "approx_kl", "ratio_mean", "value_clipfrac", "tokens")
PHASES = ("generate", "score", "advantages", "update")  # reported to the callbacks, in this order, every update


def _at(update: int | str) -> str:
    """Where a check failed, for its message: "update N" (update: the updates completed before it), or the label given
    (the SFT phase's "SFT phase step N")."""
    return update if isinstance(update, str) else f"update {update + 1}"


def _lr_lambda(kind: str, total_steps: int) -> Callable[[int], float]:
    if kind == "linear":
        return lambda step: max(0.0, 1.0 - step / max(1, total_steps))
    return lambda step: 1.0


class PPOTrainer:
    """The PPO loop over `prompts` for `models` with reward `reward_fn` (see align.rl.ppo).

    `verifier_fn` (the built-in verifier, when the prompts carry constraints) is logged next to the reward
    as `objective/verifier` and scores the held-out `eval_prompts` before and after training. `callbacks`
    hear every phase of every update and each update's metrics (align.trainers.phases).
    """

    def __init__(self, cfg: PPOArgs, models: PPOModels, prompts: list[PromptRecord], reward_fn: RewardFn, *,
                 dist: Dist | None = None, verifier_fn: RewardFn | None = None, reward_is_verifier: bool = False,
                 eval_prompts: list[PromptRecord] | None = None, reward_description: str = "?",
                 callbacks: Sequence[Any] = (), demonstrations: Sequence[Demonstration] = ()):
        self.cfg, self.models, self.prompts, self.reward_fn = cfg, models, prompts, reward_fn
        self.dist = dist or Dist(device=models.device)
        self.reward_is_verifier = reward_is_verifier
        self.eval_prompts = eval_prompts or []
        # the verifier can only score prompts that carry constraints
        self.verifier_fn = verifier_fn if verifier_fn is not None and all(p.constraints for p in prompts) else None
        self.reward_description = reward_description
        self.callbacks = list(callbacks)
        if cfg.rollout_batch_size % self.dist.world:
            raise ConfigError(f"config: rollout_batch_size ({cfg.rollout_batch_size}) must be a multiple of the number of processes ({self.dist.world})")
        if not prompts:
            raise ConfigError("config: prompts: no training prompts to roll out")
        # PPO-ptx (align.rl.ppo.ptx): demonstrations whose NLL joins the policy's loss at every optimizer step
        self.demonstrations = list(demonstrations) if cfg.ptx_data is not None else []
        if cfg.ptx_data is not None and not self.demonstrations:
            raise ConfigError(f"config: ptx_data: no demonstrations to train on from {cfg.ptx_data}")
        if self.demonstrations and cfg.ptx_batch_size % self.dist.world:
            raise ConfigError(f"config: ptx_batch_size ({cfg.ptx_batch_size}) must be a multiple of the number of processes ({self.dist.world})")
        self.out = Path(cfg.output_dir)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.policy_params = models.params_of(POLICY)
        self.critic_params = models.params_of(CRITIC)
        # One optimizer, two learning rates. No value-loss coefficient: the losses reach disjoint parameters,
        # Adam is invariant to their scale, and clipping is per model.
        self.optimizer = torch.optim.AdamW(
            [{"params": self.policy_params, "lr": cfg.learning_rate}, {"params": self.critic_params, "lr": cfg.critic_learning_rate}],
            weight_decay=0.0,
        )
        steps_per_update = cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.minibatch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg.lr_scheduler, cfg.total_updates * steps_per_update))
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target is not None
                       else FixedKLController(cfg.kl_coef))
        self.update_index = 0  # updates completed
        self.sft_steps_done = 0  # optimizer steps of the SFT phase completed (cfg.sft_steps, before the first update)
        self.sft_phase_log: dict[str, float] = {}
        self.tokens = 0  # prompt + response tokens rolled out, all processes
        self.elapsed_before = 0.0  # wall time of earlier sessions (resume)
        self.history: list[dict[str, float]] = []
        self.health_log: list[dict[str, Any]] = []
        self.eval_before: dict[str, float] | None = None
        self.eval_after: dict[str, float] | None = None
        self.last_good_checkpoint: Path | None = None
        self.stop_signal: int | None = None
        self._session_start: float | None = None
        self._writer = None

    def elapsed(self) -> float:
        return self.elapsed_before + (time.time() - self._session_start if self._session_start is not None else 0.0)

    # ---- data: a fresh shuffle of all prompts per pass; update u takes the prompts [u*P, (u+1)*P) of it, P =
    # rollout_batch_size / samples_per_prompt, and global row r answers prompt u*P + r // samples_per_prompt
    # (a prompt's samples are adjacent rows, each with its own sampling seed)
    def batch_records(self, update: int) -> tuple[list[PromptRecord], Tensor]:
        cfg, n = self.cfg, len(self.prompts)
        per_rank = cfg.rollout_batch_size // self.dist.world
        global_rows = torch.arange(self.dist.rank * per_rank, (self.dist.rank + 1) * per_rank)
        records, orders = [], {}
        for row in global_rows.tolist():
            data_epoch, offset = divmod(update * cfg.prompts_per_update + row // cfg.samples_per_prompt, n)
            if data_epoch not in orders:
                orders[data_epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 7919 + data_epoch))
            records.append(self.prompts[int(orders[data_epoch][offset])])
        return records, global_rows

    # ---- the loop
    def train(self, stop_after: int | None = None) -> dict[str, Any]:
        """Run updates until total_updates (or until `stop_after` more, as an interrupted run); returns the summary."""
        self._session_start = time.time()
        handlers = self._install_signal_handlers()
        try:
            if self.eval_before is None and self.eval_prompts:
                self.eval_before = self.evaluate()
                logger.info(f"held-out prompts before training (greedy): {heldout_line(self.eval_before)}")
            if self.sft_steps_done < self.cfg.sft_steps:
                self.sft_phase()
            done_here = 0
            while self.update_index < self.cfg.total_updates and (stop_after is None or done_here < stop_after):
                self.run_update()
                done_here += 1
            if self.eval_prompts and self.update_index >= self.cfg.total_updates:
                self._evaluate_after()
        finally:
            self._restore_signal_handlers(handlers)
            self.elapsed_before = self.elapsed()
            self._session_start = None
            if self._writer is not None:
                self._writer.flush()
        return self.summary()

    def run_update(self) -> dict[str, float]:
        """One PPO update: generate, score, estimate advantages, update, then log, checkpoint and check health.
        Each of the first four is a reported phase (align.trainers.phases); returns the update's metrics."""
        update, seconds = self.update_index, {}
        with self._phase("generate", seconds):
            rollout = self.generate(update)
        with self._phase("score", seconds):
            self.score(rollout, update)
        kl_coef = self.kl_ctl.value
        with self._phase("advantages", seconds):
            estimate_advantages(rollout, self.cfg, kl_coef, self.dist)
        with self._phase("update", seconds):
            train_stats = self.ppo_update(rollout, update)
        self.update_index += 1
        metrics = self.update_metrics(rollout, kl_coef, train_stats, seconds)
        self.kl_ctl.update(metrics["objective/kl"], self.cfg.rollout_batch_size)
        self.log(metrics, rollout)
        if self.update_index % self.cfg.save_steps == 0 or self.update_index == self.cfg.total_updates:
            self.save_checkpoint()
        self._after_update_checks(metrics)
        return metrics

    @contextlib.contextmanager
    def _phase(self, name: str, seconds: dict[str, float]) -> Iterator[None]:
        """Report phase `name` to the callbacks and put its own seconds (theirs left out) in `seconds[name]`."""
        with reported_phase(self.callbacks, name):
            start = time.time()
            yield
            seconds[name] = time.time() - start

    # ---- phase 1: generate
    def generate(self, update: int) -> Rollout:
        """This process's share of update `update`'s prompts, one sampled response each (decoded too)."""
        cfg = self.cfg
        records, global_rows = self.batch_records(update)
        seeds = [row_seed(cfg.seed, update, int(i)) for i in global_rows]
        query, query_mask, responses, response_mask, contains_eos = sample_responses(
            self.models, records, seeds, temperature=cfg.temperature, max_new_tokens=cfg.response_length)
        return Rollout(records, global_rows, query, query_mask, responses, response_mask, contains_eos,
                       decode_responses(self.models.tokenizer, responses, response_mask))

    # ---- phase 2: score
    def score(self, rollout: Rollout, update: int) -> None:
        """Old and reference log-probs, values and the reward of `rollout`; stops the run on a non-finite one."""
        score_rollout(self.models, rollout, self.reward_fn, self.cfg, None if self.reward_is_verifier else self.verifier_fn)
        if self.reward_is_verifier:
            rollout.verifier = rollout.raw_scores
        self._fail_if(update, self._first_non_finite({
            "the reward (scores)": rollout.raw_scores, "the old log-probs": rollout.old_logprobs,
            "the reference log-probs": rollout.ref_logprobs, "the values": rollout.old_values}, update))

    # ---- phase 4: the update
    def ppo_update(self, rollout: Rollout, update: int) -> dict[str, float]:
        """`ppo_epochs` passes over the rollout in shuffled global minibatches; one optimizer step each."""
        cfg, dist, models = self.cfg, self.dist, self.models
        B, M = cfg.rollout_batch_size, cfg.minibatch_size
        token_counts = dist.gather_rows(rollout.response_mask.sum(-1).float())  # (B,) tokens of every global row
        keys = _LOSS_STATS
        sums = dict.fromkeys(keys, 0.0)
        ratio_max = 0.0
        first_ratio_dev: float | None = None
        grad_norms: dict[str, list[float]] = {"policy": [], "critic": []}
        ptx_sums = [0.0, 0.0]  # the demonstrations' NLL, token-weighted, and their tokens
        steps_per_epoch = B // M
        models.model.train()  # dropout is zeroed (disable_dropout); train mode lets gradient checkpointing work
        try:
            for epoch in range(cfg.ppo_epochs):
                order = torch.randperm(B, generator=torch.Generator().manual_seed(row_seed(cfg.seed, update, 10**6 + epoch)))
                for start in range(0, B, M):
                    step = (update * cfg.ppo_epochs + epoch) * steps_per_epoch + start // M  # optimizer steps before this one
                    stats = self.minibatch_gradient(rollout, order[start:start + M], token_counts, update,
                                                    ptx_step=cfg.sft_steps + step)  # the SFT phase took the first demonstrations
                    if "ptx_tokens" in stats:
                        ptx_sums = [ptx_sums[0] + stats["ptx_nll_sum"], ptx_sums[1] + stats["ptx_tokens"]]
                    for key in keys:
                        sums[key] += stats[key]
                    ratio_max = max(ratio_max, stats["ratio_max"])
                    if epoch == 0 and start == 0:  # the first minibatch sees the rollout's own parameters
                        first_ratio_dev = stats["ratio_dev_max"]
                    grad_norms["policy"].append(float(torch.nn.utils.clip_grad_norm_(self.policy_params, cfg.max_grad_norm)))
                    grad_norms["critic"].append(float(torch.nn.utils.clip_grad_norm_(self.critic_params, cfg.max_grad_norm)))
                    self.optimizer.step()
                    self.scheduler.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            models.model.eval()
        totals = dist.sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        means = dict(zip(keys, (totals / totals[-1]).tolist()))
        maxima = dist.max(torch.tensor([ratio_max, first_ratio_dev or 0.0], dtype=torch.float64)).tolist()
        ptx = {}
        if self.demonstrations:  # the token mean over the update's demonstrations, all processes
            nll_sum, tokens = dist.sum(torch.tensor(ptx_sums, dtype=torch.float64)).tolist()
            ptx["ptx/nll"] = nll_sum / tokens
        return ptx | {
            "ppo/policy_loss": means["policy_loss"], "ppo/value_loss": means["value_loss"],
            "ppo/clipfrac": means["clipfrac"], "ppo/value_clipfrac": means["value_clipfrac"],
            "ppo/approx_kl": means["approx_kl"], "ppo/ratio_mean": means["ratio_mean"], "ppo/ratio_max": maxima[0],
            "ppo/first_minibatch_ratio_dev": maxima[1],
            "ppo/grad_norm_policy": sum(grad_norms["policy"]) / len(grad_norms["policy"]),
            "ppo/grad_norm_critic": sum(grad_norms["critic"]) / len(grad_norms["critic"]),
            "lr/policy": self.optimizer.param_groups[0]["lr"], "lr/critic": self.optimizer.param_groups[1]["lr"],
        }

    def minibatch_gradient(self, rollout: Rollout, global_rows: Tensor, token_counts: Tensor, update: int,
                           ptx_step: int | None = None) -> dict[str, float]:
        """The gradient of one minibatch's policy and value losses, left in .grad for the optimizer step; with
        demonstrations (PPO-ptx) and `ptx_step` (the optimizer steps before this one), plus ptx_coef x the token-mean
        NLL of that step's demonstrations (stats["ptx_nll_sum"] and stats["ptx_tokens"]: this process's part).

        Args:
            global_rows: (minibatch_size,) rows of the global batch; this process works on those it holds, in
                micro-batches of micro_batch_size.
            token_counts: (rollout_batch_size,) response tokens of every global row.
        Each loss is the minibatch's token mean: a micro-batch's token-mean loss is weighted by its share of the
        minibatch's tokens (over all processes) and the gradients are summed over micro-batches and processes.
        Weighting every micro-batch alike (1 / number of micro-batches, as gradient accumulation in TRL's PPO
        trainer does) would weight a token of a short micro-batch more than a token of a long one.
        Returns token-weighted sums of the loss statistics ("tokens": their weight) and maxima of the ratio and
        of |ratio - 1|, all over this process's rows. Raises NonFiniteError (on every process) before any
        optimizer step when a loss or a gradient is not finite.
        """
        rows_here = len(rollout)
        first_row = self.dist.rank * rows_here
        minibatch_tokens = token_counts[global_rows].sum()
        local = torch.tensor([int(r) - first_row for r in global_rows if first_row <= int(r) < first_row + rows_here], dtype=torch.long)
        stats = dict.fromkeys(_LOSS_STATS, 0.0) | {"ratio_max": 0.0, "ratio_dev_max": 0.0}
        self.optimizer.zero_grad(set_to_none=False)
        bad: str | None = None
        for micro_start in range(0, len(local), self.cfg.micro_batch_size):
            rows = local[micro_start:micro_start + self.cfg.micro_batch_size].to(self.models.device)
            bad = self._micro_batch_backward(rollout, rows, minibatch_tokens, update, stats)
            if bad is not None:
                break
        if bad is None and self.demonstrations and ptx_step is not None:
            bad = self._ptx_backward(ptx_step, update, stats)
        self._fail_if(update, bad)
        self._all_reduce_grads()
        self._check_grads(update)
        return stats

    def _micro_batch_backward(self, rollout: Rollout, rows: Tensor, minibatch_tokens: Tensor, update: int,
                              stats: dict[str, float]) -> str | None:
        """Backpropagate one micro-batch's share of the minibatch's policy and value losses and add its
        statistics to `stats`; returns what was not finite (nothing is backpropagated from then on), else None."""
        cfg, models = self.cfg, self.models
        mask = rollout.response_mask[rows]
        weight = mask.sum() / minibatch_tokens
        # Each loss is backpropagated inside its own phase, so gradient checkpointing recomputes with the
        # same adapter active. A shared critic (--critic shared) is one pass: pg_loss + vf_coef * vf_loss.
        with models.phase(POLICY, trainable=True):
            if models.shared_critic:
                logprobs, _, values = policy_and_values_forward(models, rollout, rows, cfg.temperature)
            else:
                logprobs, _ = policy_forward(models, rollout, rows, cfg.temperature)
            pg_loss, pg_stats = losses.policy_loss(logprobs, rollout.old_logprobs[rows], rollout.advantages[rows], mask, cfg.cliprange)
            bad = self._first_non_finite({"the policy loss": pg_loss}, update)
            if models.shared_critic:
                vf_loss, vf_clipfrac = losses.value_loss(values, rollout.old_values[rows], rollout.returns[rows], mask, cfg.cliprange_value)
                bad = bad or self._first_non_finite({"the value loss": vf_loss}, update)
                if bad is None:
                    ((pg_loss + cfg.vf_coef * vf_loss) * weight).backward()
            elif bad is None:
                (pg_loss * weight).backward()
        if not models.shared_critic:
            with models.phase(CRITIC, trainable=True):
                values = critic_forward(models, rollout, rows)
                vf_loss, vf_clipfrac = losses.value_loss(values, rollout.old_values[rows], rollout.returns[rows], mask, cfg.cliprange_value)
                bad = bad or self._first_non_finite({"the value loss": vf_loss}, update)
                if bad is None:
                    (vf_loss * weight).backward()
        if bad is not None:
            return bad
        n_tok = float(mask.sum())
        for key, value in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("clipfrac", pg_stats["clipfrac"]),
                           ("approx_kl", pg_stats["approx_kl"]), ("ratio_mean", pg_stats["ratio_mean"]),
                           ("value_clipfrac", vf_clipfrac)):
            stats[key] += float(value.detach()) * n_tok
        stats["tokens"] += n_tok
        stats["ratio_max"] = max(stats["ratio_max"], float(pg_stats["ratio_max"]))
        ratio = torch.exp(logprobs.detach() - rollout.old_logprobs[rows])
        stats["ratio_dev_max"] = max(stats["ratio_dev_max"], float((ratio - 1).abs()[mask].max()))
        return None

    def _ptx_backward(self, step: int, update: int | str, stats: dict[str, float]) -> str | None:
        """Backpropagate ptx_coef x the token-mean NLL of optimizer step `step`'s demonstrations (all processes'),
        this process's share in one pass: its token mean weighted by its share of the step's reply tokens, as the
        PPO losses are (the all-reduce sums the shares). Adds the NLL's token-weighted sum and the tokens to
        `stats`; returns what was not finite, else None."""
        cfg, models, demos = self.cfg, self.models, self.demonstrations
        everyone = demonstration_indices(len(demos), step, cfg.ptx_batch_size, cfg.seed)
        picked = process_share(everyone, self.dist.rank, self.dist.world)
        step_tokens = sum(len(demos[i].reply_ids) for i in everyone)
        batch = demonstration_batch([demos[i] for i in picked], models.tokenizer.pad_token_id, models.device)
        tokens = float(batch.response_mask.sum())
        with models.phase(POLICY, trainable=True):
            logprobs, _ = policy_forward(models, batch, torch.arange(len(batch), device=models.device), temperature=1.0)
            nll = ptx_loss(logprobs, batch.response_mask)
            bad = self._first_non_finite({"the ptx loss": nll}, update)
            if bad is None:
                (cfg.ptx_coef * nll * (tokens / step_tokens)).backward()
        stats["ptx_nll_sum"], stats["ptx_tokens"] = float(nll.detach()) * tokens, tokens
        return bad

    # ---- the SFT phase (cfg.sft_steps): the demonstrations' NLL alone, before the first update
    def sft_phase(self) -> None:
        """cfg.sft_steps optimizer steps of the PPO-ptx term alone (the demonstrations of ptx steps 0..sft_steps-1;
        the updates' ptx steps follow them), the policy's learning rate warmed up over the first tenth, then
        constant at learning_rate; the PPO schedule starts after them. Then a checkpoint at update 0. A signal in
        the phase stops the run before any checkpoint (a rerun starts over)."""
        cfg, dist, group = self.cfg, self.dist, self.optimizer.param_groups[0]
        scheduled_lr, warmup = group["lr"], max(1, cfg.sft_steps // 10)
        logger.info(f"SFT phase: {cfg.sft_steps} optimizer steps of {cfg.ptx_batch_size} demonstrations' NLL alone, "
                    f"learning rate {cfg.learning_rate:g} (warmup {warmup} steps), before the first update", extra=MAIN_ONLY)
        started, window, first = time.time(), [0.0, 0.0], None
        self.models.model.train()
        try:
            for step in range(cfg.sft_steps):
                group["lr"] = cfg.learning_rate * min(1.0, (step + 1) / (warmup + 1))
                stats: dict[str, float] = {}
                self.optimizer.zero_grad(set_to_none=True)
                where = f"SFT phase step {step + 1}"
                self._fail_if(where, self._ptx_backward(step, where, stats))
                self._all_reduce_grads(self.policy_params)
                self._check_grads(where)
                torch.nn.utils.clip_grad_norm_(self.policy_params, cfg.max_grad_norm)
                self.optimizer.step()
                window = [window[0] + stats["ptx_nll_sum"], window[1] + stats["ptx_tokens"]]
                if (step + 1) % 10 == 0 or step + 1 == cfg.sft_steps:
                    nll_sum, tokens = dist.sum(torch.tensor(window, dtype=torch.float64)).tolist()
                    first = nll_sum / tokens if first is None else first
                    self.sft_phase_log = {"steps": step + 1, "nll_first_10": first, "nll_last_10": nll_sum / tokens,
                                          "seconds": round(time.time() - started, 1)}
                    logger.info(f"SFT phase: step {step + 1}/{cfg.sft_steps} | nll {nll_sum / tokens:.3f} (last 10 steps) | "
                                f"{time.time() - started:.0f} s", extra=MAIN_ONLY)
                    window = [0.0, 0.0]
                signum = int(dist.max(torch.tensor([float(self.stop_signal or 0)])).item())
                if signum:
                    logger.warning(f"{signal.Signals(signum).name} in the SFT phase (step {step + 1}): stopped before any "
                                   "checkpoint; a rerun starts over", extra=MAIN_ONLY)
                    raise SystemExit(128 + signum)
        finally:
            group["lr"] = scheduled_lr
            self.optimizer.zero_grad(set_to_none=True)
            self.models.model.eval()
        self.sft_steps_done = cfg.sft_steps
        self.save_checkpoint()

    def _all_reduce_grads(self, params: list[Tensor] | None = None) -> None:
        """Sum gradients over processes (each holds its share of the global token mean); `params`: the policy's and
        the critic's."""
        params = params if params is not None else self.policy_params + self.critic_params
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.dist.world == 1:
            return
        flat = self.dist.sum(torch.cat([p.grad.reshape(-1) for p in params]))
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    # ---- non-finite values stop the run, on every process at once
    def _where_good(self) -> str:
        if self.last_good_checkpoint is not None:
            return f"the last good checkpoint is {self.last_good_checkpoint}"
        return "no checkpoint had been saved yet"

    def _first_non_finite(self, tensors: dict[str, Tensor | None], update: int | str) -> str | None:
        for name, tensor in tensors.items():
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                value = tensor[~torch.isfinite(tensor)].flatten()[0].item()
                return f"{_at(update)}: {name} is not finite ({value})"
        return None

    def _fail_if(self, update: int | str, message: str | None) -> None:
        """Raise NonFiniteError on every process when any process found a non-finite value."""
        if int(self.dist.max(torch.tensor([1.0 if message else 0.0])).item()) == 0:
            return
        message = message or f"{_at(update)}: a non-finite value on another process"
        raise NonFiniteError(f"{message}; stopped before the optimizer step; {self._where_good()}")

    def _check_grads(self, update: int | str) -> None:
        # after the all-reduce every process holds the same gradients, so all of them raise together
        adapters = list(self.models.model.peft_config)
        named = list(self.models.model.named_parameters()) + [(f"value_head.{n}", p) for n, p in self.models.value_head.named_parameters()]
        for name, p in named:
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                owner = _adapter_of(name, adapters) or "critic"
                raise NonFiniteError(f"{_at(update)}: the gradient of {name} ({owner}) is not finite; stopped before the "
                                     f"optimizer step; {self._where_good()}")

    # ---- phase 5: metrics, logs, health
    def update_metrics(self, rollout: Rollout, kl_coef: float, train_stats: dict[str, float],
                       seconds: dict[str, float]) -> dict[str, float]:
        """The update's metrics: the rollout's (align.rl.ppo.health.rollout_metrics), the update's losses, and
        each phase's seconds (time/<phase>_s)."""
        metrics = rollout_metrics(rollout, self.cfg, kl_coef, self.dist)
        new_tokens = metrics.pop("perf/new_tokens")
        self.tokens += int(new_tokens)
        metrics["perf/tokens"] = self.tokens
        metrics.update(train_stats)
        metrics.update({f"time/{name}_s": seconds[name] for name in PHASES})
        metrics["perf/tokens_per_s"] = new_tokens / max(sum(seconds.values()), 1e-9)
        return metrics

    @property
    def writer(self):
        if self._writer is None and self.cfg.report_to == "tensorboard" and self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.update_index)
        return self._writer

    def log(self, metrics: dict[str, float], rollout: Rollout) -> None:
        """Keep the update's metrics; on the main process write metrics.jsonl, TensorBoard and one line; then
        tell the callbacks (`on_log(metrics, rollout)`, every process)."""
        self.history.append(metrics)
        if self.dist.is_main:
            append_jsonl(self.out / "metrics.jsonl", {"step": self.update_index, "time_s": round(self.elapsed(), 3), **metrics})
            if self.writer is not None:
                for key, value in metrics.items():
                    self.writer.add_scalar(key, value, self.update_index)
                prompt = rollout.records[0].prompt[-1]["content"]
                self.writer.add_text("rollout/sample", f"**prompt:** {prompt}\n\n**response:** {rollout.texts[0]}", self.update_index)
            seconds = sum(metrics[f"time/{name}_s"] for name in PHASES)
            explained = f" | value ev {metrics['values/explained_variance']:.2f}" if "values/explained_variance" in metrics else ""
            verifier = f" | verifier {metrics['objective/verifier']:.3f}" if "objective/verifier" in metrics and not self.reward_is_verifier else ""
            logger.info(f"update {self.update_index}/{self.cfg.total_updates} | score {metrics['objective/scores']:.3f}{verifier}"
                        f" | kl {metrics['objective/kl']:.3f} | len {metrics['rollout/response_length']:.1f} | eos {metrics['rollout/eos_rate']:.2f}"
                        f" | clipfrac {metrics['ppo/clipfrac']:.3f}{explained} | {seconds:.1f} s")
        notify(self.callbacks, "on_log", metrics, rollout)

    def _warn(self, warning: str) -> None:
        logger.warning(f"health warning at update {self.update_index}: {warning}", extra=MAIN_ONLY)  # from reduced metrics
        self.health_log.append({"update": self.update_index, "warning": warning})

    def _saved_now(self) -> bool:
        return self.last_good_checkpoint is not None and self.last_good_checkpoint.name == f"{CHECKPOINT_PREFIX}{self.update_index:06d}"

    def _after_update_checks(self, metrics: dict[str, float]) -> None:
        # metrics are reduced over processes, so every process reaches the same verdicts
        warnings = health_checks(self.history, self.cfg, self.reward_is_verifier)
        if self.update_index == 1 and metrics["rollout/length_saturation"] > 0.5:
            logger.warning(f"note: {metrics['rollout/length_saturation']:.2f} of the first responses fill response_length "
                           f"({self.cfg.response_length}): scores see cut-off replies (raise response_length or set "
                           "missing_eos_penalty)", extra=MAIN_ONLY)
        for w in warnings:
            self._warn(w)
        if warnings and self.cfg.stop_on_health:
            if not self._saved_now():
                self.save_checkpoint()
            self.write_summary(stopped=f"health: {warnings[0]}")
            raise HealthStop(f"update {self.update_index}: stopped by --stop_on_health: {warnings[0]} "
                             f"(checkpoint {self.last_good_checkpoint}; --resume continues)")
        signum = int(self.dist.max(torch.tensor([float(self.stop_signal or 0)])).item())
        if signum:
            if not self._saved_now():
                self.save_checkpoint()
            name = signal.Signals(signum).name
            logger.warning(f"{name}: checkpoint {self.last_good_checkpoint} saved; exiting (rerun with --resume to continue)", extra=MAIN_ONLY)
            self.write_summary(stopped=name)
            raise SystemExit(128 + signum)

    # ---- held-out prompts: the verifier (and the reward) before and after training
    def evaluate(self) -> dict[str, Any]:
        """align.rl.ppo.heldout.evaluate_heldout of the policy now, with the run's reward unless it is the verifier."""
        return evaluate_heldout(self.models, self.eval_prompts, self.cfg, self.dist, None if self.reward_is_verifier else self.reward_fn)

    def _evaluate_after(self) -> None:
        self.eval_after = self.evaluate()
        logger.info(f"held-out prompts after training (greedy): {heldout_line(self.eval_after)}")
        warning = hacking_warning(self.history, self.eval_before, self.eval_after, self.cfg.health_window)
        if warning:
            self._warn(warning)

    # ---- checkpoints (align.rl.ppo.checkpoint)
    def save_checkpoint(self) -> Path:
        """checkpoints/update-NNNNNN/ of this update (see align.rl.ppo.checkpoint); older ones beyond
        save_total_limit are deleted."""
        dist = self.dist
        rng_states = dist.gather_objects(checkpoint.rng_state())
        path = self.out / "checkpoints" / f"{CHECKPOINT_PREFIX}{self.update_index:06d}"
        if dist.is_main:
            state = {
                "update": self.update_index,
                "data_position": self.update_index * self.cfg.rollout_batch_size,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "kl_controller": self.kl_ctl.state_dict(),
                "tokens": self.tokens,
                "sft_steps": self.sft_steps_done,
                "sft_phase": json.dumps(self.sft_phase_log),
                "elapsed_s": self.elapsed(),
                "history": [{k: float(v) for k, v in h.items()} for h in self.history],
                "health_log": json.dumps(self.health_log),
                "eval_before": json.dumps(self.eval_before),
                "world": dist.world,
            }
            checkpoint.write_checkpoint(path, self.models, state, rng_states, self.last_good_checkpoint)
            checkpoint.prune_checkpoints(self.out, self.cfg.save_total_limit)
        dist.barrier()
        self.last_good_checkpoint = path
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Everything a checkpoint holds: adapters, optimizer, scheduler, KL controller, counters, RNG state."""
        state = checkpoint.read_checkpoint(path, self.models, self.dist.rank)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.update_index = int(state["update"])
        self.tokens = int(state["tokens"])
        self.sft_steps_done = int(state.get("sft_steps", 0))  # checkpoints before the SFT phase existed: none
        self.sft_phase_log = json.loads(state.get("sft_phase", "{}"))
        self.elapsed_before = float(state["elapsed_s"])
        self.history = [dict(h) for h in state["history"]]
        self.health_log = json.loads(state["health_log"])
        self.eval_before = json.loads(state["eval_before"])
        self.last_good_checkpoint = path
        if self.dist.is_main:
            checkpoint.truncate_metrics(self.out, self.update_index)
        self.dist.barrier()

    # ---- SIGTERM / Ctrl-C: finish the update, checkpoint, exit
    def _install_signal_handlers(self) -> dict | None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = signum
            logger.warning(f"{signal.Signals(signum).name}: saving a checkpoint after this update, then exiting "
                           "(send it again to stop at once)")

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def _restore_signal_handlers(handlers: dict | None) -> None:
        for sig, previous in (handlers or {}).items():
            signal.signal(sig, previous)

    # ---- outputs
    def save_final(self) -> None:
        """adapter/ (the policy: loads with align.models.loading.load_trained) and critic/ (adapter + value head; the
        value head alone with --critic shared)."""
        if self.dist.is_main:
            for name, sub in ((POLICY, "adapter"), (CRITIC, "critic")):
                with atomic_dir(self.out / sub) as tmp:
                    checkpoint.export_adapter(self.models, name, tmp)
                    self.models.tokenizer.save_pretrained(str(tmp))
        self.dist.barrier()

    def summary(self, stopped: str | None = None) -> dict[str, Any]:
        kls = [h["objective/kl"] for h in self.history]
        last = self.history[-1] if self.history else {}
        peak = self.dist.max(torch.tensor([peak_memory_mb()], dtype=torch.float64)).item()
        summary = {
            "method": "ppo",
            "updates": self.update_index,
            "total_updates": self.cfg.total_updates,
            "wall_time_s": round(self.elapsed(), 1),
            "peak_memory_mb": round(peak, 1),
            "peak_memory_kind": "CUDA max allocated" if torch.cuda.is_available() else "peak RSS of the largest process",
            "processes": self.dist.world,
            "base": self.models.base.description,
            "reward": self.reward_description,
            "mean_kl": sum(kls) / len(kls) if kls else None,
            "final_kl": last.get("objective/kl"),
            "first_scores": self.history[0].get("objective/scores") if self.history else None,
            "final_scores": last.get("objective/scores"),
            "tokens_processed": self.tokens,
            "sft_phase": self.sft_phase_log or None,
            "train_rows": len(self.prompts),
            "held_out_rows": len(self.eval_prompts),
            "heldout_before": self.eval_before,
            "heldout_after": self.eval_after,
            "health_warnings": self.health_log,
        }
        if stopped:
            summary["stopped"] = stopped
        return summary

    def write_summary(self, stopped: str | None = None) -> dict[str, Any]:
        summary = self.summary(stopped)
        if self.dist.is_main:
            atomic_write_json(self.out / "summary.json", summary)
        return summary

