"""Compare several runs in one report: metrics with confidence intervals, win rates, reward versus KL,
training curves, cost, sample replies and reward-hacking warnings.

    align compare outputs/sft outputs/dpo outputs/ppo --out outputs/report
    align compare base outputs/dpo --reward_model outputs/reward --max_prompts 50
    align compare outputs/dpo outputs/ppo --checkpoints      # a reward-vs-KL point per checkpoint

(`python eval/compare.py ...` in a checkout is the same command.)

Each RUN is a run directory, an eval directory (holding summary.json), or `base`. A run without an eval/
is evaluated first (align.evaluation), with the settings of the runs that have one so that every policy
sees the same prompts and sampling; with none evaluated yet, with the evaluation flags given here. Runs
evaluated with different prompts or sampling are refused with an error naming the setting.

Writes OUT/report.md, OUT/report.html (self-contained; opens offline), OUT/summary.json and the plots. An OUT
holding an earlier report is refused; --overwrite true moves it aside to OUT.old-<time> first.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from align.config import arg, parse_config
from align.errors import AlignError, ConfigError, cli_main
from align.evaluation.args import COMPARABLE_SETTINGS, EvalArgs
from align.evaluation.run import evaluate
from align.io import inside
from align.log import get_logger
from align.report.build import ReportArgs, build_report
from align.report.results import check_comparable, checkpoint_dirs, eval_dir_of, has_eval, load_eval, unique_names
from align.runs import REPORT_ARTEFACTS, check_folder, take_folder

logger = get_logger(__name__, tag="compare")

@dataclass
class CompareArgs(ReportArgs, EvalArgs):
    out: str = arg("outputs/report", "where report.md, report.html and summary.json go")
    checkpoints: bool = arg(False, "also evaluate each run's checkpoint-N/ directories: one reward-vs-KL point per checkpoint")

    def validate(self) -> None:
        EvalArgs.validate(self)
        ReportArgs.validate(self)


def given_options(argv: list[str]) -> set[str]:
    """Names of the options set on the command line."""
    return {tok[2:].partition("=")[0].replace("-", "_") for tok in argv if tok.startswith("--")}


def eval_settings(cfg: CompareArgs, evaluated: list[str], given: set[str]) -> EvalArgs:
    """The EvalArgs for runs still to evaluate: those of the evaluated runs, unless the command line differs."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EvalArgs)}
    values["out"] = None
    values["overwrite"] = False  # compare's --overwrite is about its report; an evaluation is only run where none is
    if evaluated:
        existing = load_eval(evaluated[0]).summary["settings"]
        for key in COMPARABLE_SETTINGS + ("reward_model",):
            if key in given and existing.get(key) != values[key] and not (key == "reward_model" and existing.get(key) == str(Path(values[key]).resolve())):
                raise ConfigError(
                    f"--{key} {values[key]!r} differs from {existing.get(key)!r} used in {eval_dir_of(evaluated[0])}; "
                    "runs must be evaluated alike (drop the flag, or delete the existing eval/ directories)"
                )
            values[key] = existing.get(key)
    return EvalArgs(**values)


@cli_main
def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        parse_config(CompareArgs, ["--help"])
    runs = []
    while argv and not argv[0].startswith("--"):
        runs.append(argv.pop(0))
    if not runs:
        raise ConfigError("command line: expected one or more RUN directories first (or base); see --help")
    cfg = parse_config(CompareArgs, argv)
    # An earlier report in --out is refused before any evaluation, or moved aside under --overwrite true (align.runs)
    claim = dict(resume=False, overwrite=cfg.overwrite, names=REPORT_ARTEFACTS, dir_flag="--out", resumable=False,
                 what="an earlier report")
    check_folder(cfg.out, **claim)
    evaluated = [r for r in runs if has_eval(r)]
    todo = [r for r in runs if not has_eval(r)]
    if cfg.checkpoints:
        for run in runs:  # a checkpoint's eval/ is written inside its run (not through a symlink elsewhere)
            todo += [str(inside(run, d.name, field=f"{run}: checkpoint")) for _, d in checkpoint_dirs(Path(run)) if not has_eval(d)]
    if todo:
        settings = eval_settings(cfg, evaluated, given_options(argv))
        for run in todo:
            if run != "base" and not Path(run).exists():
                raise AlignError(f"{run}: no such run directory")
            logger.info(f"{run}: no evaluation yet; evaluating")
            evaluate(run, dataclasses.replace(settings, out=str(eval_dir_of(run))))
    results = [load_eval(run) for run in runs]
    for result, name in zip(results, unique_names(results)):
        result.name = name
    if cfg.checkpoints:
        for run, result in zip(runs, results):
            result.checkpoints = [(step, load_eval(d, f"{result.name}@{step}")) for step, d in checkpoint_dirs(Path(run))]
    check_comparable(results)  # before --out is created
    # checked again: the evaluations took a while, and another run may have written there meanwhile
    for note in take_folder(cfg.out, check_folder(cfg.out, **claim), overwrite=cfg.overwrite):
        logger.info(note)
    summary = build_report(results, cfg.out, cfg)
    for warning in summary["warnings"]:
        logger.warning(f"warning: {warning}")
    logger.info(f"wrote {cfg.out}/report.md, report.html, summary.json")


if __name__ == "__main__":
    main()
