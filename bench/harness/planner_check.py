"""align.plan's predicted peak memory against the measured peak of real training steps (memory_step.py), one
fresh process per setting; the tables bench/validate_planner.py and bench/validate_planner_gpu.py write."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from align.config import arg

from . import REPO
from .memory_step import StepArgs
from .meter import GLIBC_MMAP_THRESHOLD
from .process import ChildFailed, run_json_child


@dataclass
class SettingsArgs:
    out_dir: str = arg("bench/results", "where the JSON and Markdown tables go")
    only: list[int] = arg([], "indices of the settings to run (default: all)")
    model: str | None = arg(None, "model directory or name for every setting (default: the embedded default)")
    timeout_s: int = arg(900, "give up on one setting after this many seconds")
    tolerance: float = arg(0.25, "a prediction passes when |predicted / measured - 1| <= tolerance")
    reuse: str | None = arg(None, "a previous <name>.json: compare against its recorded measurements instead of measuring again")


def plan_args_for(bench: StepArgs, **overrides):
    """The align.plan PlanArgs describing the same setting as `bench` (used by the validation scripts)."""
    from align.plan import PlanArgs

    values = dict(
        model=bench.model, stage=bench.stage, quantization=bench.quantization, dtype=bench.dtype,
        lora_r=bench.lora_r, lora_targets=bench.lora_targets.split(","), lora_dropout=bench.lora_dropout,
        seq_len=bench.seq_len, micro_batch=bench.micro_batch, gradient_checkpointing=bench.gradient_checkpointing,
        dpo_reference=bench.dpo_reference, ppo_response_len=bench.ppo_response_len,
        target="cuda" if bench.device == "cuda" else "cpu",
    )
    values.update(overrides)
    return PlanArgs(**values)


def run_setting(bench: StepArgs, timeout_s: int) -> dict:
    """Measure `bench` in a fresh process (so peaks never mix) and return its result."""
    with tempfile.TemporaryDirectory(prefix="align-bench-") as tmp:
        out = Path(tmp) / "result.json"
        argv = [sys.executable, str(REPO / "bench" / "step_memory.py"), "--out", str(out)]
        for key, value in asdict(bench).items():
            if key != "out" and value is not None:
                argv += [f"--{key}", str(value)]
        env = {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", str(GLIBC_MMAP_THRESHOLD))}
        try:
            return run_json_child(argv, out, timeout_s=timeout_s, env=env, cwd=REPO)
        except ChildFailed as err:
            error = f"timed out after {timeout_s} s" if err.exit == "timeout" else err.output.strip() or f"exit {err.exit}"
            return {"setting": asdict(bench), "error": error}


def describe(bench: StepArgs) -> str:
    parts = [bench.stage, f"T={bench.seq_len}", f"mb={bench.micro_batch}", f"r={bench.lora_r}",
             "ckpt" if bench.gradient_checkpointing else "no-ckpt", bench.quantization, bench.dtype]
    if bench.stage == "dpo":
        parts.append(f"ref={bench.dpo_reference}")
    if bench.stage == "ppo":
        parts.append(f"R={bench.ppo_response_len}")
    if not bench.fuse_lora_dropout:
        parts.append("peft-dropout")
    return " ".join(parts)


def compare(bench: StepArgs, measured_bytes: float, tolerance: float, *, subtract_overhead: bool) -> dict:
    """Predicted vs measured for one setting. On CUDA the planner's runtime overhead (not seen by
    max_memory_allocated) is left out of the prediction."""
    from align.plan import estimate

    est = estimate(plan_args_for(bench))
    predicted = est.peak_bytes - (est.components["runtime_overhead"] if subtract_overhead else 0.0)
    ratio = predicted / measured_bytes
    return {
        "setting": describe(bench), "predicted_mib": round(predicted / 2**20, 1), "measured_mib": round(measured_bytes / 2**20, 1),
        "ratio": round(ratio, 3), "within_tolerance": abs(ratio - 1) <= tolerance,
        "predicted_components_mib": {k: round(v / 2**20, 1) for k, v in est.components.items()},
    }


def planner_table(rows: list[dict]) -> str:
    lines = ["| setting | predicted MiB | measured MiB | predicted / measured | within tolerance |", "|---|---:|---:|---:|:---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['setting']} | - | - | - | error: {row['error'].splitlines()[-1][:80]} |")
        else:
            mark = "yes" if row["within_tolerance"] else "NO"
            lines.append(f"| {row['setting']} | {row['predicted_mib']:.0f} | {row['measured_mib']:.0f} | {row['ratio']:.3f} | {mark} |")
    return "\n".join(lines)


def run_validation(settings: list[StepArgs], args: SettingsArgs, *, name: str, calibration_index: int | None = None) -> list[dict]:
    """Run each setting in its own process, compare with the planner, write <out_dir>/<name>.json and .md."""
    from align.io import atomic_write_json, atomic_write_text, package_versions

    chosen = args.only or list(range(len(settings)))
    recorded = {}
    if args.reuse:
        recorded = {row["index"]: row for row in json.loads(Path(args.reuse).read_text())["rows"] if "error" not in row}
    rows = []
    for index in chosen:
        bench = settings[index]
        if args.model is not None:
            bench = StepArgs(**{**asdict(bench), "model": args.model})
        print(f"[{index}] {describe(bench)} ...", file=sys.stderr, flush=True)
        if args.reuse:
            if index not in recorded or recorded[index]["setting"] != describe(bench):
                print(f"    not in {args.reuse}; skipped", file=sys.stderr)
                continue
            old = recorded[index]
            result = {"measured_bytes": old.get("measured_bytes", old["measured_mib"] * 2**20), "method": old["method"],
                      "step_s": old["step_s"], "trainable_params": old["trainable_params"]}
        else:
            result = run_setting(bench, args.timeout_s)
        if "error" in result:
            row = {"setting": describe(bench), "error": result["error"]}
        else:
            row = compare(bench, result["measured_bytes"], args.tolerance, subtract_overhead=bench.device == "cuda")
            row.update(measured_bytes=result["measured_bytes"], method=result["method"], step_s=result["step_s"],
                       trainable_params=result["trainable_params"])
        row["index"] = index
        row["calibration"] = index == calibration_index
        rows.append(row)
        print(f"    {json.dumps({k: row[k] for k in row if k != 'predicted_components_mib'})}", file=sys.stderr, flush=True)
    checked = [r for r in rows if not r["calibration"] and "error" not in r]
    summary = {
        "validated": len(checked), "within_tolerance": sum(r["within_tolerance"] for r in checked),
        "tolerance": args.tolerance, "versions": package_versions(), "argv": sys.argv,
        "measurements_from": args.reuse or "this run",
    }
    out = Path(args.out_dir)
    atomic_write_json(out / f"{name}.json", {"summary": summary, "rows": rows})
    table = planner_table([{**r, "setting": r["setting"] + (" (calibration)" if r["calibration"] else "")} for r in rows])
    atomic_write_text(out / f"{name}.md", table + "\n")
    print(table)
    print(f"{summary['within_tolerance']} of {summary['validated']} validated settings within {args.tolerance:.0%}")
    return rows

