# AMD EPYC (family 25, model 17), 2 cores, avx512_bf16, no AMX flags: bf16 compute. December 5 (thirteenth session).
HF_HUB_OFFLINE=1 /usr/bin/time -v accelerate launch recipes/dpo.py --output_dir OUT --cpu_threads 2 --max_steps 96 --seed 42   # run.log
python eval/evaluate.py OUT --out OUT/eval --modes greedy --max_prompts 320 --pref_data none --ppl_data none                   # eval_320_summary.json
python eval/rescore.py START_EVAL OUT/eval        # rescore.txt; START_EVAL: the plain model on the same 320 prompts (the 280-step curve's eval-base)
python bench/results/pipeline_amd_bf16/replies_side.py 160 180 replies_160_179.md start=START_EVAL main96=OUT/eval step280=CURVE/eval-step-280
