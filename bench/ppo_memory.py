"""PPO's peak memory against DPO's on the same base and the same sequence lengths, each in its own process.

    python bench/ppo_memory.py                                  # the embedded default, 8 prompts, 64-token responses
    python bench/ppo_memory.py --model path/to/model --response_length 16 --rollout_batch_size 4 --out r.json

PPO runs the real engine (align.rl.ppo) for `updates` updates: one base carrying the policy, the critic and
a reward adapter (a random SEQ_CLS LoRA adapter + score head on the same base, saved the way
recipes/reward.py saves one, so its memory is that of a trained one), the reference = adapters disabled;
each update generates, scores, estimates advantages and runs the PPO epochs. Prompts ask for long texts so
that responses fill most of `response_length`; the lengths actually reached are reported.

DPO runs one training step of bench/step_memory.py (--stage dpo): TRL's fused LM head, chosen and rejected
concatenated (2 x micro_batch rows), reference log-probs from an adapter-disabled no-grad forward, AdamW,
at seq_len = the longest PPO prompt + response_length tokens (every row full length: DPO's worst case).

What is compared: peak RSS minus the RSS at process start (after imports), with the kernel's high-water
mark reset after the models are loaded (so loading transients do not count; the weights do) and
MALLOC_MMAP_THRESHOLD_=65536 so that RSS follows live memory. The claim checked: PPO <= 1.5 x DPO
(four separate models would be about four times the weights).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from align.config import arg, parse_config  # noqa: E402
from align.errors import AlignError, cli_main  # noqa: E402
from bench.harness.meter import GLIBC_MMAP_THRESHOLD, PeakRSS, rss_bytes  # noqa: E402
from bench.harness.process import ChildFailed, run_json_child  # noqa: E402

TOPICS = ("a lighthouse keeper", "the history of bread", "a trip to the mountains", "how bridges are built",
          "a robot learning to paint", "the life of a river", "a city at night", "the first day of school")


@dataclass
class PPOMemoryArgs:
    model: str = arg("SmolLM2-135M-Instruct", "base model (name or directory) shared by PPO and DPO")
    rollout_batch_size: int = arg(8, "PPO prompts per update (all rows are generated and scored at once)")
    response_length: int = arg(64, "PPO maximum new tokens")
    micro_batch_size: int = arg(4, "PPO rows per forward/backward in the update; DPO pairs per step (2x rows)")
    updates: int = arg(1, "PPO updates measured")
    lora_r: int = arg(16, "LoRA rank of every adapter")
    dtype: str = arg("fp32", "compute dtype (fp32 on CPUs without native bf16)")
    threads: int = arg(1, "CPU threads per process")
    max_ratio: float = arg(1.5, "the claim: PPO peak <= max_ratio x DPO peak")
    child: str | None = arg(None, "internal: run one side (ppo) in this process")
    out: str | None = arg(None, "write the result as JSON here")


def measure_ppo(args: PPOMemoryArgs) -> dict:
    import torch

    from align.config import build_config
    from align.records import PromptRecord
    from align.rl.ppo.config import PPOArgs
    from align.rl.ppo.models import build_models
    from align.rl.ppo.rewards import reward_function
    from align.rl.ppo.trainer import PPOTrainer

    torch.set_num_threads(args.threads)
    start_rss = rss_bytes()
    with tempfile.TemporaryDirectory(prefix="ppo-memory-") as tmp:
        reward_dir = make_reward_adapter(args, Path(tmp) / "reward")
        cfg = build_config(PPOArgs, dict(
            model_name_or_path=args.model, sft_dir=None, reward="model", reward_model=reward_dir, dtype=args.dtype,
            quantization="none", output_dir=str(Path(tmp) / "out"), rollout_batch_size=args.rollout_batch_size,
            minibatch_size=args.rollout_batch_size, micro_batch_size=args.micro_batch_size, forward_batch_size=args.rollout_batch_size,
            response_length=args.response_length, total_updates=args.updates, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
            eval_prompts=None, report_to="none", save_steps=10**6,
        ))
        models, plan = build_models(cfg)
        assert plan.kind == "shared", plan
        prompts = [PromptRecord(prompt=[{"role": "user", "content": f"Write a long, detailed story about {t}."}]) for t in TOPICS]
        trainer = PPOTrainer(cfg, models, prompts, reward_function(cfg, plan, models), reward_description=plan.description)
        loaded_rss = rss_bytes()
        started = time.time()
        with PeakRSS() as peak:
            trainer.train()
        seconds = time.time() - started
    from align.rl.ppo.rollout import encode_prompts

    query, _ = encode_prompts(models.tokenizer, prompts, torch.device("cpu"))
    return {
        "side": "ppo", "measured_bytes": peak.peak - start_rss, "peak_rss_bytes": peak.peak, "start_rss_bytes": start_rss,
        "loaded_rss_bytes": loaded_rss, "method": f"rss:{peak.method}", "seconds": round(seconds, 1),
        "prompt_tokens_max": int(query.shape[1]),
        "response_length_mean": trainer.history[-1]["rollout/response_length"],
        "length_saturation": trainer.history[-1]["rollout/length_saturation"],
    }


def make_reward_adapter(args: PPOMemoryArgs, directory: Path) -> str:
    """A random SEQ_CLS LoRA adapter + score head on the base, as recipes/reward.py saves a trained one."""
    from align.models.loading import ModelArgs, load_model

    model, tokenizer = load_model(ModelArgs(model_name_or_path=args.model, dtype=args.dtype, quantization="none",
                                            lora_r=args.lora_r, lora_alpha=2 * args.lora_r), task="reward")
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    del model
    return str(directory)


def measure_in_child(argv: list[str], timeout_s: int = 3600) -> dict:
    """`argv --out FILE` in a fresh process (RSS following live memory; one OpenMP thread unless set): its JSON."""
    env = {"MALLOC_MMAP_THRESHOLD_": str(GLIBC_MMAP_THRESHOLD), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.TemporaryDirectory(prefix="ppo-memory-") as tmp:
        out = Path(tmp) / "result.json"
        try:
            return run_json_child(argv + ["--out", str(out)], out, timeout_s=timeout_s, env=env, cwd=REPO)
        except ChildFailed as err:
            raise AlignError(f"{' '.join(argv[:4])} ... failed ({err}):\n{err.output.strip()}") from None


@cli_main
def main() -> None:
    args = parse_config(PPOMemoryArgs)
    if args.child == "ppo":
        result = measure_ppo(args)
        Path(args.out).write_text(json.dumps(result, indent=2))
        return
    own = [sys.executable, str(Path(__file__).resolve())]
    for key, value in asdict(args).items():
        if key not in ("child", "out", "max_ratio") and value is not None:
            own += [f"--{key}", str(value)]
    print(f"[bench] PPO: {args.updates} update(s), {args.rollout_batch_size} prompts x <= {args.response_length} tokens ...", file=sys.stderr, flush=True)
    ppo = measure_in_child(own + ["--child", "ppo"])
    seq_len = ppo["prompt_tokens_max"] + args.response_length
    print(f"[bench] DPO: one step, {args.micro_batch_size} pairs x {seq_len} tokens ...", file=sys.stderr, flush=True)
    dpo = measure_in_child([sys.executable, str(REPO / "bench" / "step_memory.py"), "--stage", "dpo", "--model", args.model, "--dtype", args.dtype,
                     "--lora_r", str(args.lora_r), "--seq_len", str(seq_len), "--micro_batch", str(args.micro_batch_size),
                     "--dpo_reference", "adapter_disabled", "--threads", str(args.threads)])
    ratio = ppo["measured_bytes"] / dpo["measured_bytes"]
    result = {
        "model": args.model,
        "ppo": ppo,
        "dpo": {k: dpo[k] for k in ("measured_bytes", "peak_rss_bytes", "start_rss_bytes", "method", "step_s") if k in dpo} | {"seq_len": seq_len},
        "ppo_mib": round(ppo["measured_bytes"] / 2**20, 1),
        "dpo_mib": round(dpo["measured_bytes"] / 2**20, 1),
        "ratio": round(ratio, 3),
        "claim": f"PPO <= {args.max_ratio} x DPO",
        "holds": ratio <= args.max_ratio,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    print(f"PPO peak {result['ppo_mib']} MiB, DPO peak {result['dpo_mib']} MiB over start: ratio {result['ratio']} "
          f"({'holds' if result['holds'] else 'FAILS'}: {result['claim']})")


if __name__ == "__main__":
    main()
