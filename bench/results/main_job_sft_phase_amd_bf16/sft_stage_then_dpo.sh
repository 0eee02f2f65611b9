#!/bin/bash
# feasibility: SFT N steps on the chosen replies, then the main job's DPO from the merged SFT model
set -e
N=$1; SEED=$2; OUT=/work/s27/sftdpo_n${N}_s${SEED}
export HF_HUB_OFFLINE=1
cd /work/main
start=$(date +%s)
accelerate launch recipes/sft.py --train_data /work/s27/chosen_sft_dedup.jsonl --output_dir $OUT/sft --max_steps $N --learning_rate 1e-3 --lr_scheduler_type constant --summary_prompts 0 --merge true --cpu_threads 2 --seed $SEED > $OUT.sft.log 2>&1
mid=$(date +%s)
accelerate launch recipes/dpo.py --model_name_or_path $OUT/sft/merged --output_dir $OUT/dpo --summary_prompts 0 --cpu_threads 2 --seed $SEED > $OUT.dpo.log 2>&1
end=$(date +%s)
echo "sft $((mid-start)) s, dpo $((end-mid)) s" > $OUT.time
python eval/evaluate.py $OUT/dpo --out $OUT/dpo/eval --modes greedy --max_prompts 320 --pref_data none --ppl_data none > $OUT.eval.log 2>&1
python eval/evaluate.py $OUT/sft/merged --out $OUT/sft/eval --modes greedy --max_prompts 320 --pref_data none --ppl_data none > $OUT.evalsft.log 2>&1
echo done >> $OUT.time
