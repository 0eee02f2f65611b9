"""One evaluation, end to end (`align eval RUN`): generate, score every reply, write generations.jsonl, prefs.jsonl,
ppl.jsonl and summary.json."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from align.config import parse_config
from align.errors import AlignError, ConfigError, cli_main
from align.evaluation.args import DEFAULT_BETA, EvalArgs
from align.evaluation.degeneration import check_reply, unasked_formats
from align.evaluation.generate import Generation, generate, settings_for
from align.evaluation.logprobs import pair_logps, reply_logps
from align.evaluation.metrics import coherent_strict, distinct_n, loops_to_limit, pass_rates_by_constraint, prompt_fingerprint, repeated_ngram_share, words
from align.evaluation.policy import Policy, default_out_dir, load_policy, merged_for_eval, reference_of
from align.io import atomic_write_json, atomic_write_text
from align.log import get_logger
from align.models.generation import packed_linear_weights
from align.records import Message

logger = get_logger(__name__, tag="eval")


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def generation_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over one mode's generation rows (align.report adds confidence intervals)."""
    return {
        "n": len(rows),
        "coherent_strict": _mean([r["coherent_strict"] for r in rows]),
        "verifier_strict": _mean([r["verifier_strict"] for r in rows]),
        "degenerate_share": _mean([r["degenerate"] for r in rows]),
        "unasked_format_share": _mean([r.get("unasked_format") for r in rows]),
        "verifier_score": _mean([r["verifier_score"] for r in rows]),
        "n_with_constraints": sum(r["verifier_score"] is not None for r in rows),
        "rm_score": _mean([r["rm_score"] for r in rows]),
        "length_tokens": _mean([r["length_tokens"] for r in rows]),
        "eos_rate": _mean([r["eos"] for r in rows]),
        "distinct_1": _mean([r["distinct_1"] for r in rows]),
        "distinct_2": _mean([r["distinct_2"] for r in rows]),
        "repeated_4gram_share": _mean([r["repeated_4gram_share"] for r in rows]),
        "loops_to_limit_share": _mean([r.get("loops_to_limit") for r in rows]),
        "kl_k1": _mean([r["kl_k1"] for r in rows]),
        "kl_k3": _mean([r["kl_k3"] for r in rows]),
        "by_constraint": pass_rates_by_constraint(rows),
    }


def _verdict(reply: str, constraints: list[dict] | None, where: str) -> tuple[list[bool] | None, float | None, bool | None]:
    if not constraints:
        return None, None, None
    from align.evaluation.verifier import verify

    verdict = verify(reply, constraints, where)
    return [bool(p) for p in verdict.passed], float(verdict.score), bool(verdict.strict)


def _beta(policy: Policy, cfg: EvalArgs) -> float:
    if cfg.beta is not None:
        return cfg.beta
    beta = policy.run_config.get("beta")
    return float(beta) if isinstance(beta, (int, float)) and not isinstance(beta, bool) else DEFAULT_BETA


def _preference_rows(policy: Policy, cfg: EvalArgs, rm, log) -> list[dict[str, Any]]:
    from align.data.load import load_preferences

    pairs = load_preferences(cfg.pref_data, max_rows=cfg.max_pairs)
    prompts = [p.prompt for p in pairs]
    beta = _beta(policy, cfg)
    log(f"preferences: {len(pairs)} pairs from {cfg.pref_data} (beta {beta})")
    rows = [{"pair_id": p.id if p.id is not None else str(i), "source": p.source} for i, p in enumerate(pairs)]
    if rm is not None:
        rm_model, rm_tokenizer = rm
        chosen = _rm_scores(rm_model, rm_tokenizer, prompts, [p.chosen for p in pairs], cfg.batch_size)
        rejected = _rm_scores(rm_model, rm_tokenizer, prompts, [p.rejected for p in pairs], cfg.batch_size)
        for row, c, r in zip(rows, chosen, rejected):
            row.update(rm_chosen=c, rm_rejected=r)
    if policy.is_own_reference:
        # log pi - log pi_ref is 0 for every reply; no forward pass needed to know that.
        for row in rows:
            row.update(implicit_chosen=0.0, implicit_rejected=0.0)
    elif policy.has_reference:
        chosen_replies, rejected_replies = [p.chosen for p in pairs], [p.rejected for p in pairs]
        logps = pair_logps(policy.model, policy.tokenizer, prompts, chosen_replies, rejected_replies, cfg.batch_size)
        with reference_of(policy) as reference:
            ref_logps = pair_logps(reference, policy.tokenizer, prompts, chosen_replies, rejected_replies, cfg.batch_size)
        for i, row in enumerate(rows):
            lc, lr = logps[0][i][0], logps[1][i][0]
            rc, rr = ref_logps[0][i][0], ref_logps[1][i][0]
            # DPO's implicit reward [Rafailov et al. 2023, eq. 5 without the partition term, which cancels
            # between the two replies of one prompt]: beta * (log pi(y|x) - log pi_ref(y|x)).
            row.update(
                logp_chosen=lc, logp_rejected=lr, ref_logp_chosen=rc, ref_logp_rejected=rr,
                implicit_chosen=beta * (lc - rc), implicit_rejected=beta * (lr - rr),
            )
    return rows


