#!/bin/bash
# PPO-ptx from the plain model with recipes/configs/ppo_ptx_plain.yaml's settings (2 demonstrations a step, 60 updates, the rate decaying linearly to 0), --seed 3 (AMD EPYC family 26 model 2 (lscpu), 2 cores, avx512_bf16, no AMX flag listed, bf16), December 7, commit 52cad6a
# START_EVAL: `python eval/evaluate.py PLAIN --out START_EVAL --modes greedy --max_prompts 320 --pref_data none --ppl_data none`
HF_HUB_OFFLINE=1 /usr/bin/time -v python bench/learning_curve.py --lr_scheduler linear --recipe ppo --steps 40,50,60 --out OUT --base_eval START_EVAL -- --sft_dir none --cpu_threads 2 --reward verifier --critic shared --learning_rate 1e-3 --kl_coef 0.01 --rollout_batch_size 8 --ppo_epochs 2 --response_length 96 --ptx_data ifprefs:sft --ptx_batch_size 2 --seed 3
# replies: PYTHONPATH=. python bench/results/pipeline_amd_bf16/replies_side.py 200 220 OUT/replies_200_219.md start=START_EVAL u40=OUT/eval-step-40 u60=OUT/eval-step-60
