"""What the trained policy's summary costs, before and after issue 19's two changes, side by side in one process:

    python bench/summary_cost.py --adapter outputs/dpo/adapter --out bench/results/summary_cost_avx2

1. held-out pair log-probs: two reply_logps calls (chosen, rejected: every prompt run twice) against pair_logps
   (each prompt once, its KV cache repeated for both replies); the recipe's 64 held-out pairs, batch 16;
2. greedy generation of the summary (128 held-out prompts, 96 new tokens, align.evaluation.generate as the
   summary calls it) with the adapter unmerged against merged (align.models.generation.merged_adapter).

Each is timed --repeats times, old and new alternating, on the default model with the given adapter (a trained
one: merging a zero adapter would change nothing). The JSON has every time, the medians' ratios, how far the
log-probs of the two paths differ, and how many greedy replies are identical (merging rounds differently, so a
near-tie may flip).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from align.data.load import load_preferences, load_prompts  # noqa: E402
from align.errors import cli_main  # noqa: E402
from align.evaluation.args import EvalArgs  # noqa: E402
from align.evaluation.generate import generate  # noqa: E402
from align.evaluation.logprobs import pair_logps, reply_logps  # noqa: E402
from align.evaluation.policy import Policy  # noqa: E402
from align.io import atomic_write_json  # noqa: E402
from align.models.generation import merged_adapter  # noqa: E402
from align.models.loading import cpu_description, load_trained  # noqa: E402


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


@cli_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True, help="a trained adapter folder (e.g. outputs/dpo/adapter)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    model, tokenizer = load_trained(args.adapter)
    model.eval()
    pairs = load_preferences("ifprefs:prefs_test", max_rows=args.pairs)  # the recipes' held-out pairs
    prompts_p, chosen, rejected = [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs]
    prompts = [p.prompt for p in load_prompts("ifprefs:eval", max_rows=args.prompts)]
    cfg = EvalArgs(max_new_tokens=args.max_new_tokens, batch_size=16, modes=["greedy"])
    policy = Policy(model=model, tokenizer=tokenizer, kind="model", path=args.adapter)

    times: dict[str, list[float]] = {"logps_twice": [], "logps_pair": [], "generate_unmerged": [], "generate_merged": []}
    with torch.no_grad():
        for _ in range(args.repeats):
            t, old = timed(lambda: (reply_logps(model, tokenizer, prompts_p, chosen, 16),
                                    reply_logps(model, tokenizer, prompts_p, rejected, 16)))
            times["logps_twice"].append(t)
            t, new = timed(lambda: pair_logps(model, tokenizer, prompts_p, chosen, rejected, 16))
            times["logps_pair"].append(t)
            t, unmerged = timed(lambda: generate(policy, prompts, "greedy", cfg))
            times["generate_unmerged"].append(t)

            def merged_run():
                with merged_adapter(model):
                    return generate(policy, prompts, "greedy", cfg)

            t, merged = timed(merged_run)
            times["generate_merged"].append(t)
    with merged_adapter(model):
        did_merge = any(getattr(m, "merged", False) for m in model.modules())
    logp_diff = max(abs(a[0] - b[0]) for side in (0, 1) for a, b in zip(old[side], new[side]))
    median = {k: round(statistics.median(v), 2) for k, v in times.items()}
    result = {
        "cpu": cpu_description(), "threads": args.threads, "adapter": args.adapter, "pairs": len(pairs),
        "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "merged": did_merge,
        "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()}, "median_seconds": median,
        "logps_speedup": round(median["logps_twice"] / median["logps_pair"], 2),
        "generate_speedup": round(median["generate_unmerged"] / median["generate_merged"], 2),
        "new_tokens_unmerged": sum(g.length_tokens for g in unmerged), "new_tokens_merged": sum(g.length_tokens for g in merged),
        "max_logp_difference_nats": round(logp_diff, 5),
        "identical_replies": sum(a.reply == b.reply for a, b in zip(unmerged, merged)),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "summary_cost.json", result)
    print(result)


if __name__ == "__main__":
    main()
