"""The after-summary of the main job's trained adapter on a bf16 CPU, with the adapter merged into the bf16 weights
(align.models.generation.merged_adapter, since December 5) and unmerged (as before): time, coherent strict, replies
identical; and the 64 held-out pairs' reply log-probs of each against the float32 adapter's."""
import json, sys, time, torch
from align.data.load import load_preferences, load_prompts
from align.evaluation.logprobs import pair_logps
from align.evaluation.policy_report import summarize_policy
from align.models import generation
from align.models.loading import load_trained

torch.set_num_threads(2)
adapter = sys.argv[1]
pairs = load_preferences("ifprefs:prefs_test", max_rows=64)
prompts = load_prompts("ifprefs:eval", max_rows=128)
args = ([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs], 16)


def flat(out):
    return [x[0] for x in out[0]] + [x[0] for x in out[1]]


model, tok = load_trained(adapter, dtype="fp32")
reference = flat(pair_logps(model, tok, *args))
del model
model, tok = load_trained(adapter, dtype="bf16")
faithful = generation.adapter_merges_faithfully
results, replies = {}, {}
for variant in ("merged", "unmerged", "merged", "unmerged"):
    generation.adapter_merges_faithfully = faithful if variant == "merged" else (lambda m: False)
    t = time.perf_counter()
    with generation.merged_adapter(model):
        logps = flat(pair_logps(model, tok, *args))
    t_logps = time.perf_counter() - t
    t = time.perf_counter()
    out = summarize_policy(model, tok, [], prompts, beta=0.1, adapter=True, max_new_tokens=96)
    t_gen = time.perf_counter() - t
    replies[variant] = [r["reply"] for r in out["rows"]]
    errors = [abs(a - b) for a, b in zip(logps, reference)]
    row = {"variant": variant, "logps_s": round(t_logps, 1), "generate_s": round(t_gen, 1),
           "coherent_strict": out["verifier/coherent_strict"], "degenerate": out["gen/degenerate_share"],
           "mean_length": out["gen/mean_length"], "logp_error_vs_fp32_mean": round(sum(errors) / len(errors), 3),
           "logp_error_vs_fp32_max": round(max(errors), 3)}
    print(json.dumps(row), flush=True)
generation.adapter_merges_faithfully = faithful
same = sum(a == b for a, b in zip(replies["merged"], replies["unmerged"]))
print(json.dumps({"identical_replies_merged_vs_unmerged": same, "of": len(prompts)}))
json.dump({"merged": replies["merged"], "unmerged": replies["unmerged"]}, open(sys.argv[2], "w"), indent=1)
