"""PPO's own sampling (align.rl.ppo.rollout.sample_responses: the policy merged, decode_ids with per-row Gumbel draws)
with and without packed_linear_weights, alternating in one process: the recipe's default models (plain
SmolLM2-135M-Instruct, dtype auto), 64 held-out prompts in batches of BATCH (the bench's 4), up to 64 new tokens,
temperature 0.7.

    HF_HUB_OFFLINE=1 python bench/results/ppo_vs_trl_amd_bf16/dec7_packed/ppo_sampling_packed.py BATCH
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from align.data.load import load_prompts  # noqa: E402
from align.models import generation  # noqa: E402
from align.rl.ppo.config import PPOArgs  # noqa: E402
from align.rl.ppo.models import build_models  # noqa: E402
from align.rl.ppo.rollout import sample_responses  # noqa: E402

torch.set_num_threads(2)
batch_size = int(sys.argv[1])
built = build_models(PPOArgs(output_dir="/tmp/ppo_sampling_packed"))
models = built[0] if isinstance(built, tuple) else built
records = load_prompts("ifprefs:eval", max_rows=64)
available = generation.packs_bf16_weights
samples = {}
for repeat in range(2):
    for packed in (False, True):
        generation.packs_bf16_weights = available if packed else (lambda: False)
        started, tokens, responses = time.perf_counter(), 0, []
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            _, _, response, response_mask, _ = sample_responses(models, batch, [start + i for i in range(len(batch))],
                                                                temperature=0.7, max_new_tokens=64)
            tokens += int(response_mask.sum())
            responses += [row[mask].tolist() for row, mask in zip(response, response_mask.bool())]
        samples.setdefault(packed, responses)
        print(f"batch {batch_size} packed={packed}: {time.perf_counter() - started:.1f} s, {tokens} new tokens", flush=True)
print(f"the same samples packed and not: {sum(a == b for a, b in zip(samples[False], samples[True]))}/{len(records)}")
