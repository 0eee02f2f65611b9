"""Benchmark a training stage, arm against arm: wall time, tokens per second, peak memory and MFU.

    python bench/run.py --stage dpo --compare trl-baseline,align --steps 6
    python bench/run.py --stage dpo --compare align,align:share_prompt=false:fast_logprobs=false
    python bench/run.py --stage ppo --compare dpo-align,align --steps 4
    python bench/run.py --help

What is measured and how: bench/harness/stage.py. Writes OUTPUT_DIR/bench_<stage>.json and prints a table.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness.stage import main  # noqa: E402

if __name__ == "__main__":
    main()
