#!/bin/bash
# PPO-ptx from the plain model with recipes/configs/ppo_ptx_plain.yaml's settings (2 demonstrations a step, 60 updates,
# the rate decaying linearly to 0), --seed 4, December 7, code 2090c10. CPU: AMD EPYC, CPU family 25, model 17 (lscpu),
# 2 cores, avx512_bf16, no AMX flag listed, bf16 (a 2048 x 2048 bf16 matmul on 2 threads: 398 GFLOP/s); a slower machine
# of the bf16 kind than the family 26 model 2 one of seeds 0-3 (updates 5-60 took 27.6-37.4 s here, mean 33.7 s, against 22-24 s there).
# Not quiet at the start: a 2 min 40 s test run (36 tests) shared the 2 cores during updates 1-4 (those four took
# 243 s; the later ones 33.7 s on average).
# START_EVAL: `python eval/evaluate.py SmolLM2-135M-Instruct --out START_EVAL --modes greedy --max_prompts 320 --pref_data none --ppl_data none`
#   (coherent strict 0.125, degenerate 0.459: the same as on the family 26 machine)
HF_HUB_OFFLINE=1 /usr/bin/time -v python bench/learning_curve.py --lr_scheduler linear --recipe ppo --steps 40,50,60 --out OUT --base_eval START_EVAL -- --sft_dir none --cpu_threads 2 --reward verifier --critic shared --learning_rate 1e-3 --kl_coef 0.01 --rollout_batch_size 8 --ppo_epochs 2 --response_length 96 --ptx_data ifprefs:sft --ptx_batch_size 2 --seed 4
# replies: PYTHONPATH=. python bench/results/pipeline_amd_bf16/replies_side.py 200 220 OUT/replies_200_219.md start=START_EVAL u40=OUT/eval-step-40 u60=OUT/eval-step-60
