"""Probe: PPO sampling speed with the adapter critic and with the shared critic, same prompts and seeds; prints whether the
adapter was merged. Run: HF_HUB_OFFLINE=1 python probe_shared_generation.py adapter shared (output: probe_shared_generation.txt)."""
import time, sys, torch
from align.config import build_config
from align.rl.ppo.config import PPOArgs, POLICY
from align.rl.ppo.models import build_models
from align.rl.ppo.rollout import sample_responses, row_seed
import align.rl.ppo.rollout as R
import align.models.generation as G
from align.data.load import load_prompts

torch.set_num_threads(2)
prompts = [p for p in load_prompts("ifprefs:sft", max_rows=64) if p.constraints][:8]
out = {}
for critic in sys.argv[1:]:
    cfg = build_config(PPOArgs, dict(sft_dir=None, reward="verifier", critic=critic, output_dir="/tmp/probe", report_to="none"))
    models, _ = build_models(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in models.model.named_parameters():
            if f"lora_B.{POLICY}" in n:
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
    flags = []
    class spy(G.merged_adapter):
        def __enter__(self):
            r = super().__enter__(); flags.append(self.merged); return r
    R.merged_adapter = spy
    for rep in range(2):
        t = time.time()
        _, _, responses, mask, _ = sample_responses(models, prompts, [row_seed(0, rep, i) for i in range(8)], temperature=0.7, max_new_tokens=64)
        dt = time.time() - t
        print(critic, rep, f"{dt:.2f} s", int(mask.sum()), f"{mask.sum() / dt:.1f} new tok/s", "merged", flags[-1],
              "dtype", next(models.model.parameters()).dtype, "adapters", list(models.model.peft_config), flush=True)
