"""The chunked LM head's forward + backward, before and after December 8, side by side in one process:

    python bench/lm_head_chunks.py --out bench/results/lm_head_fused_amd_bf16

before: each chunk through torch.utils.checkpoint around the head's matmul and `logprobs_from_logits` (autograd
recomputes the chunk's logits and their logsumexp in backward, then makes its own float32 passes);
after: `align.models.lm_head.completion_logprobs` (one autograd function a chunk: logits recomputed once, their
gradient made in place). Both on the default model's head shape (49,152 x 576, random weights), M scored positions
(640 ~ one SFT-phase step of the main job, 1,200 ~ one DPO step), chunk 256, gradient to the hidden states only
(a LoRA run's frozen head), arms alternating, --repeats times each. The JSON has every time, the medians' ratio
and the largest difference of the log-probs and gradients between the two (0 = the same to the bit).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from align.models.lm_head import completion_logprobs  # noqa: E402
from align.models.loading import cpu_description  # noqa: E402
from align.ops.logprobs import logprobs_from_logits  # noqa: E402


def before(hidden, weight, targets, chunk_size):
    """completion_logprobs as it was (stats off): a checkpointed chunk of matmul + logprobs_from_logits."""
    def chunk(h, t):
        return logprobs_from_logits(torch.nn.functional.linear(h, weight), t, chunk_size=h.shape[0])
    return torch.cat([torch.utils.checkpoint.checkpoint(chunk, hidden[s:s + chunk_size], targets[s:s + chunk_size],
                                                        use_reentrant=False)
                      for s in range(0, hidden.shape[0], chunk_size)])


def after(hidden, weight, targets, chunk_size):
    return completion_logprobs(hidden, weight, None, targets, chunk_size, stats=False)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--positions", default="640,1200")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    weight = (torch.randn(49152, 576) * 0.02).to(dtype)
    result = {"cpu": cpu_description(), "threads": args.threads, "dtype": args.dtype, "chunk_size": 256, "cases": []}
    for m in (int(x) for x in args.positions.split(",")):
        targets, hidden0 = torch.randint(0, weight.shape[0], (m,)), torch.randn(m, 576).to(dtype)
        times: dict[str, list[float]] = {"before": [], "after": []}
        outputs = {}
        for _ in range(args.repeats):
            for name, fn in (("before", before), ("after", after)):
                hidden = hidden0.clone().requires_grad_(True)
                started = time.perf_counter()
                logps = fn(hidden, weight, targets, 256)
                logps.sum().backward()
                times[name].append(round(time.perf_counter() - started, 4))
                outputs[name] = (logps.detach(), hidden.grad)
        case = {"positions": m, "seconds": times,
                "median_s": {k: statistics.median(v) for k, v in times.items()},
                "max_abs_diff_logps": (outputs["before"][0] - outputs["after"][0]).abs().max().item(),
                "max_abs_diff_grad": (outputs["before"][1].float() - outputs["after"][1].float()).abs().max().item()}
        case["speedup"] = round(case["median_s"]["before"] / case["median_s"]["after"], 2)
        result["cases"].append(case)
        print(f"{m} positions: before {case['median_s']['before']:.3f} s, after {case['median_s']['after']:.3f} s, "
              f"{case['speedup']}x; max diff log-probs {case['max_abs_diff_logps']}, gradients {case['max_abs_diff_grad']}",
              flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"lm_head_chunks_{args.dtype}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
