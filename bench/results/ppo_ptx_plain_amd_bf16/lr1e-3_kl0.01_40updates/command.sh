#!/bin/bash
# PPO-ptx from the plain model to 40 updates (AMD EPYC family 25 model 17, 2 cores, avx512_bf16, no AMX flag, bf16), December 6, commit 0c9295b
# START_EVAL: `python eval/evaluate.py PLAIN --out START_EVAL --modes greedy --max_prompts 320 --pref_data none --ppl_data none`
HF_HUB_OFFLINE=1 /usr/bin/time -v python bench/learning_curve.py --recipe ppo --steps 24,32,40 --out OUT --base_eval START_EVAL -- --sft_dir none --cpu_threads 2 --reward verifier --critic shared --learning_rate 1e-3 --kl_coef 0.01 --rollout_batch_size 8 --ppo_epochs 2 --response_length 96 --ptx_data ifprefs:sft --ptx_batch_size 8
# replies: PYTHONPATH=. python bench/results/pipeline_amd_bf16/replies_side.py 200 220 OUT/replies_200_219.md start=START_EVAL u24=OUT/eval-step-24 u40=OUT/eval-step-40
# IFEval (397 of 541 checkable, 128 new tokens): python eval/evaluate.py OUT/run/checkpoints/update-000040/policy --out OUT/ifeval --modes greedy --prompts ifeval_541.jsonl --on_bad_rows skip --max_prompts 541 --pref_data none --ppl_data none; python eval/rescore.py IFEVAL_START OUT/ifeval > ifeval_rescore_40.txt
