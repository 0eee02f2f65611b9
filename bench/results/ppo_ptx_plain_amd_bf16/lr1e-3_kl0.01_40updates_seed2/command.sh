#!/bin/bash
# PPO-ptx from the plain model to 40 updates, seed 2 (AMD EPYC family 25 model 17, 2 cores, avx512_bf16, no AMX flag, bf16), December 6, commit 0c9295b
# START_EVAL: `python eval/evaluate.py PLAIN --out START_EVAL --modes greedy --max_prompts 320 --pref_data none --ppl_data none`
HF_HUB_OFFLINE=1 /usr/bin/time -v python bench/learning_curve.py --recipe ppo --steps 40 --out OUT --base_eval START_EVAL -- --sft_dir none --cpu_threads 2 --reward verifier --critic shared --learning_rate 1e-3 --kl_coef 0.01 --rollout_batch_size 8 --ppo_epochs 2 --response_length 96 --ptx_data ifprefs:sft --ptx_batch_size 8 --seed 2
# replies: PYTHONPATH=. python bench/results/pipeline_amd_bf16/replies_side.py 200 220 OUT/replies_200_219.md start=START_EVAL s2_u40=OUT/eval-step-40 s0_u40=../lr1e-3_kl0.01_40updates/eval-step-40
