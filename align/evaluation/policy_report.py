"""The before/after numbers a training recipe prints in its summary: held-out preference accuracy and the
verifier's score on held-out prompts. Full evaluation (sampling, KL, repetition, reports) is
align.evaluation / eval/evaluate.py; this is the cheap subset a recipe can afford at the end of a run.
"""

from __future__ import annotations

import contextlib
import time

from align.log import get_logger
from align.records import PreferencePair, PromptRecord

logger = get_logger(__name__)


def _starting_model(model, adapter: bool):
    """The policy as it is (adapter=True) or as it started: the same model with its adapter disabled."""
    if adapter or not hasattr(model, "disable_adapter"):
        return contextlib.nullcontext()
    return model.disable_adapter()


def summarize_policy(model, tokenizer, pairs: list[PreferencePair], prompts: list[PromptRecord], *, beta: float,
                     adapter: bool, max_new_tokens: int = 128, batch_size: int = 16, start_logps: dict | None = None) -> dict:
    """{"pref/logp_accuracy", "pref/implicit_reward_accuracy", "verifier/coherent_strict", "verifier/score",
    "verifier/strict", "gen/degenerate_share", "gen/unasked_format_share", "rows", ...}.

    verifier/coherent_strict: share of prompts with constraints whose greedy reply meets every constraint
    AND is not degenerate (align.evaluation.degeneration); gen/degenerate_share over all prompts. `rows` holds the
    per-prompt values so that before_after can report a paired interval.

    logp_accuracy: share of pairs where the policy gives the chosen reply a higher log-probability than the
    rejected one; meaningful for the starting model too, but biased towards the shorter reply (a summed
    log-prob falls with every token). mean_logp_accuracy: the same with the log-prob per token.
    implicit_reward_accuracy: DPO's implicit reward beta * (log pi - log pi_ref) ranks chosen strictly
    above rejected (TRL's rewards/accuracies). For the starting model (adapter=False) the policy is its own
    reference, so every pair ties: 0.0, with pref/implicit_ties = the number of pairs.
    """
    from align.evaluation.args import EvalArgs
    from align.evaluation.generate import generate
    from align.evaluation.logprobs import pair_logps
    from align.evaluation.policy import Policy
    from align.models.generation import merged_adapter, own_forward, packed_linear_weights

    started = time.time()
    out: dict = {}
    was_training = model.training
    model.eval()
    # the trained policy runs with its adapter merged where that is exact (align.models.generation.merged_adapter)
    merge = merged_adapter(model) if adapter else contextlib.nullcontext()
    # then its bf16 weights prepacked for oneDNN, the same outputs bit for bit (packed_linear_weights); after training
    # without the mixed-precision wrapper accelerate leaves on its forward, as before training (own_forward)
    with own_forward(model), _starting_model(model, adapter), merge, packed_linear_weights(model):
        if adapter:
            how = ("the adapter merged into the weights" if merge.merged
                   else "the adapter unmerged (adapter_merges_faithfully: not a plain float32/bf16 LoRA, DoRA or IA3)")
            logger.info(f"summary (trained policy): {how}")
        if pairs:
            logger.info(f"summary: log-probs of {len(pairs)} held-out pairs")
            prompts_p = [p.prompt for p in pairs]
            chosen, rejected = pair_logps(model, tokenizer, prompts_p, [p.chosen for p in pairs], [p.rejected for p in pairs],
                                          batch_size)
            out["pref/logp_accuracy"] = sum(c[0] > r[0] for c, r in zip(chosen, rejected)) / len(pairs)
            out["pref/mean_logp_accuracy"] = sum(c[0] / max(c[1], 1) > r[0] / max(r[1], 1) for c, r in zip(chosen, rejected)) / len(pairs)
            if not adapter:
                out["pref/implicit_reward_accuracy"], out["pref/implicit_ties"] = 0.0, len(pairs)
            if not adapter and start_logps is not None:
                start_logps.update(chosen=chosen, rejected=rejected)
            out["pref/pairs"] = len(pairs)
        if prompts:
            policy = Policy(model=model, tokenizer=tokenizer, kind="model", path="policy")
            cfg = EvalArgs(max_new_tokens=max_new_tokens, batch_size=batch_size, modes=["greedy"])
            label = "trained policy" if adapter else "starting model"
            gens = generate(policy, [p.prompt for p in prompts], "greedy", cfg,
                            log=lambda msg: logger.info(f"summary ({label}): {msg}"))
            out.update(generation_block(reply_rows(prompts, [(g.reply, g.eos, g.length_tokens) for g in gens])))
    if pairs and adapter and hasattr(model, "disable_adapter"):
        if start_logps and "chosen" in start_logps:
            ref_chosen, ref_rejected = start_logps["chosen"], start_logps["rejected"]
        else:
            with own_forward(model), model.disable_adapter():
                ref_chosen, ref_rejected = pair_logps(model, tokenizer, prompts_p, [p.chosen for p in pairs],
                                                      [p.rejected for p in pairs], batch_size)
        margins = [beta * ((c[0] - rc[0]) - (r[0] - rr[0])) for c, r, rc, rr in zip(chosen, rejected, ref_chosen, ref_rejected)]
        out["pref/implicit_reward_accuracy"] = sum(m > 0 for m in margins) / len(margins)
        out["pref/implicit_ties"] = sum(m == 0 for m in margins)
        out["pref/implicit_margin_mean"] = sum(margins) / len(margins)
    model.train(was_training)
    out["time_s"] = round(time.time() - started, 1)
    return out


