"""TRL's GRPO on the raw verifier reward against the guarded reward: same model, prompts and minutes (issue 23).

    python bench/grpo_side_by_side.py --minutes 30 --out bench/results/grpo_side_by_side
    python bench/grpo_side_by_side.py --minutes 1 --eval_prompts 8 --out /tmp/sbs -- --model_name_or_path TINY

Two runs of recipes/grpo.py, which is TRL's GRPOTrainer with this project's settings, from the same starting model
on the `ifprefs:prefs_train` prompts, in the peer setup issue 23 measured: LoRA r16 on every linear layer, learning
rate 2e-4 (constant), 8 replies to each of 2 prompts a step, up to 128 new tokens, beta 0, sampling at
temperature 1 (TRL's default):

    raw      --reward_guard false   the verifier's score as it is (what TRL's trainer does with it as reward function)
    guarded  --reward_guard true    a degenerate reply (align.evaluation.degeneration) earns 0

Each trains alone on the machine (all its cores; one after the other) for --minutes of training (--max_train_minutes:
the step that crosses it is the last); --parallel runs both at once with one thread each instead, which is fair
when something else shares the machine but gives each run half the compute. Then the starting model and each run answer
the first --eval_prompts held-out `ifprefs:eval` prompts greedily (eval/evaluate.py, 128 new tokens) and each run
is compared with the start, and the guarded run with the raw one, on coherent strict (every constraint met and not
degenerate), IFEval strict, the verifier score, the degenerate share, formats nobody asked for and the EOS rate,
each a paired difference with its 95% bootstrap interval (align.report.stats.paired_delta, 2,000 resamples), every reply
judged by today's degeneration check (align.evaluation.metrics.judge_again). OUT/side_by_side.json holds the numbers and
the training logs' reward and reply length over time; OUT/replies.md the first --read replies of the start and
both runs side by side, with their verdicts, for a person to read. Arguments after `--` go to both runs.
A run or evaluation already in OUT is reused when the script runs again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from learning_curve import ROOT, evaluate, point, split_at_dashes

from align.errors import ConfigError, cli_main
from align.io import atomic_write_json, atomic_write_text
from align.io import read_jsonl
from align.models.loading import cpu_description
from align.report.stats import paired_delta

PEER = ["--lora_r", "16", "--lora_alpha", "32", "--learning_rate", "2e-4", "--lr_scheduler_type", "constant",
        "--num_generations", "8", "--per_device_train_batch_size", "16", "--max_completion_length", "128",
        "--beta", "0", "--temperature", "1.0"]
ARMS = {"raw": ["--reward_guard", "false"], "guarded": ["--reward_guard", "true"]}
METRICS = ("coherent_strict", "verifier_strict", "verifier_score", "degenerate", "unasked_format", "eos")


def train_arms(out: Path, minutes: float, extra: list[str], parallel: bool) -> None:
    """`minutes` of training of each arm, one after the other with every core (parallel: at once, one thread each);
    a finished run (summary.json) is kept."""
    procs = []
    for arm, flags in ARMS.items():
        run_dir = out / arm
        if (run_dir / "summary.json").exists():
            continue
        threads = "1" if parallel else str(os.cpu_count() or 1)
        cmd = ["accelerate", "launch", "recipes/grpo.py", "--output_dir", str(run_dir), "--max_steps", "100000",
               "--max_train_minutes", str(minutes), "--save_steps", "10", "--summary_prompts", "0", "--cpu_threads", threads,
               *PEER, *flags, *extra]
        print("$", " ".join(cmd), f"  (log: {out / f'{arm}.log'})", flush=True)
        log = open(out / f"{arm}.log", "a")
        procs.append((arm, subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
        if not parallel:
            _wait(out, *procs.pop())
    for arm, proc, log in procs:
        _wait(out, arm, proc, log)


def _wait(out: Path, arm: str, proc: subprocess.Popen, log) -> None:
    code = proc.wait()
    log.close()
    if code != 0:
        raise ConfigError(f"the {arm} run exited with {code}; see {out / f'{arm}.log'}")


def training_log(run_dir: Path) -> dict:
    """Steps, seconds, and the reward, reply length and EOS rate of the first and last 10 steps (metrics.jsonl)."""
    steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/reward" in r]
    summary = json.loads((run_dir / "summary.json").read_text())

    def mean(rows: list[dict], key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return round(sum(values) / len(values), 4) if values else None

    ends = {"first_10": steps[:10], "last_10": steps[-10:]}
    return {"steps": summary["steps"], "wall_time_s": summary["wall_time_s"], "peak_memory_mb": summary["peak_memory_mb"],
            **{f"{key.split('/')[-1]}_{name}": mean(rows, key) for name, rows in ends.items()
               for key in ("train/reward", "completions/mean_length", "completions/eos_rate")}}


def replies_markdown(base: list[dict], arms: dict[str, list[dict]], n: int) -> str:
    """The first n prompts: the start's reply and each run's, with the verifier's and the degeneration check's verdicts."""
    def verdict(r: dict) -> str:
        flags = ["coherent strict" if r["coherent_strict"] else "strict" if r["verifier_strict"] else "not strict"]
        flags += r["degenerate_reasons"]
        return "; ".join(flags) + ("" if r["eos"] else "; no EOS within 128 tokens")

    lines = [f"# Greedy replies to the first {n} held-out prompts: start, " + ", ".join(arms), ""]
    for i, row in enumerate(base[:n]):
        lines += [f"## {i}. {row['prompt_id']}", "", "> " + row["prompt"][-1]["content"].replace("\n", "\n> "), ""]
        for name, rows in {"start": base, **arms}.items():
            reply = rows[i]["reply"].replace("```", "'''")
            lines += [f"**{name}** ({verdict(rows[i])})", "", "```", reply, "```", ""]
    return "\n".join(lines)


@cli_main
def main() -> None:
    argv, extra = split_at_dashes(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="minutes of training of each run (they run at once)")
    parser.add_argument("--out", required=True, help="directory for the runs, the evaluations and the results")
    parser.add_argument("--eval_prompts", type=int, default=320, help="first N held-out ifprefs:eval prompts (all: 320)")
    parser.add_argument("--base_eval", default=None, help="an existing greedy evaluation of the starting model to reuse")
    parser.add_argument("--parallel", action="store_true", help="train both arms at once, one thread each")
    parser.add_argument("--read", type=int, default=20, help="replies of each run written side by side to replies.md")
    args = parser.parse_args(argv)
    if not args.minutes > 0:
        raise ConfigError(f"--minutes: expected > 0, got {args.minutes}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "side_by_side.log"
    start = extra[extra.index("--model_name_or_path") + 1] if "--model_name_or_path" in extra[:-1] else "base"

    started = time.time()
    train_arms(out, args.minutes, extra, args.parallel)
    base = evaluate(start, Path(args.base_eval) if args.base_eval else out / "eval-base", args.eval_prompts, log)
    rows = {arm: evaluate(str(out / arm), out / f"eval-{arm}", args.eval_prompts, log) for arm in ARMS}
    result = {
        "setup": {"peer_flags": PEER, "arms": ARMS, "extra_flags": extra, "minutes_each": args.minutes,
                  "threads_each": 1 if args.parallel else os.cpu_count(), "parallel": args.parallel, "eval_prompts": args.eval_prompts, "decoding": "greedy, 128 new tokens",
                  "start": start, "cpu": cpu_description()},
        "arms": {arm: {"training": training_log(out / arm), **point(base, rows[arm], {})} for arm in ARMS},
        "guarded_minus_raw": {key: {k: round(v, 4) if isinstance(v, float) else v
                                    for k, v in paired_delta(rows["raw"], rows["guarded"], key, 2000, 0).items()}
                              for key in METRICS},
        "wall_seconds_this_call": round(time.time() - started, 1),
    }
    atomic_write_json(out / "side_by_side.json", result)
    atomic_write_text(out / "replies.md", replies_markdown(base, rows, min(args.read, len(base))))
    for arm in ARMS:
        m = result["arms"][arm]["metrics"]
        print(f"{arm}: " + "; ".join(f"{key} {m[key]['baseline_mean']:.3f} -> {m[key]['run_mean']:.3f} "
                                     f"({m[key]['mean']:+.3f} [{m[key]['lo']:+.3f}, {m[key]['hi']:+.3f}])"
                                     for key in ("coherent_strict", "verifier_strict", "degenerate")), flush=True)
    print(f"wrote {out / 'side_by_side.json'} and {out / 'replies.md'}")


if __name__ == "__main__":
    main()
