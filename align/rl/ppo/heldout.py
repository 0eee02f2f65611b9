"""Greedy replies of the policy to held-out prompts, before and after training, scored as every recipe's
summary scores them (align.evaluation.policy_report), and the reward-hacking verdict that compares them."""

from __future__ import annotations

from typing import Any

import torch

from align.records import PromptRecord
from align.rl.ppo.config import POLICY, PPOArgs, RewardFn
from align.rl.ppo.dist import Dist
from align.rl.ppo.health import mean_of
from align.rl.ppo.models import PPOModels


@torch.no_grad()
def evaluate_heldout(models: PPOModels, eval_prompts: list[PromptRecord], cfg: PPOArgs, dist: Dist,
                     reward_fn: RewardFn | None) -> dict[str, Any]:
    """Greedy replies of the policy to `eval_prompts`, scored as every recipe's summary scores them
    (align.evaluation.policy_report: coherent strict first, the verifier, degenerate and unasked-format shares, per-prompt
    rows for the paired interval), plus the mean of `reward_fn` over those replies when it is given (a reward
    that is not the verifier). Prompts are split over the processes and the rows gathered back in prompt order."""
    from align.evaluation.args import EvalArgs
    from align.evaluation.generate import generate as generate_replies
    from align.evaluation.policy import Policy
    from align.evaluation.policy_report import generation_block, reply_rows

    indices = list(range(dist.rank, len(eval_prompts), dist.world))
    mine = [eval_prompts[i] for i in indices]
    model, tokenizer = models.model, models.tokenizer
    eval_cfg = EvalArgs(max_new_tokens=cfg.summary_max_new_tokens, batch_size=cfg.forward_batch_size, modes=["greedy"])
    was_training = model.training
    model.eval()
    try:
        with models.phase(POLICY):
            gens = generate_replies(Policy(model=model, tokenizer=tokenizer, kind="model", path=POLICY),
                                    [p.prompt for p in mine], "greedy", eval_cfg) if mine else []
    finally:
        model.train(was_training)
    rows = reply_rows(mine, [(g.reply, g.eos, g.length_tokens) for g in gens])
    reward = 0.0
    if reward_fn is not None:
        for start in range(0, len(mine), cfg.forward_batch_size):
            chunk = slice(start, start + cfg.forward_batch_size)
            reward += float(sum(reward_fn(mine[chunk], [g.reply for g in gens[chunk]])))
    gathered = dist.gather_objects((indices, rows, reward))
    by_index = {i: row for part_indices, part_rows, _ in gathered for i, row in zip(part_indices, part_rows)}
    block = generation_block([by_index[i] for i in range(len(eval_prompts))])
    if reward_fn is not None:
        block["reward"] = sum(part[2] for part in gathered) / len(eval_prompts)
    return block


def heldout_line(block: dict[str, Any]) -> str:
    """"coherent strict 0.156, verifier strict 0.188, degenerate 0.250, 32 prompts" from evaluate_heldout's block."""
    parts = [f"{label} {block[key]:.3f}" for label, key in (("coherent strict", "verifier/coherent_strict"), ("verifier strict", "verifier/strict"),
                                                              ("degenerate", "gen/degenerate_share"), ("reward", "reward")) if key in block]
    return ", ".join(parts + [f"{len(block['rows'])} prompts"])


def hacking_warning(history: list[dict[str, float]], eval_before: dict[str, Any] | None, eval_after: dict[str, Any] | None,
                    window: int) -> str | None:
    """align.evaluation.degeneration.hacking_warning on a run: the mean reward of its first and of its last window / 2
    updates, and the held-out evaluations before and after training."""
    from align.evaluation.degeneration import hacking_warning as verdict

    k = max(1, window // 2)
    if len(history) < 2 * k:
        return None

    def heldout(block: dict[str, Any] | None) -> dict[str, Any] | None:
        return block and {"coherent_strict": block.get("verifier/coherent_strict"), "degenerate_share": block.get("gen/degenerate_share")}

    prompts = len(eval_before["rows"]) if eval_before else "?"
    return verdict(mean_of(history[:k], "objective/scores"), mean_of(history[-k:], "objective/scores"),
                   heldout(eval_before), heldout(eval_after), where=f"{prompts} held-out prompts (greedy)")
