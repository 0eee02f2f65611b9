"""150 distinct (1536 x 576) weights times 64 rows, as a decode step's MLP layers meet them: torch's linear against
the weight prepacked once, bf16 (oneDNN: mkldnn._reorder_linear_weight + _linear_pointwise) and float32 (MKL:
mkl._mkl_reorder_linear_weight + _mkl_linear); median of 5 passes each, and whether the outputs are equal bit for bit.

    python bench/results/packed_weights_amd_bf16/linear_products.py
"""
import statistics
import time

import torch

torch.set_num_threads(2)
torch.manual_seed(0)


def median_ms(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


for dtype in (torch.bfloat16, torch.float32):
    weights = [torch.randn(1536, 576, dtype=dtype) * 0.02 for _ in range(150)]
    x = torch.randn(64, 576, dtype=dtype)
    if dtype == torch.bfloat16:
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in weights]
        run_packed = lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed]  # noqa: E731
    else:
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, 64) for w in weights]
        run_packed = lambda: [torch.ops.mkl._mkl_linear(x, p, w, None, 64) for p, w in zip(packed, weights)]  # noqa: E731
    run_plain = lambda: [torch.nn.functional.linear(x, w) for w in weights]  # noqa: E731
    equal = all(torch.equal(a, b) for a, b in zip(run_plain(), run_packed()))
    plain, fast = median_ms(run_plain), median_ms(run_packed)
    print(f"{str(dtype):15s} plain {plain:6.1f} ms ({plain / 150:.3f} each), packed {fast:6.1f} ms ({fast / 150:.3f} each),"
          f" {plain / fast:.2f}x, bit-identical {equal}")
