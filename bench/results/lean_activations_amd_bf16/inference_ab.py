"""Does the model as load_model now gives it (fused MLPs, the LoRA layers' autocast pre-hook) run inference slower?
Side by side in one process, arms alternating: the summary's held-out pair log-probs and greedy replies of the starting
model (adapter disabled, as the main job's first summary), with the two changes on, and with both taken off the same
model (the MLPs' classes put back, the pre-hooks removed).

    HF_HUB_OFFLINE=1 python bench/results/lean_activations_amd_bf16/inference_ab.py PAIRS PROMPTS REPEATS
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

from align.data.load import load_preferences, load_prompts  # noqa: E402
from align.evaluation.policy_report import summarize_policy  # noqa: E402
from align.models.loading import ModelArgs, cpu_description, load_model  # noqa: E402
from align.models.swiglu import _FUSED_CLASSES  # noqa: E402

pairs_n, prompts_n, repeats = (int(a) for a in sys.argv[1:4])
torch.set_num_threads(2)
model, tokenizer = load_model(ModelArgs())
pairs = load_preferences("ifprefs:prefs_test", max_rows=pairs_n)
prompts = load_prompts("ifprefs:eval", max_rows=prompts_n)
fused = {m: type(m) for m in model.modules() if type(m) in _FUSED_CLASSES.values()}
lora = [m for m in model.modules() if isinstance(m, LoraLayer)]
hooks = {m: dict(m._forward_pre_hooks) for m in lora}


def arm(on: bool):
    for module, cls in fused.items():
        module.__class__ = cls if on else cls.__bases__[0]
    for module in lora:
        module._forward_pre_hooks.clear()
        if on:
            module._forward_pre_hooks.update(hooks[module])


print(cpu_description(), f"{len(fused)} fused MLPs, {len(lora)} LoRA layers with the hook", flush=True)
results = {True: [], False: []}
with torch.no_grad():
    for _ in range(repeats):
        for on in (False, True):
            arm(on)
            started = time.perf_counter()
            out = summarize_policy(model, tokenizer, pairs, prompts, beta=0.1, adapter=False, max_new_tokens=96)
            results[on].append((round(time.perf_counter() - started, 1), [r["reply"] for r in out["rows"]]))
            print(f"{'with' if on else 'without'} the two changes: {results[on][-1][0]} s", flush=True)
same = all(a[1] == b[1] for a, b in zip(results[True], results[False]))
print(f"without: {[t for t, _ in results[False]]} s; with: {[t for t, _ in results[True]]} s; replies identical: {same}")
