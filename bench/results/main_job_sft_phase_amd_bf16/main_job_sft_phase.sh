#!/bin/bash
# the main job from the dev tree with an SFT phase: $1 = sft_steps, $2 = max_steps, $3 = seed
S=$1; M=$2; SEED=$3; OUT=/work/s27/mj_sft${S}_of${M}_s${SEED}
export HF_HUB_OFFLINE=1 PYTHONPATH=/work/s27/dev
cd /work/s27/dev
/usr/bin/time -v accelerate launch recipes/dpo.py --output_dir $OUT --cpu_threads 2 --seed $SEED --sft_steps $S --max_steps $M > $OUT.log 2>&1
python eval/evaluate.py $OUT --out $OUT/eval --modes greedy --max_prompts 320 --pref_data none --ppl_data none > $OUT.eval.log 2>&1
python eval/rescore.py /work/s24/out/ppo_plain_k4/eval-base $OUT/eval > $OUT.rescore.txt 2>&1
echo done > $OUT.done
