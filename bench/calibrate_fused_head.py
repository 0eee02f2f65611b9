"""Measure how many tile-sized float32 buffers TRL's fused LM head holds at once on a CPU (no Triton).

    MALLOC_MMAP_THRESHOLD_=65536 python bench/calibrate_fused_head.py --positions 510,1022

The result sets align.plan.CPU_CALIBRATION["fused_tile_fp32_copies"] (the count minus the tile itself).
On a GPU the Triton kernels fold each tile in place, so only the tile is counted there. Takes seconds.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from align.config import arg, parse_config  # noqa: E402
from align.errors import cli_main  # noqa: E402


@dataclass
class FusedHeadArgs:
    positions: list[int] = arg([510, 1022], "positions (rows x (seq_len - 1)) per measurement")
    hidden: int = arg(576, "hidden size (the default model's)")
    vocab: int = arg(49152, "vocabulary size (the default model's)")
    threads: int = arg(2, "CPU threads")


@cli_main
def main(argv: list[str] | None = None) -> None:
    import torch
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE, ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    from bench.harness.meter import PeakRSS, rss_bytes

    args = parse_config(FusedHeadArgs, argv)
    torch.set_num_threads(args.threads)
    weight = torch.randn(args.vocab, args.hidden) * 0.02

    def run(n: int) -> None:
        hidden = torch.randn(n, args.hidden, requires_grad=True)
        targets = torch.randint(0, args.vocab, (n,))
        logps = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",))[0]
        logps.sum().backward()

    run(8)  # warm-up: one-time allocations are not part of the head
    for n in args.positions:
        start = rss_bytes()
        with PeakRSS() as peak:
            run(n)
        tile = min(n, TOKEN_CHUNK_SIZE) * min(args.vocab, _CHUNKED_LOGPROB_CHUNK_SIZE) * 4
        print(f"positions {n}: peak - start {(peak.peak - start) / 2**20:.1f} MiB = {(peak.peak - start) / tile:.2f} tile-sized fp32 buffers ({peak.method})")


if __name__ == "__main__":
    main(sys.argv[1:])
