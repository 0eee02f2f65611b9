"""The real peak memory of one LoRA training step of a stage, in this process (what align.plan predicts).

    MALLOC_MMAP_THRESHOLD_=65536 python bench/step_memory.py --stage dpo --seq_len 256 --micro_batch 2 --out /tmp/m.json
    python bench/step_memory.py --help

What is measured and how: bench/harness/memory_step.py. bench/validate_planner.py runs it once per setting.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness.memory_step import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
