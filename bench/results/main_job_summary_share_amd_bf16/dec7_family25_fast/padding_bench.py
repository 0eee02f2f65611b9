"""Forward+backward of the main job's policy (bf16, LoRA r16 as the recipe) on 4 right-padded rows with the branch mask
(the recipe's path) against, with `rows`, one forward per row without padding, or, with `causal`, no mask (plain causal
attention, padding positions numbered on): the same hidden states? which is faster?

    python padding_bench.py rows|causal      (from anywhere; the repository is found from this file's place)
"""
import sys, time, random, json
ROOT = __import__("pathlib").Path(__file__).resolve().parents[4]; sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "recipes"))
import torch
import dpo as R
from align.config import parse_config
from align.models.loading import load_model
from align.trainers.dpo_fast import add_completion_head, branch_mask_for, PAD
torch.set_num_threads(2)
VARIANT = sys.argv[1]
sys.argv = ["dpo.py", "--output_dir", "/tmp/ub", "--cpu_threads", "2"]
cfg = parse_config(R.DPOArgs)
R.default_sft_steps(cfg); R.default_loss_weights(cfg)
from align.trainers.common import start_run
start_run(cfg, "dpo", cpu_max_steps=R.CPU_MAX_STEPS, learning_rates=R.LEARNING_RATES, notes=[])
model, tok = load_model(cfg)
inner = model.get_base_model()
add_completion_head(inner)
print(type(model), model.dtype if hasattr(model,'dtype') else None, inner.config._attn_implementation)
random.seed(0)

base = inner.base_model  # LlamaModel
def padded(lengths):
    W = max(lengths); R_ = len(lengths)
    ids = torch.randint(100, 40000, (R_, W)); pos = torch.zeros(R_, W, dtype=torch.long); br = torch.zeros(R_, W, dtype=torch.uint8)
    for i, n in enumerate(lengths): pos[i,:n] = torch.arange(n); br[i,:n] = 1
    return ids, pos, br
def run_padded(ids, pos, br):
    mask = branch_mask_for(inner, br)
    h = base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    return h
def run_rows(ids, pos, br, lengths):
    if VARIANT == "rows":
        return torch.cat([base(input_ids=ids[i:i+1,:n], position_ids=pos[i:i+1,:n], use_cache=False).last_hidden_state[0]
                          for i, n in enumerate(lengths)])
    W = ids.shape[1]
    pos2 = torch.arange(W).expand(ids.shape[0], W).contiguous()
    h = base(input_ids=ids, attention_mask=None, position_ids=pos2, use_cache=False).last_hidden_state
    return torch.cat([h[i,:n] for i,n in enumerate(lengths)])
def step(fn):
    t = time.time(); h = fn(); (h.float().square().mean()).backward(); model.zero_grad(set_to_none=True); return time.time() - t
sets = [[random.choice([120,140,160,180,200,250,300]) for _ in range(4)] for _ in range(8)]
ta = tb = 0
for k, L in enumerate(sets):
    ids, pos, br = padded(L)
    a = step(lambda: run_padded(ids, pos, br)); b = step(lambda: run_rows(ids, pos, br, L))
    if k: ta += a; tb += b
    print(L, f"padded {a:.2f}s {VARIANT} {b:.2f}s", flush=True)
# equality check
with torch.no_grad():
    ids, pos, br = padded([150, 90, 200, 60])
    hp = run_padded(ids, pos, br); L=[150,90,200,60]
    flat = torch.cat([hp[i,:n] for i,n in enumerate(L)]); hr = run_rows(ids, pos, br, L)
    print('equal', torch.equal(flat, hr))
    print('max abs diff', (flat.float()-hr.float()).abs().max().item(), 'scale', flat.float().abs().max().item())
print(f"total (7 sets) padded {ta:.2f}s {VARIANT} {tb:.2f}s ratio {ta/tb:.2f}x")
