"""Learning curve of one training recipe: held-out verifier scores against training tokens and wall time.

    python bench/learning_curve.py --recipe sft --steps 32,64,128 --out bench/results/curve_sft \
        -- --learning_rate 1e-3
    python bench/learning_curve.py --recipe dpo --steps 24,48 --out bench/results/curve_dpo --eval_prompts 128
    python bench/learning_curve.py --recipe ppo --steps 6,12,24 --out bench/results/curve_ppo -- --reward verifier --sft_dir none

One run of `accelerate launch recipes/<recipe>.py` with a constant learning rate (so the checkpoint at step k
is the model a k-step run would give; `--lr_scheduler linear` decays it to 0 at the last step instead, and then
the earlier checkpoints are points along that one run, not what shorter runs would give) saves a checkpoint at
every step count in --steps (PPO: its updates, checkpoints/update-N, whose policy adapter is evaluated); each
checkpoint and the starting model answer the first --eval_prompts held-out `ifprefs:eval` prompts greedily (eval/evaluate.py,
128 new tokens). For every checkpoint the JSON gives coherent strict (every constraint met and not degenerate,
align.evaluation.degeneration), IFEval strict, verifier score, the degenerate share, the share of replies with a format
no constraint asked for (align.evaluation.degeneration.unasked_formats) and the EOS rate, each as the paired
difference from the starting model with its 95% bootstrap interval (align.report.stats.paired_delta, 2,000
resamples), and the training tokens and seconds spent to reach it. Written to OUT/learning_curve.json and
plotted to OUT/learning_curve.png; arguments after `--` go to the recipe unchanged.

A part already done (the starting model's evaluation, the run, a checkpoint's evaluation and its cost) is reused
when the script runs again with the same OUT: an interrupted curve continues where it stopped, and a constant-rate
curve asked for with more steps continues the run (`--resume true`) from its last checkpoint instead of starting over
(a decaying schedule's run cannot be extended: its rate belongs to its own length).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from functools import reduce
from math import gcd
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from align.errors import ConfigError, cli_main  # noqa: E402
from align.evaluation.metrics import judge_again  # noqa: E402
from align.io import atomic_write_json  # noqa: E402
from align.io import read_jsonl  # noqa: E402
from align.models.loading import cpu_description  # noqa: E402
from align.report.stats import paired_delta  # noqa: E402
from align.trainers.common import MARKER, last_marked_checkpoint  # noqa: E402

SCHEDULES = ("constant", "linear")  # learning rates every recipe here takes (PPO: --lr_scheduler, others: --lr_scheduler_type)
METRICS = ("coherent_strict", "verifier_strict", "verifier_score", "degenerate", "unasked_format", "eos")
RECIPES = ("sft", "dpo", "ppo")  # sft, dpo: TrainArgs (HF checkpoint-N); ppo: align.rl.ppo (checkpoints/update-N)


def run(cmd: list[str], log: Path) -> None:
    """Run `cmd` from the repository root, its output appended to `log`; a failure names the log."""
    print("$", " ".join(cmd), f"  (log: {log})", flush=True)
    with open(log, "a") as f:
        code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... exited with {code}; see {log}")


def evaluate(model: str, out: Path, n_prompts: int, log: Path, ppl_rows: int = 0) -> list[dict]:
    """Greedy replies of `model` to the first n_prompts held-out prompts (reused when out/summary.json exists),
    judged by today's degeneration check (align.evaluation.metrics.judge_again: a reused evaluation may predate a rule);
    ppl_rows > 0 also scores the perplexity of that many held-out SFT replies (out/summary.json's metrics)."""
    if not (out / "summary.json").exists():
        ppl = ["--max_ppl_rows", str(ppl_rows)] if ppl_rows else ["--ppl_data", "none"]
        run([sys.executable, "eval/evaluate.py", model, "--modes", "greedy", "--max_prompts", str(n_prompts),
             "--pref_data", "none", *ppl, "--out", str(out)], log)
    rows = [r for r in read_jsonl(out / "generations.jsonl") if r["mode"] == "greedy"]
    if len(rows) != n_prompts:
        raise ConfigError(f"{out}/generations.jsonl: expected {n_prompts} greedy replies, found {len(rows)}; "
                          "evaluate into another --out")
    return judge_again(rows)


def _step(checkpoint: Path | None) -> int:
    return int(checkpoint.name.split("-")[-1]) if checkpoint else 0


def starting_model(recipe: str, recipe_args: list[str]) -> str:
    """What the run starts from: the recipe's --model_name_or_path where given, else the embedded default ("base");
    PPO starts from its --sft_dir, which must be given (its default, outputs/sft, may or may not exist)."""
    def flag(name: str) -> str | None:
        return recipe_args[recipe_args.index(name) + 1] if name in recipe_args[:-1] else None

    if recipe == "ppo":
        sft_dir = flag("--sft_dir")
        if sft_dir is None:
            raise ConfigError("--recipe ppo: give the starting model after --: --sft_dir DIR (an SFT run) or --sft_dir none "
                              "(--model_name_or_path, else the embedded default)")
        if sft_dir.lower() != "none":
            return sft_dir
    return flag("--model_name_or_path") or "base"


def last_step(recipe: str, run_dir: Path) -> int:
    """The step of the run's newest complete checkpoint (0: none). PPO's are written whole and renamed."""
    if recipe == "ppo":
        from align.rl.ppo.checkpoint import list_checkpoints

        found = list_checkpoints(run_dir)
        return _step(found[-1]) if found else 0
    return _step(last_marked_checkpoint(run_dir))


def checkpoint_at(recipe: str, run_dir: Path, step: int) -> tuple[Path, Path | None]:
    """(the checkpoint directory of `step`, the model in it to evaluate; None when the checkpoint is missing)."""
    if recipe == "ppo":
        from align.rl.ppo.checkpoint import CHECKPOINT_PREFIX

        checkpoint = run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:06d}"
        return checkpoint, checkpoint / "policy" if (checkpoint / "state.pt").exists() else None
    checkpoint = run_dir / f"checkpoint-{step}"
    return checkpoint, checkpoint if (checkpoint / MARKER).exists() else None


