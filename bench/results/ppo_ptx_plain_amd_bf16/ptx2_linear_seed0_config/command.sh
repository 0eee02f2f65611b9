#!/bin/bash
# recipes/configs/ppo_ptx_plain.yaml as a user runs it, seed 0 (the recipe's default), then all 320 held-out prompts
# (AMD EPYC family 26 model 2 (lscpu), 2 cores, avx512_bf16, no AMX flag listed, bf16), December 7, commit 4418df9
HF_HUB_OFFLINE=1 /usr/bin/time -v accelerate launch recipes/ppo.py --config recipes/configs/ppo_ptx_plain.yaml --output_dir OUT/run --cpu_threads 2 --num_eval_prompts 0
python eval/evaluate.py OUT/run/checkpoints/update-000060/policy --out OUT/eval-step-60 --modes greedy --max_prompts 320 --pref_data none --ppl_data none
python eval/rescore.py START_EVAL OUT/eval-step-60 > rescore_60.txt
# replies: PYTHONPATH=. python bench/results/pipeline_amd_bf16/replies_side.py 200 220 OUT/replies_200_219.md start=START_EVAL u60=OUT/eval-step-60
# IFEval (397 of 541 checkable, greedy, 128 new tokens; December 7, commit 52cad6a, same machine): python eval/evaluate.py OUT/run/checkpoints/update-000060/policy --out OUT/ifeval_60 --modes greedy --prompts ifeval_541.jsonl --on_bad_rows skip --max_prompts 541 --pref_data none --ppl_data none; python eval/rescore.py IFEVAL_START OUT/ifeval_60 > ifeval_rescore_60.txt
