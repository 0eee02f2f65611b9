"""Peak RSS and time of a recipe summary's greedy generation on the default model, one side per process (peak RSS only rises):

    python bench/summary_generation_memory.py after 64 8     # the trained policy (LoRA on, a non-zero adapter)
    python bench/summary_generation_memory.py before 64 8    # the starting model (adapter disabled)
"""
import resource, sys, time, torch
from align.models.loading import ModelArgs, load_model
from align.data.load import load_prompts
from align.evaluation.policy_report import summarize_policy
side, n, n_new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(2)
model, tok = load_model(ModelArgs())
with torch.no_grad():
    for name, p in model.named_parameters():
        if "lora_B" in name: p.normal_(0, 1e-3)   # a trained-looking adapter
prompts = load_prompts("ifprefs:eval", max_rows=n)
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; t = time.time()
out = summarize_policy(model, tok, [], prompts, beta=0.1, adapter=(side == "after"), max_new_tokens=n_new)
print(f"{side}: {n} prompts x {n_new}: {time.time()-t:.1f} s, peak RSS {r0/1024:.0f} -> {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MB; coherent strict {out.get('verifier/coherent_strict')}")
