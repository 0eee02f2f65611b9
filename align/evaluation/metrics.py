"""Per-reply text metrics, pure: repetition, distinct-n, loops to the limit, coherent strict, pass rates by constraint."""

from __future__ import annotations

import hashlib
import json
from typing import Any


from align.evaluation.degeneration import Degeneration
from align.records import Message


REPEAT_N = 4

def words(text: str) -> list[str]:
    """Lower-cased whitespace tokens: the unit of the repetition metrics."""
    return text.lower().split()


def distinct_n(tokens: list[str], n: int) -> float | None:
    """Unique n-grams / n-grams of one text; None when it has fewer than n tokens.

    ["a", "b", "a", "b"], n=2: bigrams ab, ba, ab -> 2 unique of 3 = 0.667.
    """
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return None
    return len(set(grams)) / len(grams)


def repeated_ngram_share(tokens: list[str], n: int = REPEAT_N) -> float | None:
    """Share of n-grams that repeat an earlier n-gram of the same text (seq-rep-n = 1 - distinct-n)."""
    d = distinct_n(tokens, n)
    return None if d is None else 1.0 - d


def loops_to_limit(eos: bool, degeneration: Degeneration) -> bool:
    """The reply ran to the token limit (no EOS) and is degenerate text: a loop the budget cut off, not a
    long answer the budget cut off (that is `not eos` alone)."""
    return bool(not eos and degeneration.degenerate)


def coherent_strict(strict: bool | None, degeneration: Degeneration) -> bool | None:
    """The headline pass: every constraint met (IFEval strict) AND the reply is not degenerate text
    (align.evaluation.degeneration); None when the prompt has no constraints."""
    return None if strict is None else bool(strict and not degeneration.degenerate)


def judge_again(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Saved generation rows (generations.jsonl) judged by today's checks, in place: `degenerate`,
    `degenerate_reasons`, `coherent_strict` and `unasked_format` from the reply, prompt, constraints and EOS;
    so that evaluations made before a check gained a rule compare with new ones. Returns `rows`."""
    from align.evaluation.degeneration import check_reply, unasked_formats

    for r in rows:
        verdict = check_reply(r["reply"], r["prompt"], r["constraints"], ended=r["eos"])
        r["degenerate"], r["degenerate_reasons"] = verdict.degenerate, list(verdict.reasons)
        r["coherent_strict"] = coherent_strict(r["verifier_strict"], verdict)
        r["unasked_format"] = bool(unasked_formats(r["reply"], r["constraints"]))
    return rows


def pass_rates_by_constraint(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per constraint type, how many of its instances the replies met: {type: {"passed", "total", "rate"}}.

    rows: one per reply, with "constraints" (list of {"type": ...}) and "verifier_passed" (one bool per
    constraint, in the same order; None for a prompt without constraints). Types in order of first
    appearance; a prompt with two constraints of one type counts twice. Shows what a run learned and what
    it did not ("capitals 0/15 -> 9/15") where the strict score moves by a few prompts.
    """
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        passed = row.get("verifier_passed")
        if passed is None:
            continue
        for constraint, ok in zip(row["constraints"], passed, strict=True):
            tally = out.setdefault(constraint["type"], {"passed": 0, "total": 0})
            tally["passed"] += bool(ok)
            tally["total"] += 1
    for tally in out.values():
        tally["rate"] = tally["passed"] / tally["total"]
    return out


def prompt_fingerprint(prompt_ids: list[str], prompts: list[list[Message]]) -> str:
    """sha256 of the prompt ids and messages in order: equal fingerprints mean the same prompt set."""
    blob = json.dumps([[i, p] for i, p in zip(prompt_ids, prompts)], sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