def _rm_scores(model, tokenizer, prompts: list[list[Message]], replies: list[str], batch_size: int) -> list[float]:
    from align.models.reward_model import score_texts

    return [float(s) for s in score_texts(model, tokenizer, prompts, replies, batch_size=batch_size)]


def preference_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy = share of pairs whose chosen reply scores strictly higher; ties are counted apart."""
    out: dict[str, Any] = {"n": len(rows)}
    for name, a, b in (("rm", "rm_chosen", "rm_rejected"), ("implicit", "implicit_chosen", "implicit_rejected")):
        scored = [r for r in rows if r.get(a) is not None]
        if not scored:
            continue
        out[f"{name}_accuracy"] = sum(r[a] > r[b] for r in scored) / len(scored)
        out[f"{name}_ties"] = sum(r[a] == r[b] for r in scored)
        out[f"{name}_margin"] = _mean([r[a] - r[b] for r in scored])
    return out


def _perplexity_rows(policy: Policy, cfg: EvalArgs, log) -> list[dict[str, Any]]:
    from align.data.load import load_sft

    examples = load_sft(cfg.ppl_data, max_rows=cfg.max_ppl_rows)
    prompts, replies = [], []
    for ex in examples:
        last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        prompts.append(ex.messages[:last])
        replies.append(ex.messages[last]["content"])
    log(f"perplexity: {len(examples)} held-out replies from {cfg.ppl_data}")
    scored = reply_logps(policy.model, policy.tokenizer, prompts, replies, cfg.batch_size)
    return [
        {"row_id": ex.id if ex.id is not None else str(i), "source": ex.source, "tokens": n, "nll_sum": -logp}
        for i, (ex, (logp, n)) in enumerate(zip(examples, scored))
    ]


def perplexity_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Token-level perplexity over all replies: exp(sum of NLL / sum of tokens)."""
    tokens = sum(r["tokens"] for r in rows)
    nll = sum(r["nll_sum"] for r in rows)
    return {"n": len(rows), "tokens": tokens, "perplexity": _finite(math.exp(nll / tokens)) if tokens else None}


def settings_of(cfg: EvalArgs, prompt_ids: list[str], prompts: list[list[Message]], skipped: dict[str, int]) -> dict[str, Any]:
    """The settings summary.json records; `skipped` counts the prompt rows left out (on_bad_rows skip) by reason."""
    return {
        "prompts": cfg.prompts, "max_prompts": cfg.max_prompts, "n_prompts": len(prompts),
        "on_bad_rows": cfg.on_bad_rows, "prompt_rows_skipped": skipped,
        "prompts_sha256": prompt_fingerprint(prompt_ids, prompts),
        "modes": list(cfg.modes), "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k, "seed": cfg.seed,
        "repetition_penalty": cfg.repetition_penalty, "no_repeat_ngram_size": cfg.no_repeat_ngram_size, "num_beams": cfg.num_beams,
        "generate_batch_size": cfg.generate_batch_size, "batch_size": cfg.batch_size, "merge_adapter": cfg.merge_adapter,
        "reward_model": str(Path(cfg.reward_model).resolve()) if cfg.reward_model else None,
        "pref_data": cfg.pref_data, "max_pairs": cfg.max_pairs, "ppl_data": cfg.ppl_data, "max_ppl_rows": cfg.max_ppl_rows,
        "beta": cfg.beta, "dtype": cfg.dtype, "ref_model": cfg.ref_model,
    }


