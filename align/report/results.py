"""Loading evaluated runs for the report: EvalResult, load_eval and the checks that runs are comparable."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from align.errors import AlignError
from align.evaluation.args import COMPARABLE_SETTINGS, SETTING_DEFAULTS
from align.io import inside, read_jsonl


@dataclass
class EvalResult:
    """One evaluated policy: its eval files, and the run's own summary and training metrics if any."""

    name: str
    eval_dir: Path
    summary: dict[str, Any]
    generations: list[dict[str, Any]]
    prefs: list[dict[str, Any]] | None = None
    ppl: list[dict[str, Any]] | None = None
    run_dir: Path | None = None
    run_summary: dict[str, Any] = field(default_factory=dict)
    train_metrics: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[tuple[int, "EvalResult"]] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str(self.run_summary.get("method") or self.summary.get("method") or "?")

    def rows(self, mode: str) -> list[dict[str, Any]]:
        return [r for r in self.generations if r["mode"] == mode]

    def file(self, key: str) -> Path:
        return self.eval_dir / self.summary["files"][key]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AlignError(f"{path}: cannot be read as JSON ({err})") from None
    if not isinstance(data, dict):
        raise AlignError(f"{path}: expected a JSON object")
    return data


def eval_dir_of(path: str | Path) -> Path:
    """The eval directory of `path`: path itself when it holds summary.json, else path/eval (base: outputs/base/eval)."""
    p = Path("outputs/base") if str(path) == "base" else Path(path)
    return p if (p / "summary.json").is_file() and (p / "generations.jsonl").is_file() else p / "eval"


def has_eval(path: str | Path) -> bool:
    d = eval_dir_of(path)
    return (d / "summary.json").is_file() and (d / "generations.jsonl").is_file()


def load_eval(path: str | Path, name: str | None = None) -> EvalResult:
    """Read an evaluation (a run directory with eval/, or an eval directory) and its run's files."""
    eval_dir = eval_dir_of(path)
    if not has_eval(path):
        raise AlignError(f"{path}: no evaluation found (no {eval_dir}/summary.json); run align eval {path} first")
    summary = _read_json(eval_dir / "summary.json")
    for key in ("settings", "files", "metrics"):
        if key not in summary:
            raise AlignError(f"{eval_dir / 'summary.json'}: missing {key!r} (not written by align eval?)")
    files = {key: inside(eval_dir, name, field=f"{eval_dir / 'summary.json'}: files.{key}")  # stay in the evaluation
             for key, name in summary["files"].items()}
    generations = read_jsonl(files["generations"])
    prefs = read_jsonl(files["preferences"]) if "preferences" in files else None
    ppl = read_jsonl(files["perplexity"]) if "perplexity" in files else None
    # The run's own files (summary.json, metrics.jsonl): in the directory that was evaluated, wherever the
    # evaluation was written; else the eval directory's parent.
    evaluated = Path(str(summary.get("run", "")))
    run_dir = evaluated if evaluated.is_absolute() and evaluated.is_dir() else (eval_dir.parent if eval_dir.name == "eval" else None)
    run_summary, train_metrics = {}, []
    if run_dir is not None and (run_dir / "summary.json").is_file():
        run_summary = _read_json(run_dir / "summary.json")
    if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
        train_metrics = read_jsonl(run_dir / "metrics.jsonl")
    default_name = run_dir.name if run_dir is not None else eval_dir.parent.name
    return EvalResult(name or default_name, eval_dir, summary, generations, prefs, ppl, run_dir, run_summary, train_metrics)


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of each `checkpoint-N` directory of a run, by step."""
    found = []
    for d in run_dir.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    return sorted(found)


def unique_names(results: list[EvalResult]) -> list[str]:
    """Short display names: each run directory's name, with its parent prepended where two would clash,
    and a number where they still do."""
    dirs = [(r.run_dir or r.eval_dir.parent).resolve() for r in results]
    names = [d.name for d in dirs]
    if len(set(names)) < len(names):
        names = [f"{d.parent.name}/{d.name}" for d in dirs]
    clashing = {n for n in names if names.count(n) > 1}
    return [f"{n}#{i + 1}" if n in clashing else n for i, n in enumerate(names)]


def check_comparable(results: list[EvalResult]) -> None:
    """Refuse to compare evaluations made on different prompts or with different sampling settings."""
    first = results[0]
    keys = COMPARABLE_SETTINGS + ("prompts_sha256",)
    for other in results[1:]:
        for key in keys:
            default = SETTING_DEFAULTS.get(key)  # a summary from before the generation controls generated with these
            a, b = first.summary["settings"].get(key, default), other.summary["settings"].get(key, default)
            if a != b:
                what = "prompt set (ids or messages)" if key == "prompts_sha256" else f"setting {key!r}"
                raise AlignError(
                    f"runs evaluated differently, cannot compare: {what} is {a!r} in {first.eval_dir / 'summary.json'} "
                    f"but {b!r} in {other.eval_dir / 'summary.json'}; evaluate both with the same settings "
                    "(delete the stale eval/ directory and rerun)"
                )
    models = {r.summary["settings"].get("reward_model") for r in results} - {None}
    if len(models) > 1:
        raise AlignError(f"runs were scored by different reward models ({', '.join(sorted(models))}); rescore with one --reward_model")
