#!/bin/bash
# The scaling grid in the recipes' dtype on the avx512_bf16 kind (dtype auto = bf16), December 7, the code of commit
# 4b9ab86 (bench/scaling.py with --dtype, default auto; d4a42ad resolves auto the same way on a CPU). CPU: lscpu "AMD EPYC", CPU family 25, model 17, 2 cores; /proc/cpuinfo
# lists avx512_bf16 and no amx flag; a 2048x2048 bf16 matmul on 2 threads ran at 398 GFLOP/s (float32: 156).
# Quiet machine (nothing else ran); 19 min 23 s wall in all.
HF_HUB_OFFLINE=1 /usr/bin/time -v python bench/scaling.py --out_dir bench/results/scaling_amd_bf16
# One cell in both dtypes, one after the other (before the grid, same machine, quiet): bf16 13.4 s, 2185.9 MiB
# (planner 2222.6); fp32 15.6 s, 2880.7 MiB (planner 2936.8).
HF_HUB_OFFLINE=1 python -c "
from dataclasses import replace
from bench.scaling import ScalingArgs, cell_setting, measure_cell
a = ScalingArgs()
for dtype in ('bf16', 'fp32'):
    print(measure_cell(a, replace(cell_setting(a, 'dpo', 256, 2), dtype=dtype)))
"
