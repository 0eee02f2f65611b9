"""Check align.plan's GPU predictions against torch.cuda.max_memory_allocated, in one short run.

    HF_HUB_OFFLINE=1 python bench/validate_planner_gpu.py --model ~/.cache/align/SmolLM2-135M-Instruct

Needs a CUDA GPU and the model directory (no network is used). Each setting runs
`python bench/step_memory.py --device cuda` in a fresh process: load, a short warm-up step (which creates
the AdamW state), reset of the peak statistics, one full step. The planner's `runtime_overhead` (CUDA
context and allocator slack, which max_memory_allocated does not see) is left out of the prediction; the
other terms are compared one for one. Writes <out_dir>/planner_gpu.json and .md. Takes a few minutes.

These settings run the project's GPU code paths: bf16 under autocast for SFT/DPO/reward (TRL's bf16=True is
mirrored by torch.autocast in bench/harness/memory_step.py), the bf16 model without autocast for PPO, and 4-bit NF4
with prepare_model_for_kbit_training.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness.memory_step import StepArgs  # noqa: E402
from bench.harness.planner_check import SettingsArgs, run_validation  # noqa: E402
from align.config import parse_config  # noqa: E402
from align.errors import AlignError, cli_main  # noqa: E402


def _gpu(**kwargs) -> StepArgs:
    return StepArgs(device="cuda", dtype="bf16", **kwargs)


GPU_SETTINGS = [
    _gpu(stage="sft", seq_len=1024, micro_batch=4, quantization="4bit", gradient_checkpointing=True),
    _gpu(stage="sft", seq_len=1024, micro_batch=4, quantization="none"),
    _gpu(stage="dpo", seq_len=1024, micro_batch=2, quantization="4bit", gradient_checkpointing=True),
    _gpu(stage="dpo", seq_len=512, micro_batch=4, quantization="4bit", lora_r=64),
    _gpu(stage="dpo", seq_len=1024, micro_batch=2, quantization="none", dpo_reference="adapter_disabled"),
    _gpu(stage="reward", seq_len=1024, micro_batch=4, quantization="4bit"),
    _gpu(stage="ppo", seq_len=768, micro_batch=4, quantization="4bit", ppo_response_len=256),
    _gpu(stage="ppo", seq_len=768, micro_batch=4, quantization="none", ppo_response_len=256, gradient_checkpointing=True),
]


@cli_main
def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_config(SettingsArgs, argv)
    if not torch.cuda.is_available():
        raise AlignError("validate_planner_gpu: no CUDA GPU here; run bench/validate_planner.py for the CPU check")
    run_validation(GPU_SETTINGS, args, name="planner_gpu")


if __name__ == "__main__":
    main(sys.argv[1:])
