"""The reward recipe's held-out accuracy scoring, side by side in one process: each text scored on its own
(score_texts, twice: chosen, then rejected) against one row per pair (score_pairs), on the default model with a fresh
reward head and LoRA, in the recipe's dtype (auto), the first N pairs of ifprefs:prefs_test, the recipe's batch of 4.
    python bench/results/reward_fast_amd_bf16/heldout_scoring.py 288
"""
import json
import sys
import time

import torch

from align.data.load import load_preferences
from align.models.loading import ModelArgs, load_model
from align.models.reward_model import score_pairs, score_texts

n = int(sys.argv[1]) if len(sys.argv) > 1 else 288
torch.set_num_threads(2)
model, tokenizer = load_model(ModelArgs(), task="reward")
model.eval()
pairs = load_preferences("ifprefs:prefs_test")[:n]
prompts, chosen, rejected = [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs]
results = []
for repeat in range(2):
    for arm in ("each text", "one row per pair"):
        start = time.perf_counter()
        if arm == "each text":
            c = score_texts(model, tokenizer, prompts, chosen, 4)
            r = score_texts(model, tokenizer, prompts, rejected, 4)
        else:
            c, r = score_pairs(model, tokenizer, prompts, chosen, rejected, 4)
        seconds = time.perf_counter() - start
        accuracy = sum(a > b for a, b in zip(c, r)) / len(c)
        results.append({"arm": arm, "repeat": repeat, "pairs": n, "seconds": round(seconds, 1), "accuracy": accuracy,
                        "chosen_mean": sum(c) / n})
        print(json.dumps(results[-1]), flush=True)
