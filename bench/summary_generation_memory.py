"""Peak RSS and time of a recipe summary's greedy generation on the default model, one side per process (peak RSS
only rises):

    python bench/summary_generation_memory.py after 64 8     # the trained policy (LoRA on, a non-zero adapter)
    python bench/summary_generation_memory.py before 64 8    # the starting model (adapter disabled)

The summary is align.evaluation.policy_report.summarize_policy, as recipes/dpo.py calls it, without held-out pairs.
"""

import sys
import time

import torch

from align.data.load import load_prompts
from align.evaluation.policy_report import summarize_policy
from align.models.loading import ModelArgs, load_model
from align.trainers.common import peak_memory_mb


def main(side: str, n_prompts: int, max_new_tokens: int) -> None:
    torch.set_num_threads(2)
    model, tokenizer = load_model(ModelArgs())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)  # a trained-looking adapter (lora_B starts at 0)
    prompts = load_prompts("ifprefs:eval", max_rows=n_prompts)
    loaded, started = peak_memory_mb(), time.time()
    out = summarize_policy(model, tokenizer, [], prompts, beta=0.1, adapter=side == "after", max_new_tokens=max_new_tokens)
    print(f"{side}: {n_prompts} prompts x {max_new_tokens}: {time.time() - started:.1f} s, peak RSS {loaded:.0f} -> "
          f"{peak_memory_mb():.0f} MB; coherent strict {out.get('verifier/coherent_strict')}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