def launch_args(recipe: str, run_dir: Path, steps: list[int], schedule: str = "constant") -> list[str]:
    """The recipe's flags for one run at learning-rate `schedule` (constant, or linear decay to 0 at the last step)
    that saves every step in `steps`, without its summary."""
    interval = reduce(gcd, steps)  # saves every step in --steps (and the multiples between, kept too)
    keep = str(max(2, steps[-1] // interval + (steps[0] == 0)))  # and step 0 when asked (PPO's checkpoint after its SFT phase)
    if recipe == "ppo":
        return ["--output_dir", str(run_dir), "--total_updates", str(steps[-1]), "--save_steps", str(interval),
                "--lr_scheduler", schedule, "--save_total_limit", keep, "--num_eval_prompts", "0"]
    return ["--output_dir", str(run_dir), "--max_steps", str(steps[-1]), "--save_steps", str(interval),
            "--lr_scheduler_type", schedule, "--save_total_limit", keep, "--summary_prompts", "0"]


def ppo_checkpoint_cost(checkpoint: Path) -> dict:
    """Training tokens (prompt and response tokens of the rollouts) and seconds at a PPO checkpoint (its state.pt;
    the seconds are summed over resumed sessions by the trainer)."""
    import torch

    state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)
    return {"step": _step(checkpoint), "tokens": int(state["tokens"]), "train_seconds": round(float(state["elapsed_s"]), 1)}


def checkpoint_cost(checkpoint: Path) -> dict:
    """Training tokens and seconds at a checkpoint, from its trainer_state.json (None where not logged).

    A resumed run logs train_runtime from 0 again: the seconds are summed over the segments of the run."""
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    seconds, segment = None, 0.0
    for entry in history:
        runtime = entry.get("train_runtime")
        if runtime is None:
            continue
        if seconds is not None and runtime < segment:  # a new segment started (the run was resumed)
            seconds += segment
        seconds = seconds or 0.0
        segment = float(runtime)
    last = history[-1] if history else {}
    return {"step": _step(checkpoint), "tokens": last.get("num_input_tokens_seen"),
            "train_seconds": None if seconds is None else round(seconds + segment, 1)}


def point(base: list[dict], rows: list[dict], cost: dict) -> dict:
    deltas = {}
    for key in METRICS:
        d = paired_delta(base, rows, key, 2000, 0)
        deltas[key] = {k: round(d[k], 4) for k in ("baseline_mean", "run_mean", "mean", "lo", "hi")} | {"n": d["n"]}
    return cost | {"metrics": deltas}


def band(points: list[dict], key: str) -> tuple[list[float], list[float], list[float]]:
    """(run means, lower, upper) of `key` at the starting model (first) and each checkpoint: the line and its shaded
    95% interval as every curve plot draws them."""
    base = points[0]["metrics"][key]["baseline_mean"] if points else 0
    return ([base] + [p["metrics"][key]["run_mean"] for p in points], [base] + [base + p["metrics"][key]["lo"] for p in points],
            [base] + [base + p["metrics"][key]["hi"] for p in points])


def save_figure(fig, path: Path) -> None:
    """Write the figure atomically (a temporary file renamed over `path`)."""
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    points = result["points"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [p["tokens"] if p["tokens"] is not None else p["step"] for p in points]
    xlabel = "training tokens" if all(p["tokens"] is not None for p in points) else "optimizer steps"
    for ax, keys, title in ((axes[0], ("coherent_strict", "verifier_strict"), "strict score (held-out, greedy)"),
                            (axes[1], ("degenerate", "unasked_format", "eos"), "degenerate / unasked format / EOS")):
        for key in keys:
            y, lo, hi = band(points, key)
            xs = [0] + x
            ax.plot(xs, y, marker="o", label=key.replace("_", " "))
            ax.fill_between(xs, lo, hi, alpha=0.2)
        ax.set_xlabel(xlabel)
        if xlabel == "training tokens":  # 125000 -> 125k, so that the tick labels do not run into each other
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    rate = {"constant": "constant LR", "linear": "LR decaying to 0 at the last step"}[result.get("lr_scheduler_type", "constant")]
    what = (f"{result['recipe']} {' '.join(result['recipe_args'])}, {rate}: {result['eval_prompts']} held-out prompts, "
            "95% paired intervals")
    fig.suptitle(f"{textwrap.fill(what, 120)}\n{result['cpu']}", fontsize=9)  # a long command wraps, not cut off
    fig.tight_layout()
    save_figure(fig, path)


def split_at_dashes(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this script's arguments, the arguments after `--` that go to the recipe unchanged)."""
    if "--" not in argv:
        return argv, []
    return argv[: argv.index("--")], argv[argv.index("--") + 1 :]


def evaluation_parser(doc: str, out_help: str, recipes: tuple[str, ...] = RECIPES) -> argparse.ArgumentParser:
    """The arguments every held-out comparison script here shares: the recipe, the output folder, the prompts."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--recipe", required=True, choices=recipes)
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--eval_prompts", type=int, default=320, help="first N held-out ifprefs:eval prompts (all: 320)")
    parser.add_argument("--base_eval", default=None, help="an existing greedy evaluation of the starting model to reuse")
    return parser


@cli_main
def main() -> None:
    argv, recipe_args = split_at_dashes(sys.argv[1:])
    parser = evaluation_parser(__doc__, "directory for the run, the evaluations and the results")
    parser.add_argument("--steps", required=True, help="comma-separated optimizer step counts to evaluate at (PPO: updates; "
                        "0 = the checkpoint after its SFT phase, --sft_steps)")
    parser.add_argument("--lr_scheduler", choices=SCHEDULES, default="constant",
                        help="the run's learning rate: constant (each checkpoint is what a run of that length gives), or "
                             "linear decay to 0 at the last of --steps")
    args = parser.parse_args(argv)
    try:
        steps = sorted({int(s) for s in args.steps.split(",") if s.strip()})
    except ValueError:
        raise ConfigError(f"--steps: expected comma-separated step counts, got {args.steps!r}") from None
    if not steps or steps[0] < (0 if args.recipe == "ppo" else 1) or steps[-1] < 1:
        raise ConfigError(f"--steps: expected positive step counts (and 0 for PPO with --sft_steps: the checkpoint after "
                          f"its SFT phase), got {args.steps!r}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "learning_curve.log"
    run_dir = out / "run"

    start = starting_model(args.recipe, recipe_args)
    base = evaluate(start, Path(args.base_eval) if args.base_eval else out / "eval-base", args.eval_prompts, log)
    started = time.time()
    done = {s for s in steps if (out / f"eval-step-{s}" / "cost.json").exists()}
    if not (run_dir / "summary.json").exists() or last_step(args.recipe, run_dir) < max(set(steps) - done, default=0):
        # A new run, or one to continue: interrupted, or extended to a longer curve (the schedule is constant, so
        # an extended run is the run a longer one would have been); --resume checks that nothing else changed.
        if args.lr_scheduler != "constant" and (run_dir / "summary.json").exists():
            raise ConfigError(f"--lr_scheduler {args.lr_scheduler}: {run_dir} finished at step {last_step(args.recipe, run_dir)} "
                              f"and its rate decayed over those steps, so it cannot be extended to {steps[-1]}; expected a new --out")
        run(["accelerate", "launch", f"recipes/{args.recipe}.py", *launch_args(args.recipe, run_dir, steps, args.lr_scheduler),
             *(["--resume", "true"] if run_dir.exists() else []), *recipe_args], log)
    points = []
    for step in steps:
        eval_dir = out / f"eval-step-{step}"
        checkpoint, model = checkpoint_at(args.recipe, run_dir, step)
        if step not in done and model is None:
            raise ConfigError(f"{checkpoint}: missing; the run did not save step {step} (see {log})")
        rows = evaluate(str(model), eval_dir, args.eval_prompts, log)
        if step not in done:  # kept where the checkpoint may not be
            cost = ppo_checkpoint_cost(checkpoint) if args.recipe == "ppo" else checkpoint_cost(checkpoint)
            atomic_write_json(eval_dir / "cost.json", cost)
        points.append(point(base, rows, json.loads((eval_dir / "cost.json").read_text())))
        m = points[-1]["metrics"]["coherent_strict"]
        print(f"step {step}: coherent strict {m['baseline_mean']:.3f} -> {m['run_mean']:.3f} "
              f"({m['mean']:+.3f} [{m['lo']:+.3f}, {m['hi']:+.3f}])", flush=True)
    result = {"recipe": args.recipe, "recipe_args": recipe_args, "lr_scheduler_type": args.lr_scheduler,
              "eval_prompts": args.eval_prompts, "decoding": "greedy, 128 new tokens", "cpu": cpu_description(),
              "wall_seconds_this_call": round(time.time() - started, 1), "points": points}
    atomic_write_json(out / "learning_curve.json", result)
    plot(result, out / "learning_curve.png")
    print(f"wrote {out / 'learning_curve.json'} and {out / 'learning_curve.png'}")


if __name__ == "__main__":
    main()
