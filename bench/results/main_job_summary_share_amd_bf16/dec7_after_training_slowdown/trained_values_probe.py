"""Is the after-training summary slower because of the trained weights' values (denormals, say)? In a fresh
process: the held-out pairs' log-probs of the starting model (adapter disabled) and of the trained policy merged, the
latter also with torch.set_flush_denormal(True); two rounds, alternating.

    HF_HUB_OFFLINE=1 python bench/results/main_job_summary_share_amd_bf16/dec7_after_training_slowdown/trained_values_probe.py RUN_DIR [PAIRS]
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from align.data.load import load_preferences  # noqa: E402
from align.evaluation.logprobs import pair_logps  # noqa: E402
from align.models.generation import merged_adapter  # noqa: E402
from align.models.loading import load_trained  # noqa: E402

torch.set_num_threads(2)
model, tokenizer = load_trained(sys.argv[1])
model.eval()
pairs = load_preferences("ifprefs:prefs_test", max_rows=int(sys.argv[2]) if len(sys.argv) > 2 else 32)
args = ([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs])


def timed(name: str, flush: bool) -> None:
    torch.set_flush_denormal(flush)
    started = time.perf_counter()
    with torch.no_grad():
        pair_logps(model, tokenizer, *args, 16)
    print(f"{name}, flush_denormal={flush}: {time.perf_counter() - started:.1f} s", flush=True)
    torch.set_flush_denormal(False)


for _ in range(2):
    with model.disable_adapter():
        timed("starting model", False)
    with merged_adapter(model):
        timed("trained policy, merged", False)
        timed("trained policy, merged", True)
