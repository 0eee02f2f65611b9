#!/bin/bash
# Exact averages (bench/average_adapters.py: the mean of the LoRA deltas, rank k*16) of the last checkpoints of the six
# decaying-rate PPO-ptx runs, each evaluated on all 320 held-out prompts (greedy, 128 new tokens) and paired against the
# plain model (NAME_over_start.txt) and against its own run's update-60 checkpoint (NAME_over_update60.txt).
# AMD EPYC family 26 model 2 (lscpu), 2 cores, avx512_bf16, no AMX flag listed, bf16; December 7, commit 52cad6a.
# lin1 / lin2: ../ptx2_linear_seed1, ../ptx2_linear_seed2 (updates 40, 50, 60); cfg0: ../ptx2_linear_seed0_config
# (updates 50, 60: the run kept two checkpoints); c2s0-2: ../ptx2_coef2_linear_seed0-2 (updates 40, 50, 60).
python bench/average_adapters.py OUT/NAME/adapter RUN/checkpoints/update-000040/policy RUN/checkpoints/update-000050/policy RUN/checkpoints/update-000060/policy
python eval/evaluate.py OUT/NAME/adapter --out OUT/NAME/eval --modes greedy --max_prompts 320 --pref_data none --ppl_data none
python eval/rescore.py START_EVAL OUT/NAME/eval > NAME_over_start.txt
python eval/rescore.py RUN/eval-step-60 OUT/NAME/eval > NAME_over_update60.txt
# replies: PYTHONPATH=. python bench/results/pipeline_amd_bf16/replies_side.py 200 220 replies_cfg0_200_219.md start=START_EVAL u60=RUN/eval-step-60 avg50_60=OUT/cfg0/eval