def evaluate(run: str, cfg: EvalArgs, log=None) -> dict[str, Any]:
    """Evaluate `run` (see the module docstring) and write its outputs; returns summary.json's content.

    An out directory holding an earlier evaluation is refused before anything is loaded, or moved aside under
    --overwrite true; one evaluation at a time writes there (align.runs)."""
    from align.runs import EVAL_ARTEFACTS, check_folder, release_lock, take_folder

    log = log or logger.info
    out = Path(cfg.out) if cfg.out else default_out_dir(run)
    found = check_folder(out, resume=False, overwrite=cfg.overwrite, names=EVAL_ARTEFACTS, dir_flag="--out", resumable=False,
                         what="an earlier evaluation")
    for note in take_folder(out, found, overwrite=cfg.overwrite):
        log(note)
    try:
        return _evaluate(run, cfg, out, log)
    finally:
        release_lock(out)


def _eval_prompts(cfg: EvalArgs) -> tuple[list[Any], list[str], dict[str, int]]:
    """The held-out prompt records, their ids (unique: replies are matched across runs by id) and the rows skipped
    as bad, by reason; an unknown constraint fails here, not after the generation."""
    from align.data.load import LoadStats, load_prompts
    from align.evaluation.verifier import check_constraints

    stats = LoadStats()
    records = load_prompts(cfg.prompts, max_rows=cfg.max_prompts, on_bad_rows=cfg.on_bad_rows, stats=stats)
    if not records:
        raise AlignError(f"{cfg.prompts}: no prompts")
    prompt_ids = [r.id if r.id is not None else str(i) for i, r in enumerate(records)]
    if len(set(prompt_ids)) != len(prompt_ids):
        dup = next(i for i in prompt_ids if prompt_ids.count(i) > 1)
        raise AlignError(f"{cfg.prompts}: prompt id {dup!r} appears twice; ids must be unique to match replies across runs")
    for record in records:
        if record.constraints:
            check_constraints(record.constraints, f"{record.source}: field 'constraints'")
    return records, prompt_ids, dict(stats.skipped)


def _skipped_note(skipped: dict[str, int]) -> str:
    n = sum(skipped.values())
    return f" ({n} row{'s' if n > 1 else ''} skipped as bad, on_bad_rows skip)" if n else ""


def _reply_row(record, prompt_id: str, gen: Generation, rm_score: float | None, mode: str, cfg: EvalArgs,
               generation: dict[str, Any]) -> dict[str, Any]:
    """One line of generations.jsonl: the reply and every judgement of it."""
    passed, score, strict = _verdict(gen.reply, record.constraints, f"{record.source}: field 'constraints'")
    degeneration = check_reply(gen.reply, record.prompt, record.constraints, ended=gen.eos)
    unasked = unasked_formats(gen.reply, record.constraints)
    tokens = words(gen.reply)
    return {
        "prompt_id": prompt_id, "prompt": record.prompt, "constraints": record.constraints,
        "mode": mode, "seed": gen.seed, "temperature": cfg.temperature if mode == "sample" else None,
        "top_p": cfg.top_p if mode == "sample" else None,
        "reply": gen.reply, "length_tokens": gen.length_tokens, "length_words": len(tokens), "eos": gen.eos,
        "coherent_strict": coherent_strict(strict, degeneration),
        "degenerate": degeneration.degenerate, "degenerate_reasons": list(degeneration.reasons),
        "unasked_format": bool(unasked), "unasked_formats": unasked,
        "verifier_passed": passed, "verifier_score": score, "verifier_strict": strict, "rm_score": rm_score,
        "distinct_1": distinct_n(tokens, 1), "distinct_2": distinct_n(tokens, 2),
        "repeated_4gram_share": repeated_ngram_share(tokens), "loops_to_limit": loops_to_limit(gen.eos, degeneration),
        "kl_k1": gen.kl_k1, "kl_k3": gen.kl_k3, "generation": generation,
    }


