"""Probe: the summary's greedy replies (320 held-out prompts, 128 new tokens, the starting model, packed bf16 weights)
at several generation batch sizes, alternating, in one process."""
import sys, time, json, torch
from align.data.load import load_prompts
from align.evaluation.args import EvalArgs
from align.evaluation.generate import generate
from align.evaluation.policy import Policy
from align.models.generation import packed_linear_weights
from align.models.loading import load_model, cpu_description
from align.models.loading import ModelArgs
torch.set_num_threads(2)
sizes = [int(s) for s in sys.argv[1].split(",")]
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 1
model, tok = load_model(ModelArgs(), lora=False)
model.eval()
prompts = load_prompts("ifprefs:eval")[:320]
policy = Policy(model=model, tokenizer=tok, kind="model", path="policy")
res = {}
with packed_linear_weights(model):
    for r in range(repeats):
        for b in sizes:
            cfg = EvalArgs(max_new_tokens=128, modes=["greedy"], generate_batch_size=b)
            t = time.perf_counter()
            gens = generate(policy, [p.prompt for p in prompts], "greedy", cfg)
            dt = time.perf_counter() - t
            toks = sum(g.length_tokens for g in gens)
            res.setdefault(b, []).append(dt)
            print(b, round(dt, 1), "s", toks, "tokens", round(toks / dt, 1), "tok/s", flush=True)
            res.setdefault(f"replies_{b}", [g.reply for g in gens])
base = res[f"replies_{sizes[0]}"]
for b in sizes[1:]:
    print(b, "identical replies to", sizes[0], ":", sum(x == y for x, y in zip(base, res[f"replies_{b}"])))
