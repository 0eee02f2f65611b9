#!/bin/bash
# Greedy generation of 64 held-out prompts (eval/evaluate.py, 128 new tokens) by the plain model, bf16 and fp32 alternating, 2 repeats each
cd "$(git rev-parse --show-toplevel)"; OUT=${OUT:-/tmp/gen_dtype}; mkdir -p $OUT
for r in 1 2; do for dt in bf16 fp32; do
  HF_HUB_OFFLINE=1 python eval/evaluate.py SmolLM2-135M-Instruct --out $OUT/$dt-$r --modes greedy --max_prompts 64 --pref_data none --ppl_data none --dtype $dt > $OUT/$dt-$r.log 2>&1
done; done
OUT=$OUT python - <<'PY'
import json, glob, os
for f in sorted(glob.glob(os.environ['OUT'] + '/*/summary.json')):
    s=json.load(open(f)); print(f, s['timing'], s['metrics']['greedy']['coherent_strict'])
PY
