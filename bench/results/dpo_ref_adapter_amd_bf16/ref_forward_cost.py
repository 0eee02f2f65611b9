"""What TRL's "ref" adapter costs the DPO reference forward: no-grad forward of 4 rows of 384 tokens of the default
model (bf16 on this CPU) with a fresh LoRA adapter (the recipe's) active, against the same with the adapter disabled."""
import time, torch
torch.set_num_threads(2)
from align.config import build_config
from align.models.loading import load_model
from bench.harness.trainers import load_recipe
cfg = build_config(load_recipe("dpo").DPOArgs, dict(output_dir="/tmp/x", report_to="none"))
model, tok = load_model(cfg)
model.eval()
ids = torch.randint(100, 40000, (4, 384), generator=torch.Generator().manual_seed(0))
def fwd():
    t = time.perf_counter(); model(input_ids=ids, use_cache=False, logits_to_keep=1); return time.perf_counter() - t
with torch.no_grad():
    fwd()
    for rep in range(3):
        a = fwd()
        with model.disable_adapter():
            b = fwd()
        print(f"adapter active {a:.2f} s, disabled {b:.2f} s, ratio {a / b:.2f}", flush=True)
