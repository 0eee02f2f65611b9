# bf16 matmul throughput in 10-second windows over a sustained run: does this CPU slow down under long load?
import sys, time, torch
torch.set_num_threads(2)
a = torch.randn(2048, 2048, dtype=torch.bfloat16); b = torch.randn(2048, 2048, dtype=torch.bfloat16)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    t0, n = time.time(), 0
    while time.time() - t0 < 10:
        torch.mm(a, b); n += 1
    dt = time.time() - t0
    print(f"{time.strftime('%H:%M:%S')} {2 * 2048**3 * n / dt / 1e9:.0f} GFLOP/s", flush=True)