def reply_rows(prompts: list[PromptRecord], replies: list[tuple[str, bool, int]]) -> list[dict]:
    """One row per prompt for its reply (text, ended by EOS, length in tokens): the reply itself (so a person can
    read the summary's replies before and after side by side), the verifier's verdict per
    constraint, IFEval strict, coherent strict (strict and not degenerate: align.evaluation.degeneration), degenerate,
    formats nobody asked for. A prompt without constraints has None for the verifier's fields."""
    from align.evaluation.degeneration import check_reply, unasked_formats
    from align.evaluation.metrics import coherent_strict
    from align.evaluation.verifier import verify

    rows = []
    for i, (p, (reply, ended, length)) in enumerate(zip(prompts, replies, strict=True)):
        verdict = verify(reply, p.constraints) if p.constraints else None  # none: nothing to verify
        degeneration = check_reply(reply, p.prompt, p.constraints, ended=ended)
        unasked = unasked_formats(reply, p.constraints)
        rows.append({"prompt_id": p.id if p.id is not None else str(i), "mode": "greedy", "reply": reply,
                     "coherent_strict": coherent_strict(verdict.strict if verdict else None, degeneration),
                     "verifier_strict": verdict.strict if verdict else None,
                     "verifier_score": verdict.score if verdict else None, "degenerate": degeneration.degenerate,
                     "unasked_format": bool(unasked), "unasked_formats": unasked, "eos": bool(ended), "length_tokens": int(length),
                     "constraints": [{"type": c["type"]} for c in p.constraints or []],
                     "verifier_passed": [bool(x) for x in verdict.passed] if verdict else None})
    return rows


