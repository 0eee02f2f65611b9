"""Why the trained policy's held-out pair log-probs took longer than the starting model's (AVX2 main job: 53 s merged
vs 33 s start): one process, fp32 (the base loaded in float32: the merge needs it), the same 64 pairs, each variant timed twice, interleaved."""
import json, sys, time, torch
from align.data.load import load_preferences
from align.evaluation.logprobs import pair_logps
from align.models.generation import merged_adapter
from align.models.loading import load_trained

torch.set_num_threads(2)
model, tok = load_trained(sys.argv[1], dtype="fp32")
pairs = load_preferences("ifprefs:prefs_test", max_rows=64)
args = ([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs], 16)

def run(variant):
    t = time.perf_counter()
    if variant == "start (adapter disabled)":
        with model.disable_adapter():
            out = pair_logps(model, tok, *args)
    elif variant == "merged":
        with merged_adapter(model):
            out = pair_logps(model, tok, *args)
    else:
        out = pair_logps(model, tok, *args)
    return time.perf_counter() - t, out

results = []
for rep in range(2):
    for variant in ("start (adapter disabled)", "merged", "adapter unmerged"):
        s, out = run(variant)
        results.append({"variant": variant, "rep": rep, "seconds": round(s, 1), "chosen_logp_sum": round(sum(c[0] for c in out[0]), 2)})
        print(json.dumps(results[-1]), flush=True)
