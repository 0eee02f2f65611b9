#!/bin/bash
# PPO-ptx from the plain model (AMD EPYC family 25 model 17, 2 cores, avx512_bf16, bf16), December 6
HF_HUB_OFFLINE=1 /usr/bin/time -v python bench/learning_curve.py --recipe ppo --steps 20,40 --out OUT --base_eval START_EVAL -- --sft_dir none --reward verifier --cpu_threads 2 --critic shared --learning_rate 5e-4 --rollout_batch_size 8 --ppo_epochs 2 --response_length 96 --ptx_data ifprefs:sft --ptx_batch_size 8
