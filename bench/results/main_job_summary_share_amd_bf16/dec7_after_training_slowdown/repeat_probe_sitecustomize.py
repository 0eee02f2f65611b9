# experiment: in the DPO recipe's process, before the trained policy's summary, time its 64 held-out pairs' log-probs
# (adapter merged, as the summary runs them) three times: as it is; again; after deleting TRL's "ref" adapter
import sys, time
if "recipes/dpo.py" in " ".join(sys.argv):
    import align.evaluation.policy_report as pr
    _orig = pr.summarize_policy
    def _timed(model, tok, pairs, label):
        from align.evaluation.logprobs import pair_logps
        from align.models.generation import merged_adapter
        was = model.training; model.eval()
        ctx = merged_adapter(model)
        with ctx:
            t = time.time()
            pair_logps(model, tok, [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs], 16)
            dt, merged = time.time() - t, ctx.merged
        model.train(was)
        print(f"{time.time():.1f} [probe3] {label}: merged={merged} adapters={list(model.peft_config)} "
              f"active={model.active_adapters}: {dt:.1f} s", file=sys.stderr, flush=True)
    def summarize_policy(model, tok, pairs, prompts, **kwargs):
        if kwargs.get("adapter"):
            _timed(model, tok, pairs, "trained, as it is")
            _timed(model, tok, pairs, "trained, again")
            if "ref" in model.peft_config:
                model.delete_adapter("ref")
                _timed(model, tok, pairs, "trained, ref adapter deleted")
        return _orig(model, tok, pairs, prompts, **kwargs)
    pr.summarize_policy = summarize_policy
