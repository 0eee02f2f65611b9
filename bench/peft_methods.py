"""PEFT methods side by side: one SFT run each on the default model, the same budget, one table.

    python bench/peft_methods.py --out bench/results/peft_methods
    python bench/peft_methods.py --methods lora,ia3 --steps 10 --eval_prompts 8 --ppl_rows 4 --out /tmp/peft
    python bench/peft_methods.py --out OUT --learning_rates ia3=1e-2 -- --max_length 384

Every method (`--peft`, align.models.loading.peft_config) trains `recipes/sft.py` for the same --steps on the built-in
ifprefs:sft rows (batch 4, the recipe's linear schedule, no merge, no summary), one after the other; the starting
model is the recipe's (--model_name_or_path after `--`, else the embedded default). Each run and the starting model are then evaluated by eval/evaluate.py: greedy replies to the first
--eval_prompts held-out `ifprefs:eval` prompts (128 new tokens) and the perplexity of the last reply of the first
--ppl_rows held-out SFT conversations (ifprefs:sft_test). The table (OUT/peft_methods.json, OUT/peft_methods.md)
gives per method: trainable parameters, peak memory of the training process (RSS), training tokens/s, coherent
strict and verifier score with the paired difference from the starting model and its 95% bootstrap interval,
the degenerate share and the held-out perplexity. A run or evaluation already in OUT is reused.

Learning rates differ by method, as they do in practice: LoRA and DoRA 1e-3 (the best measured SFT rate for LoRA
on this model, bench/results/learning_curve_sft.json); the others the rates of peft's own examples (IA3 3e-3,
prompt tuning 3e-2, p-tuning 1e-3, prefix tuning 1e-2). --learning_rates overrides any of them; arguments after
`--` go to every run unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from learning_curve import evaluate, point, run, split_at_dashes, starting_model

from align.errors import ConfigError, cli_main
from align.io import atomic_write_json, atomic_write_text
from align.io import read_jsonl
from align.models.loading import PEFT_METHODS, cpu_description

LEARNING_RATES = {"lora": 1e-3, "dora": 1e-3, "ia3": 3e-3, "prompt_tuning": 3e-2, "p_tuning": 1e-3, "prefix_tuning": 1e-2}


def evaluate_with_metrics(model: str, out: Path, n_prompts: int, ppl_rows: int, log: Path) -> tuple[list[dict], dict]:
    """(learning_curve.evaluate's judged greedy replies, the evaluation summary's metrics, perplexity included)."""
    rows = evaluate(model, out, n_prompts, log, ppl_rows=ppl_rows)
    return rows, json.loads((out / "summary.json").read_text())["metrics"]


def training_cost(run_dir: Path) -> dict:
    """Trainable and total parameters of the method as it trained (its saved peft config on the base, trainable:
    a saved p-tuning adapter keeps only the prompt its encoder made, and peft refuses to load a virtual-token
    adapter trainable), peak RSS and training tokens/s of one run."""
    from peft import PeftConfig, get_peft_model

    from align.models.loading import ModelArgs, count_parameters, load_model

    config = PeftConfig.from_pretrained(str(run_dir / "adapter"))
    config.inference_mode = False
    base, _ = load_model(ModelArgs(model_name_or_path=config.base_model_name_or_path), lora=False)
    trainable, total = count_parameters(get_peft_model(base, config))
    summary = json.loads((run_dir / "summary.json").read_text())
    speed = next((r["train/train_tokens_per_second"] for r in reversed(read_jsonl(run_dir / "metrics.jsonl"))
                  if "train/train_tokens_per_second" in r), None)
    return {"trainable_params": trainable, "total_params": total, "peak_memory_mb": summary["peak_memory_mb"],
            "train_tokens_per_s": speed, "tokens": summary["tokens_processed"], "steps": summary["steps"]}


def parse_rates(text: str) -> dict[str, float]:
    rates = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in PEFT_METHODS:
            raise ConfigError(f"--learning_rates: unknown method {name!r}; expected some of {', '.join(PEFT_METHODS)}")
        try:
            rates[name] = float(value)
        except ValueError:
            raise ConfigError(f"--learning_rates: {part!r}: expected method=rate, e.g. ia3=1e-2") from None
    return rates


def markdown(result: dict) -> str:
    lines = [f"SFT, {result['steps']} steps of 4 rows each, then greedy replies to {result['eval_prompts']} held-out prompts "
             f"and the perplexity of {result['ppl_rows']} held-out replies; {result['cpu']}.", "",
             "| method | lr | trainable params | peak MB | train tok/s | coherent strict (vs start) | verifier score (vs start) "
             "| degenerate | perplexity |", "|---|---|---|---|---|---|---|---|---|"]
    start = result["start"]
    lines.append(f"| start (no training) | | | | | {start['coherent_strict']:.3f} | {start['verifier_score']:.3f} "
                 f"| {start['degenerate_share']:.3f} | {start['perplexity']:.2f} |")
    for m in result["methods"]:
        def delta(key):
            d = m["vs_start"][key]
            return f"{d['run_mean']:.3f} ({d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}])"
        speed = "" if m["train_tokens_per_s"] is None else f"{m['train_tokens_per_s']:.1f}"
        lines.append(f"| {m['method']} | {m['learning_rate']:g} | {m['trainable_params']:,} | {m['peak_memory_mb']:.0f} | {speed} "
                     f"| {delta('coherent_strict')} | {delta('verifier_score')} | {m['degenerate_share']:.3f} | {m['perplexity']:.2f} |")
    return "\n".join(lines) + "\n"


@cli_main
def main() -> None:
    argv, recipe_args = split_at_dashes(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(LEARNING_RATES), help="comma-separated --peft methods, run in this order")
    parser.add_argument("--steps", type=int, default=30, help="SFT optimizer steps of every method")
    parser.add_argument("--eval_prompts", type=int, default=64, help="first N held-out ifprefs:eval prompts (all: 320)")
    parser.add_argument("--ppl_rows", type=int, default=50, help="first N held-out SFT conversations for perplexity")
    parser.add_argument("--learning_rates", default="", help="method=rate overrides, e.g. ia3=1e-2,prompt_tuning=1e-1")
    parser.add_argument("--out", required=True, help="directory for the runs, the evaluations and the table")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in PEFT_METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods: expected some of {', '.join(PEFT_METHODS)}, got {args.methods!r}")
    if args.steps < 1 or args.eval_prompts < 1 or args.ppl_rows < 1:
        raise ConfigError("--steps, --eval_prompts and --ppl_rows must be positive")
    rates = LEARNING_RATES | parse_rates(args.learning_rates)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "peft_methods.log"
    started = time.time()

    base_rows, base_metrics = evaluate_with_metrics(starting_model("sft", recipe_args), out / "eval-start", args.eval_prompts, args.ppl_rows, log)
    results = []
    for method in methods:
        run_dir = out / method / "run"
        if not (run_dir / "summary.json").exists():
            run(["accelerate", "launch", "recipes/sft.py", "--peft", method, "--output_dir", str(run_dir),
                 "--max_steps", str(args.steps), "--learning_rate", str(rates[method]), "--merge", "false",
                 "--summary_prompts", "0", *recipe_args], log)
        rows, metrics = evaluate_with_metrics(str(run_dir), out / method / "eval", args.eval_prompts, args.ppl_rows, log)
        compared = point(base_rows, rows, {})["metrics"]
        results.append({"method": method, "learning_rate": rates[method], **training_cost(run_dir),
                        "vs_start": {k: compared[k] for k in ("coherent_strict", "verifier_score", "degenerate")},
                        "degenerate_share": compared["degenerate"]["run_mean"],
                        "perplexity": metrics["perplexity"]["perplexity"]})
        d = compared["coherent_strict"]
        print(f"{method}: coherent strict {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}], "
              f"perplexity {results[-1]['perplexity']:.2f}", flush=True)
    start = {key: compared[key]["baseline_mean"] for key in ("coherent_strict", "verifier_score")} | {
        "degenerate_share": compared["degenerate"]["baseline_mean"], "perplexity": base_metrics["perplexity"]["perplexity"]}
    result = {"steps": args.steps, "eval_prompts": args.eval_prompts, "ppl_rows": args.ppl_rows, "recipe_args": recipe_args,
              "cpu": cpu_description(), "wall_seconds_this_call": round(time.time() - started, 1), "start": start,
              "methods": results}
    atomic_write_json(out / "peft_methods.json", result)
    atomic_write_text(out / "peft_methods.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
