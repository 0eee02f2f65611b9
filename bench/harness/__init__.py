"""The benchmark harness: developer tooling that lives in the checkout, never in the installed `align` package.

Run from the checkout (the scripts put it on sys.path):

    python bench/run.py --stage dpo --compare trl-baseline,align --steps 6     # a stage, arm against arm
    python bench/step_memory.py --stage dpo --seq_len 256 --micro_batch 2      # one step's peak memory

Modules, in the order a stage benchmark uses them:
    stage.py          BenchArgs, the parent process: every arm in a fresh child, the report (docstring: what is measured)
    runs.py           one run of one arm in the child: the TRL stages, PPO, GRPO
    trainers.py       what an arm trains: the recipe's own trainer or TRL's documented script
    recorders.py      step records from TRL's callbacks and the phase events the trainers report (align.trainers.phases)
    meter.py          time and peak memory: MemoryMeter, Phases, PeakRSS, the /proc/self/status reader
    flops.py          model FLOPs per token and per phase, the matmul peak MFU is measured against
    data.py           the rows every arm trains on (built-in data or synthetic pairs)
    report.py         medians, ratios between arms, the printed table
    process.py        run a command in a fresh process and read the JSON it writes
    memory_step.py    one LoRA training step's real peak memory (bench/step_memory.py)
    planner_check.py  align.plan's predictions against measured steps (bench/validate_planner*.py)
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
