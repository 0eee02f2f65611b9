#!/bin/bash
# The GPU check: the tests whose code paths change on CUDA (4-bit QLoRA by default, every recipe's GPU
# defaults, the pipeline), run on a machine with a GPU. CI has none; run this where one is.
#   bash tests/support/gpu_check.sh 420 tests/integration/test_pipeline.py tests/unit/rl/ppo/test_ppo_adapters.py tests/unit/rl/ppo/test_ppo_trainer.py
# Arguments: a time limit in seconds, then pytest's. Packages missing there can come as wheels in .whl/
# (pip download --no-deps --only-binary=:all: ... -d .whl trl datasets bitsandbytes peft dill multiprocess).
# Writes env.txt and pytest.log to $OUT (default /tmp/gpu_check).
set -o pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
source tests/support/gpu_env.sh
gpu_env .whl || exit 3
timeout "${1:-420}" python3 -m pytest -q -rfE --durations=12 -p no:cacheprovider "${@:2}" 2>&1 | tee "$OUT/pytest.log" | grep -v -i "warn" | tail -60