def generation_block(rows: list[dict]) -> dict:
    """The summary's numbers over reply_rows: coherent strict, verifier score and strict over the prompts with
    constraints; degenerate and unasked-format shares, mean length and EOS rate over all; pass rates per
    constraint type; and the rows themselves, so that before -> after is a paired difference (before_after)."""
    from align.evaluation.metrics import pass_rates_by_constraint

    verified = [r for r in rows if r["verifier_strict"] is not None]
    out: dict = {}
    if verified:
        out["verifier/coherent_strict"] = sum(bool(r["coherent_strict"]) for r in verified) / len(verified)
        out["verifier/score"] = sum(r["verifier_score"] for r in verified) / len(verified)
        out["verifier/strict"] = sum(bool(r["verifier_strict"]) for r in verified) / len(verified)
    out["verifier/prompts"] = len(verified)
    out["verifier/by_constraint"] = pass_rates_by_constraint(rows)
    if rows:
        out["gen/degenerate_share"] = sum(r["degenerate"] for r in rows) / len(rows)
        out["gen/unasked_format_share"] = sum(r["unasked_format"] for r in rows) / len(rows)
        out["gen/mean_length"] = sum(r["length_tokens"] for r in rows) / len(rows)
        out["gen/eos_rate"] = sum(r["eos"] for r in rows) / len(rows)
    out["rows"] = rows
    return out


def before_after(before: dict, after: dict, n_resamples: int = 1000, seed: int = 0) -> str:
    """The summary's before -> after numbers as lines a person reads at the end of a run.

    Coherent strict comes first, with the paired 95% bootstrap interval of after - before over the same
    prompts (align.report.stats.paired_delta), then IFEval strict and the degenerate share, then the rest.
    """
    lines = []
    if "rows" in before and "rows" in after:
        lines += [paired_line(label, before["rows"], after["rows"], key, n_resamples, seed) for label, key in (
            ("coherent strict (strict and not degenerate)", "coherent_strict"),
            ("verifier strict (IFEval rules, every constraint met)", "verifier_strict"),
            ("degenerate replies (share)", "degenerate"),
            ("formats nobody asked for (share)", "unasked_format"))]
        lines = [line for line in lines if line]
    rows = [("held-out preference accuracy, DPO implicit reward", "pref/implicit_reward_accuracy"),
            ("held-out preference accuracy, log-prob per token", "pref/mean_logp_accuracy"),
            ("held-out preference accuracy, summed log-prob", "pref/logp_accuracy"),
            ("verifier score on held-out eval prompts", "verifier/score")]
    if not lines:  # summaries written before per-prompt rows existed
        rows += [("verifier strict (every constraint met)", "verifier/strict")]
    lines += [f"  {label}: {before[key]:.3f} -> {after[key]:.3f}" for label, key in rows if key in before and key in after]
    if "verifier/by_constraint" in before and "verifier/by_constraint" in after:
        lines.append("  constraints met, by type: " + by_constraint_line(before["verifier/by_constraint"], after["verifier/by_constraint"]))
    counts = f"{after.get('pref/pairs', 0)} pairs, {after.get('verifier/prompts', 0)} prompts"
    return f"starting model -> trained policy ({counts}):\n" + "\n".join(lines)


def paired_line(label: str, before_rows: list[dict], after_rows: list[dict], key: str, n_resamples: int = 1000, seed: int = 0) -> str | None:
    """"  label: 0.156 -> 0.109 (-0.047, paired 95% CI [-0.117, +0.023], 128 prompts)"; None without pairs."""
    from align.report.stats import paired_delta

    delta = paired_delta(before_rows, after_rows, key, n_resamples, seed)
    if not delta["n"]:
        return None
    return (f"  {label}: {delta['baseline_mean']:.3f} -> {delta['run_mean']:.3f} ({delta['mean']:+.3f}, paired 95% CI "
            f"[{delta['lo']:+.3f}, {delta['hi']:+.3f}], {delta['n']} prompts)")


def by_constraint_line(before: dict[str, dict], after: dict[str, dict]) -> str:
    """"capitals 0/15 -> 9/15, lowercase 1/18 -> 2/18, ..." for the types both summaries counted, the largest
    change in pass rate first (align.evaluation.metrics.pass_rates_by_constraint gives each side)."""
    types = [t for t in before if t in after]
    types.sort(key=lambda t: -abs(after[t]["rate"] - before[t]["rate"]))
    return ", ".join(f"{t} {before[t]['passed']}/{before[t]['total']} -> {after[t]['passed']}/{after[t]['total']}" for t in types)
