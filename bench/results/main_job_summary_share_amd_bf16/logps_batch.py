"""pair_logps of the main job's 64 held-out pairs at batch 8 / 16 / 32 / 64 rows, trained adapter on, and off (bf16 here)."""
import sys, time, statistics
sys.path.insert(0, "/work/run22")
import torch
torch.set_num_threads(2)
from align.data.load import load_preferences
from align.evaluation.logprobs import pair_logps
from align.models.loading import load_trained, cpu_description
model, tok = load_trained("/work/s22/mainjob/adapter"); model.eval()
pairs = load_preferences("ifprefs:prefs_test", max_rows=64)
args = ([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs])
print(cpu_description(), next(model.parameters()).dtype, flush=True)
ref = None
for rep in range(2):
    for bs in (16, 32, 64, 8):
        t = time.time()
        with torch.no_grad():
            c, r = pair_logps(model, tok, *args, bs)
        dt = time.time() - t
        if ref is None: ref = (c, r)
        diff = max(abs(a[0] - b[0]) for a, b in zip(c + r, ref[0] + ref[1]))
        print(f"rep {rep} batch {bs}: {dt:.1f} s, max |diff| vs batch 16 {diff:.4f}", flush=True)
