#!/bin/bash
# the main job as a user runs it (dev tree defaults), timed
OUT=/work/s27/mj_default_s42
export HF_HUB_OFFLINE=1 PYTHONPATH=/work/s27/dev
cd /work/s27/dev
/usr/bin/time -v accelerate launch recipes/dpo.py --output_dir $OUT --cpu_threads 2 > $OUT.log 2>&1
echo done > $OUT.done