def _evaluate(run: str, cfg: EvalArgs, out: Path, log) -> dict[str, Any]:
    from align.trainers.common import peak_memory_mb

    t0 = time.time()
    records, prompt_ids, skipped = _eval_prompts(cfg)
    prompts = [r.prompt for r in records]
    log(f"{len(prompts)} prompts from {cfg.prompts}{_skipped_note(skipped)}; modes {', '.join(cfg.modes)}; loading {run}")

    policy = load_policy(run, cfg)
    rm = None
    if cfg.reward_model:
        from align.models.reward_model import load_reward_model

        rm_model, rm_tokenizer = load_reward_model(cfg.reward_model, dtype=cfg.dtype)
        merged = merged_for_eval(cfg, rm_model)
        rm_model = rm_model if merged is None else merged
        rm = (rm_model, rm_tokenizer)

    # Phase 1: generate, the policy's bf16 weights prepacked for oneDNN (the same outputs bit for bit)
    t_gen = time.time()
    with packed_linear_weights(policy.model):
        generations = {mode: generate(policy, prompts, mode, cfg, log) for mode in cfg.modes}
    generate_s = time.time() - t_gen

    # Phase 2: score every reply.
    t_score = time.time()
    rows: list[dict[str, Any]] = []
    generation = {mode: settings_for(mode, cfg).as_dict() for mode in cfg.modes}
    for mode in cfg.modes:
        replies = [g.reply for g in generations[mode]]
        rm_scores = _rm_scores(rm[0], rm[1], prompts, replies, cfg.batch_size) if rm else [None] * len(replies)
        rows += [_reply_row(record, pid, gen, rm_score, mode, cfg, generation[mode])
                 for record, pid, gen, rm_score in zip(records, prompt_ids, generations[mode], rm_scores)]
    pref_rows = _preference_rows(policy, cfg, rm, log) if cfg.pref_data else None
    ppl_rows = _perplexity_rows(policy, cfg, log) if cfg.ppl_data else None
    score_s = time.time() - t_score

    # Phase 3: write.
    files = {"generations": "generations.jsonl"}
    atomic_write_text(out / "generations.jsonl", _jsonl(rows))
    metrics: dict[str, Any] = {mode: {**generation_summary([r for r in rows if r["mode"] == mode]), "generation": generation[mode],
                                      "generation_name": settings_for(mode, cfg).describe()} for mode in cfg.modes}
    if pref_rows is not None:
        files["preferences"] = "prefs.jsonl"
        atomic_write_text(out / "prefs.jsonl", _jsonl(pref_rows))
        metrics["preferences"] = preference_summary(pref_rows)
    if ppl_rows is not None:
        files["perplexity"] = "ppl.jsonl"
        atomic_write_text(out / "ppl.jsonl", _jsonl(ppl_rows))
        metrics["perplexity"] = perplexity_summary(ppl_rows)
    summary = {
        "run": str(Path(run).resolve()) if Path(run).exists() else run,
        "method": policy.method,
        "policy": {
            "kind": policy.kind, "path": policy.path,
            "reference": "the policy itself" if policy.is_own_reference else policy.reference_name,
            "beta": _beta(policy, cfg),
        },
        "settings": settings_of(cfg, prompt_ids, prompts, skipped),
        "metrics": metrics,
        "files": files,
        "timing": {
            "generate_s": round(generate_s, 2), "score_s": round(score_s, 2), "total_s": round(time.time() - t0, 2),
            "generated_tokens": sum(r["length_tokens"] + r["eos"] for r in rows),
            "torch_threads": torch.get_num_threads(),
        },
        "peak_memory_mb": round(peak_memory_mb(), 1),
    }
    atomic_write_json(out / "summary.json", summary)
    log(f"wrote {out}/summary.json ({summary['timing']['total_s']} s)")
    return summary


USAGE = """Evaluate one policy on a fixed prompt set; write every generation and score as JSON lines.

    align eval outputs/dpo                                  # -> outputs/dpo/eval/
    align eval base --modes greedy --max_prompts 50         # the untrained default model
    align eval outputs/ppo --reward_model outputs/reward --prompts my_prompts.jsonl

RUN is a run directory (adapter/ or merged/), a model directory, or `base`. `python eval/evaluate.py ...` in a
checkout is the same command. See align/evaluation/ for what is measured and the files written
(generations.jsonl, prefs.jsonl, ppl.jsonl, summary.json).
"""


@cli_main
def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        parse_config(EvalArgs, ["--help"])
    if not argv or argv[0].startswith("--"):
        raise ConfigError("command line: expected RUN first (a run directory, a model directory or 'base'); see --help")
    evaluate(argv[0], parse_config(EvalArgs, argv[1:]))
