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
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, transformers, trl, peft, bitsandbytes, accelerate, datasets; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)" 2>&1 | tail -1 | tee -a "$OUT/env.txt"
timeout "${1:-420}" python3 -m pytest -q -rfE --durations=12 -p no:cacheprovider "${@:2}" 2>&1 | tee "$OUT/pytest.log" | grep -v -i "warn" | tail -60
