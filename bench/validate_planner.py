"""Check align.plan's predictions against measured peaks of real training steps on this machine (CPU, fp32).

    HF_HUB_OFFLINE=1 nice -n 10 python bench/validate_planner.py            # all settings, ~10-15 min on 2 cores
    python bench/validate_planner.py --only 0,3 --out_dir /tmp/planner      # a subset

Each setting runs `python bench/step_memory.py` in a fresh process on the embedded default model
(SmolLM2-135M-Instruct) and records the peak RSS of one step over the process's starting RSS. The planner
predicts the same quantity with --target cpu (process RSS, with align.plan.CPU_CALIBRATION).

Setting 0 is the calibration run: align.plan.CPU_CALIBRATION["fixed_bytes"] was set from it (measured minus
the prediction without the constant). It is reported but not counted as a validation. Writes
<out_dir>/planner_cpu.json and <out_dir>/planner_cpu.md (predicted, measured, ratio per setting).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness.memory_step import StepArgs  # noqa: E402
from bench.harness.planner_check import SettingsArgs, run_validation  # noqa: E402
from align.config import parse_config  # noqa: E402
from align.errors import cli_main  # noqa: E402

CPU_SETTINGS = [
    StepArgs(stage="sft", seq_len=64, micro_batch=1),  # calibration
    StepArgs(stage="sft", seq_len=256, micro_batch=2),
    StepArgs(stage="sft", seq_len=512, micro_batch=1, gradient_checkpointing=True),
    StepArgs(stage="dpo", seq_len=256, micro_batch=1),
    StepArgs(stage="dpo", seq_len=128, micro_batch=2, lora_r=64),
    StepArgs(stage="dpo", seq_len=256, micro_batch=1, gradient_checkpointing=True, dpo_reference="adapter_disabled"),
    StepArgs(stage="reward", seq_len=256, micro_batch=2),
    StepArgs(stage="sft", seq_len=256, micro_batch=2, quantization="4bit"),
    StepArgs(stage="ppo", seq_len=256, micro_batch=2, ppo_response_len=64),
]


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_config(SettingsArgs, argv)
    run_validation(CPU_SETTINGS, args, name="planner_cpu", calibration_index=0)


if __name__ == "__main__":
    main(sys.argv[1:])
