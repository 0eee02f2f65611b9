"""How one training step's time and peak memory grow with sequence length and micro-batch, the planner beside.

    HF_HUB_OFFLINE=1 python bench/scaling.py --out_dir bench/results/scaling          # DPO and PPO, ~15 min on 2 cores
    python bench/scaling.py --stages dpo --seq_lens 256,512 --micro_batches 1,2 --gradient_checkpointing true
    python bench/scaling.py --dtype fp32 --out_dir OUT    # float32 on a bf16 CPU (default: the recipes' dtype auto)

Every cell is one fresh `python bench/step_memory.py` process (bench/harness/memory_step.py: the stage's
step on the embedded default model, LoRA r 16 on every linear layer, random tokens, every row full
length, in the dtype the recipes pick on this machine (--dtype auto: bf16 on CPUs with avx512_bf16/AMX, else
fp32); DPO: chosen + rejected rows, reference log-probs precomputed; PPO: the policy's and the critic's
forward and backward over prompt + response, the response a quarter of the row), measured after a
warm-up step: the step's wall time and its peak RSS over the process's RSS after imports. Beside it,
align.plan's prediction of that peak for the same setting (`align plan --target cpu`). Cells whose
predicted peak is over --max_predicted_gb are not run (on 24 GB machines the largest DPO cells without
gradient checkpointing would swap); the table shows their prediction alone.

The step is the planner's model of a stage, not the recipe's trainer: the recipes also compress saved
activations to bf16 (float32 only) and DPO's default computes the reference on each step's batch. Writes
<out_dir>/scaling.json (every cell, the CPU, package versions) and <out_dir>/scaling.md (the tables).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from align.config import arg, parse_config  # noqa: E402
from align.errors import ConfigError, cli_main  # noqa: E402
from bench.harness.memory_step import StepArgs  # noqa: E402
from bench.harness.planner_check import describe, plan_args_for, run_setting  # noqa: E402


@dataclass
class ScalingArgs:
    out_dir: str = arg("bench/results/scaling", "where scaling.json and scaling.md go")
    stages: list[str] = arg(["dpo", "ppo"], "stages to measure (dpo, ppo, sft, reward)")
    seq_lens: list[int] = arg([256, 512, 1024], "tokens per row (PPO: prompt + response)")
    micro_batches: list[int] = arg([1, 2, 4, 8], "pairs (DPO, reward), rollouts (PPO) or rows (SFT) per step")
    response_fraction: float = arg(0.25, "PPO: the response's share of each row")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward (the recipes' CPU default is false)")
    fuse_lora_dropout: bool = arg(True, "LoRA dropout inside lora_A, as the recipes load it (false: PEFT's nn.Dropout, which "
                                        "saves each module's dropped input and mask; the planner models the fused one)")
    model: str = arg("SmolLM2-135M-Instruct", "model name or directory")
    dtype: Literal["auto", "bf16", "fp32"] = arg("auto", "compute dtype; auto = the recipes' choice on this machine "
                                                  "(bf16 on CPUs with avx512_bf16/AMX, else fp32)")
    max_predicted_gb: float = arg(14.0, "do not run cells whose predicted peak (GiB) is above this")
    timeout_s: int = arg(900, "give up on one cell after this many seconds")

    def validate(self) -> None:
        unknown = set(self.stages) - {"dpo", "ppo", "sft", "reward"}
        if unknown:
            raise ConfigError(f"config: --stages: unknown stage(s) {sorted(unknown)}; expected dpo, ppo, sft, reward")
        if not 0 < self.response_fraction < 1:
            raise ConfigError(f"config: --response_fraction must be in (0, 1), got {self.response_fraction}")


def step_dtype(name: str) -> str:
    """The step's dtype name: auto resolves as the recipes' dtype auto does on a CPU, where every cell runs
    (align.models.loading.resolve_dtype): bf16 where the CPU computes it natively, else fp32."""
    if name != "auto":
        return name
    from align.models.loading import cpu_has_bf16

    return "bf16" if cpu_has_bf16() else "fp32"


def cell_setting(args: ScalingArgs, stage: str, seq_len: int, micro_batch: int) -> StepArgs:
    response = max(1, int(seq_len * args.response_fraction))
    return StepArgs(model=args.model, stage=stage, seq_len=seq_len, micro_batch=micro_batch, ppo_response_len=response,
                    dtype=step_dtype(args.dtype), gradient_checkpointing=args.gradient_checkpointing,
                    fuse_lora_dropout=args.fuse_lora_dropout)


def measure_cell(args: ScalingArgs, setting: StepArgs) -> dict:
    """One cell: the planner's prediction, and the measured step unless the prediction is over the budget."""
    from align.plan import estimate

    predicted = round(estimate(plan_args_for(setting)).peak_bytes / 2**20, 1)
    cell = {"stage": setting.stage, "dtype": setting.dtype, "seq_len": setting.seq_len, "micro_batch": setting.micro_batch,
            "tokens": setting.seq_len * setting.micro_batch * (2 if setting.stage in ("dpo", "reward") else 1),
            "setting": describe(setting), "predicted_mib": predicted}
    if predicted > args.max_predicted_gb * 1024:
        return cell | {"skipped": f"predicted {predicted / 1024:.1f} GiB > --max_predicted_gb {args.max_predicted_gb}"}
    result = run_setting(setting, args.timeout_s)
    if "error" in result:
        return cell | {"error": result["error"]}
    measured = result["measured_bytes"] / 2**20
    return cell | {"measured_mib": round(measured, 1), "predicted_over_measured": round(predicted / measured, 3),
                   "step_s": result["step_s"], "tokens_per_s": round(cell["tokens"] / result["step_s"], 1)}


