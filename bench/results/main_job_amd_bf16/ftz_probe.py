import sys, time, torch, json
from align.data.load import load_preferences
from align.evaluation.logprobs import pair_logps
from align.models.generation import merged_adapter
from align.models.loading import load_trained
torch.set_num_threads(1)
model, tok = load_trained(sys.argv[1], dtype="fp32")
pairs = load_preferences("ifprefs:prefs_test", max_rows=16)
args = ([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs], 16)
pair_logps(model, tok, *args)
for ftz in (False, True):
    torch.set_flush_denormal(ftz)
    for variant in ("start", "merged", "start", "merged"):
        ctx = model.disable_adapter() if variant == "start" else merged_adapter(model)
        with ctx:
            t = time.perf_counter(); pair_logps(model, tok, *args)
        print(json.dumps({"threads": 1, "flush_denormal": ftz, "variant": variant, "seconds": round(time.perf_counter() - t, 2)}), flush=True)
