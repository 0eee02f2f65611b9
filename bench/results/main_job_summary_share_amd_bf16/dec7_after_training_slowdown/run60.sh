#!/bin/bash
# The DPO recipe for 60 steps (40 in the SFT phase) with a 64-prompt summary, time-stamped, from a checkout of the code.
# Usage: run60.sh NAME [ENV=VALUE ...]   (PYTHONPATH=<probe folder>:<checkout> adds a probe's sitecustomize.py)
name=$1; shift
env "$@" HF_HUB_OFFLINE=1 /usr/bin/time -v accelerate launch recipes/dpo.py --output_dir OUT/$name --cpu_threads 2 \
  --max_steps 60 --sft_steps 40 --summary_prompts 64 --freed_memory_mmap_mb 4 2>&1 \
  | python -u -c "import sys, time; [print(f'{time.time():.1f} {l}', end='', flush=True) for l in sys.stdin]" > $name.log
