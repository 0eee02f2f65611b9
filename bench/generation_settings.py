"""Repetition under generation settings: one model, several ways of decoding, one table.

    python bench/generation_settings.py base --out bench/results/generation_settings_base
    python bench/generation_settings.py outputs/dpo --max_prompts 50 --out bench/results/generation_settings_dpo
    python bench/generation_settings.py base --settings greedy,beam_4 --max_prompts 2 --max_new_tokens 16

RUN is what eval/evaluate.py takes (a run directory, a model directory or `base`). Each setting is one
eval/evaluate.py evaluation (align.evaluation.run.evaluate, greedy or sample mode only, no preference or perplexity
data) of the first --max_prompts held-out prompts, written to OUT/<setting>/ (generations.jsonl with every reply,
summary.json); a setting already evaluated there with the same settings is reused. The table, in
OUT/generation_settings.json and OUT/generation_settings.md, gives per setting: verifier score, coherent strict,
degenerate share, repeated 4-gram share (seq-rep-4), distinct-2, the share of replies that loop to the token
limit (no EOS and degenerate, align.evaluation.metrics.loops_to_limit), EOS rate and the seconds spent generating.

Settings (SETTINGS): greedy; greedy_rep1.2 (repetition_penalty 1.2); no_repeat_3 (no_repeat_ngram_size 3);
beam_4 (beam search, 4 beams); sample_t0.7_p0.9 (temperature 0.7, top_p 0.9, seed 0).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from align.config import arg, parse_config  # noqa: E402
from align.errors import ConfigError, cli_main  # noqa: E402
from align.io import atomic_write_json, atomic_write_text  # noqa: E402

# name -> EvalArgs fields that make the setting (everything else is the bench's shared settings)
SETTINGS: dict[str, dict[str, Any]] = {
    "greedy": {"modes": ["greedy"]},
    "greedy_rep1.2": {"modes": ["greedy"], "repetition_penalty": 1.2},
    "no_repeat_3": {"modes": ["greedy"], "no_repeat_ngram_size": 3},
    "beam_4": {"modes": ["greedy"], "num_beams": 4},
    "sample_t0.7_p0.9": {"modes": ["sample"], "temperature": 0.7, "top_p": 0.9},
}
# (summary metric of the mode, column title)
COLUMNS = (
    ("verifier_score", "verifier score"),
    ("coherent_strict", "coherent strict"),
    ("degenerate_share", "degenerate"),
    ("repeated_4gram_share", "repeated 4-grams"),
    ("distinct_2", "distinct-2"),
    ("loops_to_limit_share", "loops to limit"),
    ("eos_rate", "EOS rate"),
)
PAIRED = ("coherent_strict", "degenerate")  # also as the paired difference from greedy, with its interval


@dataclass
class GenerationSettingsArgs:
    out: str = arg("bench/results/generation_settings", "output directory: one evaluation per setting, and the table")
    settings: list[str] = arg(list(SETTINGS), f"settings to evaluate, comma-separated, of: {', '.join(SETTINGS)}")
    prompts: str = arg("ifprefs:eval", "held-out prompts (as eval/evaluate.py --prompts)")
    max_prompts: int = arg(50, "use the first N prompts")
    max_new_tokens: int = arg(128, "longest reply, in tokens")
    generate_batch_size: int = arg(16, "prompts generated for together")
    seed: int = arg(0, "sampling seed of the sampling settings")
    dtype: str = arg("auto", "compute dtype: auto, bf16, fp16 or fp32")
    overwrite: bool = arg(False, "re-evaluate a setting whose folder holds an evaluation with other settings (moved aside)")

    def validate(self) -> None:
        unknown = [s for s in self.settings if s not in SETTINGS]
        if unknown or not self.settings:
            raise ConfigError(f"config: settings: unknown setting(s) {unknown}; expected some of {', '.join(SETTINGS)}")
        if self.max_prompts < 1 or self.max_new_tokens < 1:
            raise ConfigError("config: max_prompts and max_new_tokens: expected positive numbers")


def eval_args(bench: GenerationSettingsArgs, name: str):
    """The EvalArgs of setting `name`: its own fields over the bench's shared ones, no preference or perplexity data."""
    from align.evaluation.args import EvalArgs

    cfg = EvalArgs(prompts=bench.prompts, out=str(Path(bench.out) / name), max_prompts=bench.max_prompts,
                   max_new_tokens=bench.max_new_tokens, generate_batch_size=bench.generate_batch_size, seed=bench.seed,
                   pref_data=None, ppl_data=None, dtype=bench.dtype, overwrite=bench.overwrite, **SETTINGS[name])
    cfg.validate()
    return cfg


