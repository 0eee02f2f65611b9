"""The float32 adapter's greedy after-summary replies (the reference for the bf16 merged/unmerged comparison)."""
import json, sys, torch
from align.data.load import load_prompts
from align.evaluation.policy_report import summarize_policy
from align.models.loading import load_trained
torch.set_num_threads(2)
model, tok = load_trained(sys.argv[1], dtype="fp32")
out = summarize_policy(model, tok, [], load_prompts("ifprefs:eval", max_rows=128), beta=0.1, adapter=True, max_new_tokens=96)
bf16 = json.load(open(sys.argv[2]))
fp32 = [r["reply"] for r in out["rows"]]
print(json.dumps({"fp32_coherent_strict": out["verifier/coherent_strict"], "fp32_degenerate": out["gen/degenerate_share"],
                  **{f"identical_to_fp32_{k}": sum(a == b for a, b in zip(v, fp32)) for k, v in bf16.items()}, "of": len(fp32)}))
