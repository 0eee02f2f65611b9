#!/bin/bash
export HF_HUB_OFFLINE=1
cd /work/main
/usr/bin/time -v python bench/learning_curve.py --recipe dpo --steps 56,112,168 --out /work/s28/pipe_dpo_curve --base_eval /work/s27/pipe42/base/eval -- --model_name_or_path /work/s27/pipe42/sft/merged --cpu_threads 2 > /work/s28/pipe_dpo_curve.log 2>&1
echo $? > /work/s28/pipe_dpo_curve.rc
