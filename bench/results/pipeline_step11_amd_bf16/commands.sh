# AMD EPYC (family 25, model 17), 2 cores, avx512_bf16, no AMX flags: bf16 compute. December 5 (thirteenth session).
# The pipeline on the data of datasets/ifprefs step 11 (SFT rows with a format nobody asked for dropped), the same
# command as bench/results/pipeline_amd_bf16/ (the data before step 11):
HF_HUB_OFFLINE=1 /usr/bin/time -v python recipes/pipeline.py --output_root OUT --sft_args '--cpu_threads 2' --reward_args '--cpu_threads 2' --dpo_args '--cpu_threads 2' --ppo_args '--cpu_threads 2'   # timing.txt
python eval/rescore.py OUT/base/eval OUT/sft/eval OUT/dpo/eval OUT/ppo/eval                       # rescore.txt
python eval/rescore.py BEFORE/sft/eval OUT/sft/eval                                                  # rescore_sft_vs_before_step11.txt (BEFORE: the run of pipeline_amd_bf16)
python unasked_counts.py OUT/base/eval BEFORE/{sft,dpo,ppo}/eval OUT/{sft,dpo,ppo}/eval              # unasked_counts.txt (run from the repository root)
python bench/results/pipeline_amd_bf16/replies_side.py 260 280 replies_260_279.md start=OUT/base/eval sft_old=BEFORE/sft/eval sft_new=OUT/sft/eval dpo_new=OUT/dpo/eval ppo_new=OUT/ppo/eval
python bench/results/pipeline_amd_bf16/replies_side.py 0 20 replies_0_19.md start=OUT/base/eval sft_old=BEFORE/sft/eval sft_new=OUT/sft/eval
# The SFT stage again with --seed 1 (the pipeline's SFT flags), judged on all 320 prompts:
HF_HUB_OFFLINE=1 /usr/bin/time -v accelerate launch recipes/sft.py --output_dir SEED1 --merge true --max_steps 300 --learning_rate 1e-3 --lr_scheduler_type constant --summary_prompts 0 --cpu_threads 2 --seed 1   # sft_seed1_timing.txt
python eval/evaluate.py SEED1 --out SEED1/eval --modes greedy --max_prompts 320 --pref_data none --ppl_data none   # eval_sft_seed1.json
python eval/rescore.py OUT/base/eval SEED1/eval; python eval/rescore.py OUT/sft/eval SEED1/eval; python eval/rescore.py BEFORE/sft/eval SEED1/eval   # rescore_sft_seed1.txt
python bench/results/pipeline_amd_bf16/replies_side.py 260 280 replies_260_279_sft_seeds.md start=OUT/base/eval sft_old=BEFORE/sft/eval sft_new=OUT/sft/eval sft_new_seed1=SEED1/eval
