#!/bin/bash
# The ablation: PPO-ptx's likelihood term and KL penalty with a zero reward (zero_reward.py here), otherwise the
# 40-update run of ../lr1e-3_kl0.01_40updates (seed 0). AMD EPYC family 25 model 17, 2 cores, avx512_bf16, no AMX flag, bf16; December 6, commit 0c9295b
HF_HUB_OFFLINE=1 /usr/bin/time -v python bench/learning_curve.py --recipe ppo --steps 24,40 --out OUT --base_eval START_EVAL -- --sft_dir none --cpu_threads 2 --reward bench/results/ppo_ptx_plain_amd_bf16/lr1e-3_kl0.01_40updates_zero_reward/zero_reward.py:zero --critic shared --learning_rate 1e-3 --kl_coef 0.01 --rollout_batch_size 8 --ppo_epochs 2 --response_length 96 --ptx_data ifprefs:sft --ptx_batch_size 8
# replies: PYTHONPATH=. python bench/results/pipeline_amd_bf16/replies_side.py 200 220 OUT/replies_200_219.md start=START_EVAL zero_u24=OUT/eval-step-24 zero_u40=OUT/eval-step-40 verifier_u40=../lr1e-3_kl0.01_40updates/eval-step-40
# the two policies paired: python eval/rescore.py OUT/eval-step-40 VERIFIER_RUN/eval-step-40
