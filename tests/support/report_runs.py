"""Evaluation outputs built by hand, for the report's tests: a run directory as the recipes and eval/evaluate.py
leave it (`write_eval`), rows of it (`gen_row`), and a run whose scores scatter like a real one (`realistic_run`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

SETTINGS = {
    "prompts": "prompts.jsonl", "max_prompts": 100, "n_prompts": 0, "prompts_sha256": "", "modes": ["greedy", "sample"],
    "max_new_tokens": 128, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 0, "batch_size": 8,
    "reward_model": "/models/rm", "pref_data": "prefs.jsonl", "max_pairs": 100, "ppl_data": "sft.jsonl",
    "max_ppl_rows": 50, "beta": None, "dtype": "fp32", "ref_model": None,
}


def gen_row(pid: str, mode: str, *, verifier: float, rm: float, length: int, eos: bool = True, rep: float = 0.0, kl: float | None = None,
            degenerate: bool = False) -> dict:
    return {
        "coherent_strict": verifier == 1.0 and not degenerate, "degenerate": degenerate,
        "degenerate_reasons": ["repetition loop: (constructed)"] if degenerate else [],
        "prompt_id": pid, "prompt": [{"role": "user", "content": f"Prompt {pid}: answer in lowercase."}],
        "constraints": [{"type": "lowercase"}, {"type": "no_comma"}], "mode": mode, "seed": 0 if mode == "sample" else None,
        "temperature": 1.0 if mode == "sample" else None, "top_p": 1.0 if mode == "sample" else None,
        "reply": f"reply to {pid} " + "word " * min(length, 20), "length_tokens": length, "length_words": length, "eos": eos,
        "verifier_passed": [verifier >= 0.5, verifier >= 1.0], "verifier_score": verifier, "verifier_strict": verifier == 1.0,
        "rm_score": rm, "distinct_1": 1.0 - rep, "distinct_2": 1.0 - rep, "repeated_4gram_share": rep,
        "kl_k1": kl if mode == "sample" else None, "kl_k3": kl if mode == "sample" else None,
    }


def write_eval(run_dir: Path, rows: list[dict], *, method: str = "dpo", settings: dict | None = None,
               prefs: list[dict] | None = None, ppl: list[dict] | None = None, metrics: list[dict] | None = None,
               run_summary: dict | None = None) -> Path:
    """A run directory as the recipes and eval/evaluate.py leave it, from hand-built rows."""
    eval_dir = run_dir / "eval"
    eval_dir.mkdir(parents=True)
    (eval_dir / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = {"generations": "generations.jsonl"}
    if prefs is not None:
        (eval_dir / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
        files["preferences"] = "prefs.jsonl"
    if ppl is not None:
        (eval_dir / "ppl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ppl))
        files["perplexity"] = "ppl.jsonl"
    s = {**SETTINGS, "n_prompts": len({r["prompt_id"] for r in rows}), "prompts_sha256": "ab" * 32, **(settings or {})}
    summary = {"run": str(run_dir.resolve()), "method": method, "policy": {"kind": "adapter", "beta": 0.1}, "settings": s,
               "metrics": {}, "files": files, "timing": {"total_s": 12.5}}
    (eval_dir / "summary.json").write_text(json.dumps(summary))
    if metrics is not None:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run_dir / "summary.json").write_text(json.dumps(run_summary or {"method": method, "wall_time_s": 61.0,
                                                                      "tokens_processed": 12345, "peak_memory_mb": 2048.5}))
    return run_dir


def realistic_run(run_dir: Path, *, seed: int, verifier_p: float, rm_mean: float, length_mean: float, rep: float = 0.02,
                  kl: float = 0.0, eos_p: float = 0.97, n: int = 40, method: str = "dpo") -> Path:
    """A run whose per-prompt scores scatter around the given means, as real evaluations do."""
    rng = random.Random(seed)
    rows = []
    for mode in ("greedy", "sample"):
        for i in range(n):
            rows.append(gen_row(
                f"p{i:03d}", mode, verifier=rng.choice([0.0, 0.5, 1.0]) if rng.random() > verifier_p else 1.0,
                rm=rng.gauss(rm_mean, 0.5), length=max(1, int(rng.gauss(length_mean, length_mean / 5))),
                eos=rng.random() < eos_p, rep=min(1.0, max(0.0, rng.gauss(rep, 0.01))), kl=max(0.0, rng.gauss(kl, kl / 4 + 1e-3)),
            ))
    prefs = [{"pair_id": f"q{i}", "rm_chosen": rng.gauss(0.5, 1), "rm_rejected": rng.gauss(0, 1),
              "implicit_chosen": rng.gauss(0.1, 0.2), "implicit_rejected": rng.gauss(0, 0.2)} for i in range(30)]
    ppl = [{"row_id": str(i), "tokens": rng.randint(20, 60), "nll_sum": rng.uniform(40, 120)} for i in range(20)]
    metrics = [{"step": s, "time_s": 2.0 * s, "train/loss": 0.69 * 0.97 ** s + rng.gauss(0, 0.01),
                "rewards/margins": 0.02 * s + rng.gauss(0, 0.02)} for s in range(1, 41)]
    return write_eval(run_dir, rows, method=method, prefs=prefs, ppl=ppl, metrics=metrics)
