"""Profile the summary's pair_logps (64 held-out pairs, batch 16, the default model with a fresh LoRA adapter, unmerged,
bf16, 2 threads).  python pair_logps_profile.py ifprefs:prefs_test REPO_ROOT"""
import sys, time
sys.path.insert(0, sys.argv[2] if len(sys.argv) > 2 else ".")
import torch
torch.set_num_threads(2)
from align.models.loading import ModelArgs, load_model
from align.data.load import load_preferences
from align.evaluation.logprobs import pair_logps
model, tok = load_model(ModelArgs(model_name_or_path="SmolLM2-135M-Instruct", quantization="none", lora_r=16))
model.eval()
pairs = load_preferences(sys.argv[1], max_rows=64)
args = (model, tok, [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs], 16)
t = time.time(); pair_logps(*args); print(f"pair_logps 64 pairs: {time.time()-t:.1f} s", flush=True)
with torch.profiler.profile() as prof:
    t = time.time(); pair_logps(*args); print(f"pair_logps 64 pairs (profiled): {time.time()-t:.1f} s", flush=True)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))
