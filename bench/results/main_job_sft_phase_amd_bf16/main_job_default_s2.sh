#!/bin/bash
OUT=/work/s27/mj_default_s2
export HF_HUB_OFFLINE=1 PYTHONPATH=/work/s27/dev
cd /work/s27/dev
/usr/bin/time -v accelerate launch recipes/dpo.py --output_dir $OUT --cpu_threads 2 --seed 2 > $OUT.log 2>&1
cd /work/main && python eval/evaluate.py $OUT --out $OUT/eval --modes greedy --max_prompts 320 --pref_data none --ppl_data none > $OUT.eval.log 2>&1
python eval/rescore.py /work/s24/out/ppo_plain_k4/eval-base $OUT/eval > $OUT.rescore.txt 2>&1
echo done > $OUT.done
