# experiment: before each summary of the DPO recipe, measure the process and the model: threads, a bf16 matmul's
# GFLOP/s, one no-grad forward of the starting model (adapter disabled) on a fixed batch, hooks, attention
import sys, time
if "recipes/dpo.py" in " ".join(sys.argv):
    import align.evaluation.policy_report as pr
    _orig = pr.summarize_policy
    def _probe(model, tag):
        import torch
        out = {"threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads(), "grad": torch.is_grad_enabled(),
               "attn": model.config._attn_implementation, "training": model.training,
               "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
               "modules": sum(1 for _ in model.modules())}
        a = torch.randn(2048, 2048, dtype=torch.bfloat16); b = torch.randn(2048, 2048, dtype=torch.bfloat16)
        torch.mm(a, b); t0 = time.perf_counter(); n = 0
        while time.perf_counter() - t0 < 3:
            torch.mm(a, b); n += 1
        out["mm_gflops"] = round(2 * 2048**3 * n / (time.perf_counter() - t0) / 1e9)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(100, 40000, (16, 256), generator=g)
        was = model.training; model.eval()
        times = []
        with torch.no_grad(), model.disable_adapter():
            for _ in range(4):
                t0 = time.perf_counter(); model(input_ids=ids, use_cache=False, logits_to_keep=129); times.append(round(time.perf_counter() - t0, 2))
        model.train(was)
        out["forward_s"] = times
        print(f"{time.time():.1f} [probe2] {tag}: {out}", file=sys.stderr, flush=True)
    def summarize_policy(model, *args, **kwargs):
        _probe(model, "before summary (adapter=%s)" % kwargs.get("adapter"))
        return _orig(model, *args, **kwargs)
    pr.summarize_policy = summarize_policy
