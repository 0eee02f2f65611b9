"""The after-summary's two parts (64 held-out pairs' log-probs, 128 greedy replies x 96 tokens; the adapter merged) in
one fresh process, with glibc's default malloc or with the DPO recipe's mmap threshold of 1 MiB."""
import json, resource, sys, time, torch
sys.path.insert(0, "/work/main")
from align.models.activations import return_freed_memory_to_os
mode = sys.argv[2]
note = return_freed_memory_to_os() if mode == "mmap1MiB" else "malloc: default"
from align.data.load import load_preferences, load_prompts
from align.evaluation.policy_report import summarize_policy
from align.models.loading import load_trained
torch.set_num_threads(2)
model, tok = load_trained(sys.argv[1])
pairs = load_preferences("ifprefs:prefs_test", max_rows=64)
prompts = load_prompts("ifprefs:eval", max_rows=128)
from align.evaluation.logprobs import pair_logps
from align.models.generation import merged_adapter
model.eval()
t = time.perf_counter()
with torch.no_grad(), merged_adapter(model):
    pair_logps(model, tok, [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs], 16)
t_logps = time.perf_counter() - t
t = time.perf_counter(); out = summarize_policy(model, tok, [], prompts, beta=0.1, adapter=True, max_new_tokens=96); t_gen = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"mode": note, "logps_s": round(t_logps, 1), "generate_s": round(t_gen, 1), "minor_faults": ru.ru_minflt, "peak_rss_kb": ru.ru_maxrss, "coherent_strict": out.get("verifier/coherent_strict")}))
