#!/bin/bash
# the starting model's greedy replies to the 320 held-out prompts at generate_batch_size 64 / 320 / 160 / 64, one after
# the other (the run was stopped after the first two); usage: generate_batch_size.sh OUT_DIR, from the repository root
for b in 64 320 160 64; do
  /usr/bin/time -f "bs$b wall %e s maxrss %M kB" env HF_HUB_OFFLINE=1 python eval/evaluate.py SmolLM2-135M-Instruct --out $1/gen_bs${b}_$RANDOM --modes greedy --max_prompts 320 --pref_data none --ppl_data none --generate_batch_size $b 2>&1 | grep -E "generate greedy: 320|bs$b wall|coherent"
done
