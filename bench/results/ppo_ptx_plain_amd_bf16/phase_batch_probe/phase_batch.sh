#!/bin/bash
# usage: REPO=<checkout> OUT=<a new folder> bash phase_batch.sh   (the probe of README.md here)
cd "$REPO"
export PYTHONPATH="$REPO" HF_HUB_OFFLINE=1
mkdir "$OUT" || exit 1  # a new folder: nothing earlier is overwritten
for spec in "2 40" "8 10" "4 20"; do
  set -- $spec
  python recipes/ppo.py --config recipes/configs/ppo_ptx_plain.yaml --ptx_batch_size $1 --sft_steps $2 --total_updates 1 --num_eval_prompts 0 --cpu_threads 2 --output_dir "$OUT"/b$1 > "$OUT"/b$1.log 2>&1
done
echo done > "$OUT"/done
