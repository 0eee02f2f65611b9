"""Profile the summary's greedy decoding: the starting model, 64 held-out prompts, 128 new tokens, bf16, 2 threads.

    python generation_profile.py REPO_ROOT
"""
import sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(2)
from align.models.loading import ModelArgs, load_model
from align.data.load import load_prompts
from align.evaluation.args import EvalArgs
from align.evaluation.generate import generate
from align.evaluation.policy import Policy
model, tok = load_model(ModelArgs(model_name_or_path="SmolLM2-135M-Instruct", quantization="none", lora_r=16))
model.eval()
prompts = load_prompts("ifprefs:eval", max_rows=64)
policy = Policy(model=model, tokenizer=tok, kind="model", path="policy")
cfg = EvalArgs(max_new_tokens=128, batch_size=16, modes=["greedy"])
with model.disable_adapter():
    t = time.time(); g1 = generate(policy, [p.prompt for p in prompts], "greedy", cfg); print(f"64 prompts: {time.time()-t:.1f} s", flush=True)
    with torch.profiler.profile() as prof:
        t = time.time(); g2 = generate(policy, [p.prompt for p in prompts], "greedy", cfg); print(f"64 prompts (profiled): {time.time()-t:.1f} s", flush=True)
print("same replies", sum(a.reply == b.reply for a, b in zip(g1, g2)), "tokens", sum(g.length_tokens for g in g1))
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
