cd /work/s18/wt
export HF_HUB_OFFLINE=1 PYTHONPATH=/work/s18/wt
SFT=/work/s17/pipeline/sft/merged
E=/work/s18/e1
EV="--modes greedy --max_prompts 320 --pref_data none --ppl_data none"
/usr/bin/time -v accelerate launch recipes/dpo.py --model_name_or_path $SFT --output_dir $E/v2 --max_steps 48 --summary_prompts 0 --cpu_threads 2 --train_data /work/s18/ifprefs_v2/prefs_train.jsonl --eval_data /work/s18/ifprefs_v2/prefs_test.jsonl > $E/v2.log 2>&1
python eval/evaluate.py $E/v2 --out $E/v2/eval $EV > $E/v2_eval.log 2>&1
touch /work/s18/e2.done
/usr/bin/time -v accelerate launch recipes/dpo.py --output_dir /work/s18/mainjob_v2 --cpu_threads 2 --train_data /work/s18/ifprefs_v2/prefs_train.jsonl --eval_data /work/s18/ifprefs_v2/prefs_test.jsonl > /work/s18/mainjob_v2.log 2>&1
touch /work/s18/mainv2.done