def evaluated(cfg) -> dict[str, Any] | None:
    """The summary of an earlier evaluation in cfg.out made with these same settings, else None."""
    from align.evaluation.generate import settings_for

    path = Path(cfg.out) / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    mode = cfg.modes[0]
    same = (summary.get("settings", {}).get("prompts") == cfg.prompts
            and summary.get("settings", {}).get("max_prompts") == cfg.max_prompts
            and summary.get("metrics", {}).get(mode, {}).get("generation") == settings_for(mode, cfg).as_dict())
    return summary if same else None


def table_row(name: str, summary: dict[str, Any]) -> dict[str, Any]:
    """One setting's line of the table, from its evaluation's summary.json."""
    mode = summary["settings"]["modes"][0]
    metrics = summary["metrics"][mode]
    return {"setting": name, "generation": metrics["generation_name"], "n": metrics["n"],
            **{key: metrics.get(key) for key, _ in COLUMNS}, "seconds": summary["timing"]["generate_s"],
            "generated_tokens": summary["timing"]["generated_tokens"]}


def against_greedy(rows: list[dict[str, Any]], replies: dict[str, list[dict[str, Any]]]) -> None:
    """Each setting's coherent strict and degenerate share minus greedy's, paired over the same prompts, with
    the 95% bootstrap interval (align.report.stats.paired_delta, 2,000 resamples), into its row (none without greedy)."""
    from align.report.stats import paired_delta

    for row in rows:
        for key in PAIRED:
            # paired by prompt: a sampled reply against the greedy one to the same prompt (the rows' modes differ)
            same_mode = [{**r, "mode": "greedy"} for r in replies[row["setting"]]]
            d = paired_delta(replies["greedy"], same_mode, key, 2000, 0) if "greedy" in replies else None
            row[f"{key}_vs_greedy"] = None if d is None or not d["n"] else {k: round(d[k], 4) for k in ("mean", "lo", "hi")} | {"n": d["n"]}


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    def cell(v):
        if isinstance(v, dict):
            return f"{v['mean']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}]"
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    keys = [key for key, _ in COLUMNS] + [f"{key}_vs_greedy" for key in PAIRED]
    titles = [title for _, title in COLUMNS] + [f"{key.replace('_', ' ')} vs greedy" for key in PAIRED]
    lines = [header, "", "| setting | " + " | ".join(titles) + " | seconds |", "|---|" + "---|" * (len(keys) + 1)]
    for row in rows:
        lines.append(f"| {row['generation']} | " + " | ".join(cell(row.get(key)) for key in keys) + f" | {row['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


@cli_main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        parse_config(GenerationSettingsArgs, ["--help"])
    if not argv or argv[0].startswith("--"):
        raise ConfigError("command line: expected RUN first (a run directory, a model directory or 'base'); see --help")
    run, bench = argv[0], parse_config(GenerationSettingsArgs, argv[1:])
    from align.evaluation.run import evaluate

    from align.io import read_jsonl

    rows, replies = [], {}
    for name in bench.settings:
        cfg = eval_args(bench, name)
        summary = evaluated(cfg)
        if summary is None:
            print(f"[bench] {name}: evaluating {run}", file=sys.stderr, flush=True)
            summary = evaluate(run, cfg)
        else:
            print(f"[bench] {name}: reusing {cfg.out}/summary.json", file=sys.stderr, flush=True)
        rows.append(table_row(name, summary))
        replies[name] = [r for r in read_jsonl(Path(cfg.out) / "generations.jsonl") if r["mode"] == cfg.modes[0]]
    against_greedy(rows, replies)
    command = "python bench/generation_settings.py " + " ".join([run, *argv[1:]])
    result = {"run": run, "command": command, "bench": dataclasses.asdict(bench), "rows": rows}
    atomic_write_json(Path(bench.out) / "generation_settings.json", result)
    header = (f"`{command}`: {rows[0]['n']} prompts of {bench.prompts}, at most {bench.max_new_tokens} new tokens; "
              "shares over replies (verifier score and coherent strict over the prompts with constraints); "
              "vs greedy: the paired difference from greedy decoding over the same prompts, 95% bootstrap interval")
    atomic_write_text(Path(bench.out) / "generation_settings.md", markdown(rows, header))
    print(markdown(rows, header), flush=True)
    return result


if __name__ == "__main__":
    main()
