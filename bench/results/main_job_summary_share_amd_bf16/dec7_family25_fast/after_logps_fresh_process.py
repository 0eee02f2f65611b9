"""The main job's held-out pair log-probs in a fresh process: the starting model (adapter disabled) against the trained
adapter merged (as the summary runs them), alternating, two repeats each.

    python after_logps_fresh_process.py OUT/adapter      (align importable)

With --ref (December 7, afternoon, ../dec7_after_training_slowdown/): the trained adapter merged once as loaded, then
twice after adding a "ref" adapter as trl 1.16's DPOTrainer adds one (a copy of "default") when given a PeftModel.
"""
import sys, time
import torch
torch.set_num_threads(2)
from peft import PeftModel
from align.data.load import load_preferences
from align.evaluation.logprobs import pair_logps
from align.models.generation import merged_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer
path = "/root/.cache/align/SmolLM2-135M-Instruct"
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, sys.argv[1]).eval()
pairs = load_preferences("ifprefs:prefs_test", max_rows=64)
args = ([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs], 16)
if "--ref" in sys.argv:
    def timed(label):
        ctx = merged_adapter(model)
        with ctx:
            t = time.time(); pair_logps(model, tok, *args)
            print(f"{label}, merged={ctx.merged}, modules={sum(1 for _ in model.modules())}: {time.time()-t:.1f} s", flush=True)
    timed("default only")
    model.add_adapter("ref", model.peft_config["default"])
    for name, param in model.named_parameters():
        if ".default." in name:
            model.get_parameter(name.replace(".default.", ".ref.")).data.copy_(param.data)
    model.eval()
    timed("with ref")
    timed("with ref")
    sys.exit()
for rep in range(2):
    with model.disable_adapter():
        t = time.time(); pair_logps(model, tok, *args); print(f"start model: {time.time()-t:.1f} s", flush=True)
    ctx = merged_adapter(model)
    with ctx:
        t = time.time(); pair_logps(model, tok, *args); print(f"trained, merged={ctx.merged}: {time.time()-t:.1f} s", flush=True)
