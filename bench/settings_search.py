"""Settings side by side: one recipe run per setting, each judged on the same held-out prompts, paired.

    python bench/settings_search.py --recipe dpo --out curves/search \
        --variant default= --variant beta0.5="--beta 0.5" --variant sft_only="--loss_type sft" -- --max_steps 56
    python bench/settings_search.py --recipe dpo --out curves/search --reuse default=outputs/dpo ...

Each variant is one `accelerate launch recipes/<recipe>.py --output_dir OUT/NAME/run --summary_prompts 0` with the
arguments after `--` (common to all) and then the variant's own, so every variant runs the recipe's own schedule
(unlike bench/learning_curve.py's constant learning rate). --reuse NAME=DIR takes an existing run of the same recipe
(e.g. the main job's output folder) as that variant instead of training it; its config.yaml is recorded. The
starting model and every run answer the first --eval_prompts held-out `ifprefs:eval` prompts greedily
(eval/evaluate.py, 128 new tokens). OUT/search.json gives, per variant, the paired difference from the starting model
and from the first variant (the reference setting) of coherent strict, IFEval strict, verifier score, degenerate
share, formats nobody asked for and EOS rate, with 95% bootstrap intervals (align.report.stats.paired_delta,
2,000 resamples), and its training tokens and seconds. A part already done is reused when the script runs again.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning_curve import (METRICS, checkpoint_cost, evaluate, evaluation_parser, point, run,  # noqa: E402
                            split_at_dashes, starting_model)

from align.errors import ConfigError, cli_main  # noqa: E402
from align.io import atomic_write_json  # noqa: E402
from align.models.loading import cpu_description  # noqa: E402
from align.report.stats import paired_delta  # noqa: E402
from align.trainers.common import last_marked_checkpoint  # noqa: E402

RECIPES = ("sft", "dpo")


def named(values: list[str], flag: str) -> list[tuple[str, str]]:
    """NAME=VALUE pairs, in order, names unique."""
    out = []
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or "/" in name:
            raise ConfigError(f"{flag}: expected NAME=VALUE with a plain name, got {value!r}")
        out.append((name, rest))
    return out


def run_cost(run_dir: Path) -> dict:
    """Training tokens and seconds of a finished run (its last checkpoint), and its resolved settings."""
    import yaml

    checkpoint = last_marked_checkpoint(run_dir)
    if checkpoint is None:
        raise ConfigError(f"{run_dir}: no finished checkpoint; is it a run of this recipe?")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return checkpoint_cost(checkpoint) | {"config": config}


@cli_main
def main() -> None:
    argv, common = split_at_dashes(sys.argv[1:])
    parser = evaluation_parser(__doc__, "directory for the runs, the evaluations and search.json", RECIPES)
    parser.add_argument("--variant", action="append", default=[], help="NAME=ARGS: a setting to train (ARGS may be empty)")
    parser.add_argument("--reuse", action="append", default=[], help="NAME=DIR: an existing run of the recipe as a variant")
    parser.add_argument("--replies", default=None, help="FIRST:END: also write OUT/replies.md, the replies to those held-out "
                                                       "prompts (0-based, END excluded) side by side, to read")
    args = parser.parse_args(argv)
    shown = replies_range(args.replies, args.eval_prompts)
    reused = dict(named(args.reuse, "--reuse"))
    variants = named(args.reuse, "--reuse") + named(args.variant, "--variant")
    names = [name for name, _ in variants]
    if not variants or len(set(names)) != len(names):
        raise ConfigError(f"--variant/--reuse: expected at least one setting and unique names, got {names}")
    for name, folder in reused.items():
        if not (Path(folder) / "config.yaml").exists():
            raise ConfigError(f"--reuse {name}={folder}: no config.yaml there; expected a run folder of recipes/{args.recipe}.py")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "search.log"

    started = time.time()
    base = evaluate(starting_model(args.recipe, common), Path(args.base_eval) if args.base_eval else out / "eval-base",
                    args.eval_prompts, log)
    results, reference, replies = [], None, {"start": base}
    for name, value in variants:
        run_dir = Path(reused[name]).resolve() if name in reused else out / name / "run"
        own = [] if name in reused else shlex.split(value)
        if name not in reused and not (run_dir / "summary.json").exists():  # the recipe writes it last
            run(["accelerate", "launch", f"recipes/{args.recipe}.py", "--output_dir", str(run_dir), "--summary_prompts", "0",
                 *(["--resume", "true"] if run_dir.exists() else []), *common, *own], log)
        rows = evaluate(str(run_dir), out / name / "eval", args.eval_prompts, log)
        replies[name] = rows
        result = {"name": name, "args": own, "run": str(run_dir), "reused": name in reused} | point(base, rows, run_cost(run_dir))
        if reference is None:
            reference = rows
        else:
            result["vs_first"] = {}
            for key in METRICS:
                d = paired_delta(reference, rows, key, 2000, 0)
                result["vs_first"][key] = {k: round(d[k], 4) for k in ("mean", "lo", "hi")}
        results.append(result)
        m = result["metrics"]["coherent_strict"]
        print(f"{name}: coherent strict {m['baseline_mean']:.3f} -> {m['run_mean']:.3f} "
              f"({m['mean']:+.3f} [{m['lo']:+.3f}, {m['hi']:+.3f}])", flush=True)
    atomic_write_json(out / "search.json", {
        "recipe": args.recipe, "common_args": common, "eval_prompts": args.eval_prompts,
        "decoding": "greedy, 128 new tokens", "cpu": cpu_description(), "first_is_reference": names[0],
        "wall_seconds_this_call": round(time.time() - started, 1), "variants": results})
    print(f"wrote {out / 'search.json'}")
    if shown:
        (out / "replies.md.tmp").write_text(side_by_side(replies, *shown))
        (out / "replies.md.tmp").replace(out / "replies.md")
        print(f"wrote {out / 'replies.md'}")


def replies_range(value: str | None, n_prompts: int) -> tuple[int, int] | None:
    if value is None:
        return None
    first, sep, end = value.partition(":")
    if not (sep and first.isdigit() and end.isdigit() and int(first) < int(end) <= n_prompts):
        raise ConfigError(f"--replies: expected FIRST:END with 0 <= FIRST < END <= --eval_prompts ({n_prompts}), got {value!r}")
    return int(first), int(end)


def side_by_side(replies: dict[str, list[dict]], first: int, end: int) -> str:
    """Markdown: per prompt, its text and constraints, then each setting's reply with its verdicts."""
    lines = [f"# Greedy replies to held-out prompts {first}-{end - 1}, side by side",
             "", "cs = coherent strict, strict = IFEval strict, deg = degenerate (its reasons), eos = ended by EOS.", ""]
    start = replies["start"]
    for i in range(first, end):
        prompt = start[i]["prompt"]
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt if m["role"] == "user")
        lines += [f"## {start[i]['prompt_id']}", "", "> " + text.replace("\n", "\n> "), "",
                  "constraints: " + ", ".join(c["type"] for c in start[i]["constraints"]), ""]
        for name, rows in replies.items():
            r = rows[i]
            why = "; ".join(r.get("degenerate_reasons") or [])
            lines += [f"**{name}** (cs {int(bool(r['coherent_strict']))}, strict {int(bool(r['verifier_strict']))}, "
                      f"deg {int(bool(r['degenerate']))}{': ' + why if why else ''}, eos {int(bool(r['eos']))})", "",
                      "```", r["reply"].replace("```", "'''"), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