def tables(cells: list[dict], micro_batches: list[int]) -> str:
    """Per stage (and its dtype): rows = sequence length, columns = micro-batch; each cell `step s, measured / predicted MiB`."""
    lines = []
    for stage in dict.fromkeys(c["stage"] for c in cells):
        dtype = next(c["dtype"] for c in cells if c["stage"] == stage)
        lines += [f"### {stage}, {dtype}: step time, tokens/s, peak MiB measured / planner", "",
                  "| seq len | " + " | ".join(f"micro-batch {mb}" for mb in micro_batches) + " |",
                  "|---:|" + "---|" * len(micro_batches)]
        for seq_len in dict.fromkeys(c["seq_len"] for c in cells if c["stage"] == stage):
            row = {c["micro_batch"]: c for c in cells if c["stage"] == stage and c["seq_len"] == seq_len}
            texts = []
            for mb in micro_batches:
                c = row.get(mb)
                if c is None:
                    texts.append("")
                elif "measured_mib" in c:
                    texts.append(f"{c['step_s']:.1f} s, {c['tokens_per_s']:.0f} tok/s, {c['measured_mib']:.0f} / {c['predicted_mib']:.0f}")
                elif "skipped" in c:
                    texts.append(f"not run / {c['predicted_mib']:.0f}")
                else:
                    texts.append(f"error / {c['predicted_mib']:.0f}")
            lines.append(f"| {seq_len} | " + " | ".join(texts) + " |")
        lines.append("")
    return "\n".join(lines)


@cli_main
def main(argv: list[str] | None = None) -> None:
    from align.io import atomic_write_json, atomic_write_text, package_versions
    from align.models.loading import cpu_description

    args = parse_config(ScalingArgs, argv)
    cells = []
    dtype = step_dtype(args.dtype)
    print(f"[scaling] dtype {dtype} ({cpu_description()})", file=sys.stderr, flush=True)
    for stage in args.stages:
        for seq_len in args.seq_lens:
            for micro_batch in args.micro_batches:
                setting = cell_setting(args, stage, seq_len, micro_batch)
                print(f"[scaling] {describe(setting)} ...", file=sys.stderr, flush=True)
                cells.append(measure_cell(args, setting))
                print(f"    {json.dumps(cells[-1])}", file=sys.stderr, flush=True)
    out = Path(args.out_dir)
    atomic_write_json(out / "scaling.json", {"args": asdict(args), "cpu": cpu_description(), "dtype": dtype, "argv": sys.argv,
                                             "versions": package_versions(), "cells": cells})
    text = tables(cells, args.micro_batches)
    atomic_write_text(out / "scaling.md", text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
