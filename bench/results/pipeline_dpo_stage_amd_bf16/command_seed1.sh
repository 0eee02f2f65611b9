#!/bin/bash
while [ ! -f /work/s28/ppo_ptx_lr5e-4.rc ]; do sleep 10; done
OUT=/work/s28/pipe_dpo_112c_s1
export HF_HUB_OFFLINE=1
cd /work/main
/usr/bin/time -v accelerate launch recipes/dpo.py --model_name_or_path /work/s27/pipe42/sft/merged --output_dir $OUT --max_steps 112 --lr_scheduler_type constant --seed 1 --summary_prompts 0 --cpu_threads 2 > $OUT.log 2>&1
python eval/evaluate.py $OUT --out $OUT/eval --modes greedy --max_prompts 320 --pref_data none --ppl_data none > $OUT.eval.log 2>&1
python eval/rescore.py /work/s27/pipe42/base/eval $OUT/eval > $OUT.rescore.txt 2>&1
python eval/rescore.py /work/s27/pipe42/sft/eval $OUT/eval >> $OUT.rescore.txt 2>&1
echo done > $OUT.done
