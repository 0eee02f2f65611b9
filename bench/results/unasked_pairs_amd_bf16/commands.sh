set -x
cd /work/s18/wt
export HF_HUB_OFFLINE=1 PYTHONPATH=/work/s18/wt
SFT=/work/s17/pipeline/sft/merged
E=/work/s18/e1
mkdir -p $E
EV="--modes greedy --max_prompts 320 --pref_data none --ppl_data none"
/usr/bin/time -v accelerate launch recipes/dpo.py --model_name_or_path $SFT --output_dir $E/new --max_steps 48 --summary_prompts 0 --cpu_threads 2 --train_data /work/s18/ifprefs_new/prefs_train.jsonl --eval_data /work/s18/ifprefs_new/prefs_test.jsonl > $E/new.log 2>&1
python eval/evaluate.py $E/new --out $E/new/eval $EV > $E/new_eval.log 2>&1
/usr/bin/time -v accelerate launch recipes/dpo.py --model_name_or_path $SFT --output_dir $E/old --max_steps 48 --summary_prompts 0 --cpu_threads 2 > $E/old.log 2>&1
python eval/evaluate.py $E/old --out $E/old/eval $EV > $E/old_eval.log 2>&1
python eval/evaluate.py $SFT --out $E/sft_merged_eval $EV > $E/sft_eval.log 2>&1
touch /work/s18/e1.done
