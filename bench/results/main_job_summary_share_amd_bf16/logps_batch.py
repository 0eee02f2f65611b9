"""pair_logps of the main job's 64 held-out pairs at 16 / 32 / 64 / 8 rows a batch, two repeats, the trained adapter on
and unmerged, as load_trained gives it (the recipe's summary runs it merged: align.evaluation.policy_report):

    HF_HUB_OFFLINE=1 python bench/results/main_job_summary_share_amd_bf16/logps_batch.py OUT/adapter
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the checkout

import torch  # noqa: E402

from align.data.load import load_preferences  # noqa: E402
from align.evaluation.logprobs import pair_logps  # noqa: E402
from align.models.loading import cpu_description, load_trained  # noqa: E402

torch.set_num_threads(2)
model, tokenizer = load_trained(sys.argv[1])
model.eval()
pairs = load_preferences("ifprefs:prefs_test", max_rows=64)  # the recipe's held-out pairs
args = ([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs])
print(cpu_description(), next(model.parameters()).dtype, flush=True)
first = None
for repeat in range(2):
    for batch_size in (16, 32, 64, 8):
        started = time.time()
        with torch.no_grad():
            chosen, rejected = pair_logps(model, tokenizer, *args, batch_size)
        seconds = time.time() - started
        first = first or chosen + rejected
        diff = max(abs(a[0] - b[0]) for a, b in zip(chosen + rejected, first))
        print(f"repeat {repeat} batch {batch_size}: {seconds:.1f} s, max |diff| vs batch 16 {diff:.4f}", flush=True)
