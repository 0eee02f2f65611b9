"""Measure the real peak memory of one LoRA training step, to check align.plan against.

    MALLOC_MMAP_THRESHOLD_=65536 python bench/step_memory.py --stage dpo --seq_len 256 --micro_batch 2 --out /tmp/m.json

One process measures one setting (run each setting in a fresh process so peaks do not mix; see
planner_check.py and bench/validate_planner.py). The step has the stage's real shape and code path:
    sft     causal LM, TRL's fused LM head (`model(..., fused_lm_head=True)`), loss = mean token NLL
    dpo     chosen + rejected concatenated (2 x micro_batch rows), fused LM head, sigmoid DPO loss against
            reference log-probs (precomputed constants, or an adapter-disabled no-grad forward)
    reward  sequence classification (one-output score head), 2 x micro_batch rows, Bradley-Terry loss
    ppo     the engine's update: policy forward and backward (align.ops.logprobs.logprobs_from_logits on the
            response logits), then the critic adapter and value head forward and backward
followed by AdamW on the trainable parameters. The model comes from align.models.loading.load_model.

What is measured:
    cpu   peak RSS minus the RSS at process start (after imports), with MALLOC_MMAP_THRESHOLD_=65536 set by
          planner_check.run_setting (see meter.GLIBC_MMAP_THRESHOLD). The kernel's high-water mark (VmHWM) is
          reset after loading and a short warm-up step (which also creates the AdamW state), then one full
          step runs; where /proc/self/clear_refs cannot be written, a thread samples RSS every millisecond.
    cuda  torch.cuda.max_memory_allocated after the same warm-up and a reset of the peak statistics.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Literal

from align.config import arg, parse_config
from align.errors import ConfigError, cli_main

from .meter import PeakRSS, rss_bytes, status_kib


@dataclass
class StepArgs:
    model: str = arg("SmolLM2-135M-Instruct", "model name or directory (resolved by align.models.loading)")
    stage: Literal["sft", "reward", "dpo", "ppo"] = arg("sft", "training stage whose step is measured")
    quantization: Literal["none", "8bit", "4bit"] = arg("none", "bitsandbytes quantization of the base")
    dtype: Literal["bf16", "fp16", "fp32"] = arg("fp32", "compute dtype (fp32 on CPUs without native bf16)")
    lora_r: int = arg(16, "LoRA rank")
    lora_targets: str = arg("all-linear", "LoRA target modules (comma-separated) or all-linear")
    lora_dropout: float = arg(0.05, "LoRA dropout (PPO always runs without)")
    seq_len: int = arg(256, "tokens per row")
    micro_batch: int = arg(2, "rows (SFT), pairs (reward, DPO) or rollouts (PPO)")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward")
    dpo_reference: Literal["precomputed", "adapter_disabled"] = arg("precomputed", "DPO reference log-probs")
    ppo_response_len: int = arg(64, "PPO: response tokens at the end of each row")
    fuse_lora_dropout: bool = arg(True, "LoRA dropout inside lora_A as the recipes load it (false: PEFT's nn.Dropout)")
    device: Literal["cpu", "cuda"] = arg("cpu", "where to run")
    threads: int = arg(2, "CPU threads")
    out: str | None = arg(None, "write the result as JSON here (else print it)")

    def validate(self) -> None:
        if self.seq_len < 8 or self.micro_batch < 1 or self.lora_r < 1:
            raise ConfigError("config: seq_len >= 8, micro_batch >= 1 and lora_r >= 1 are required")
        if self.stage == "ppo" and not 1 <= self.ppo_response_len < self.seq_len:
            raise ConfigError(f"config: ppo_response_len must be in [1, seq_len), got {self.ppo_response_len}")


def _batch(vocab: int, rows: int, seq_len: int, device, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (rows, seq_len), generator=gen).to(device)
    return ids, torch.ones_like(ids)


def build(bench: StepArgs):
    """(model, tokenizer, extras): the LoRA model as a recipe loads it; extras holds PPO's value head."""
    import torch

    from align.models.loading import ModelArgs, load_model

    margs = ModelArgs(
        model_name_or_path=bench.model, quantization=bench.quantization, dtype=bench.dtype, lora_r=bench.lora_r,
        lora_dropout=0.0 if bench.stage == "ppo" else bench.lora_dropout, lora_target_modules=bench.lora_targets,
        gradient_checkpointing=bench.gradient_checkpointing,
    )
    task = "reward" if bench.stage == "reward" else "causal_lm"
    model, tokenizer = load_model(margs, task=task, fuse_dropout=bench.fuse_lora_dropout)
    extras = {}
    if bench.stage in ("sft", "dpo"):
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model.get_base_model(), outputs=("log_probs",))
    if bench.stage == "ppo":
        from align.models.loading import lora_config

        critic = lora_config(margs, "causal_lm")
        critic.task_type = None
        model.add_adapter("critic", critic)
        model.add_adapter("reward", critic)  # frozen, as align.rl.ppo shares the reward model's base
        hidden = model.get_base_model().config.hidden_size
        extras["value_head"] = torch.nn.Linear(hidden, 1).to(bench.device)
        extras["reward_head"] = torch.nn.Linear(hidden, 1).to(bench.device).requires_grad_(False)
    if bench.quantization == "none":
        model.to(bench.device)
    return model, tokenizer, extras


def trainable_parameters(model, extras) -> list:
    params = [p for n, p in model.named_parameters() if ("lora_" in n or "modules_to_save" in n) and ".reward." not in n]
    for p in params:
        p.requires_grad_(True)
    if "value_head" in extras:
        params += list(extras["value_head"].parameters())
    return params


def autocast_for(bench: StepArgs):
    """TRL's Trainer runs bf16/fp16 under autocast (bf16=True); the PPO engine runs the bf16 model without it."""
    import contextlib

    import torch

    if bench.dtype == "fp32" or bench.stage == "ppo":
        return contextlib.nullcontext()
    return torch.autocast(bench.device, dtype=torch.bfloat16 if bench.dtype == "bf16" else torch.float16)


def train_step(bench: StepArgs, model, extras, seq_len: int, optimizer) -> float:
    """One forward + backward + AdamW step of the stage on random tokens; returns the loss."""
    with autocast_for(bench):
        loss = _forward_backward(bench, model, extras, seq_len)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _forward_backward(bench: StepArgs, model, extras, seq_len: int) -> float:
    import torch
    import torch.nn.functional as F

    from align.ops.logprobs import logprobs_from_logits

    device = bench.device
    vocab = model.get_base_model().config.vocab_size
    B = bench.micro_batch
    if bench.stage == "sft":
        ids, mask = _batch(vocab, B, seq_len, device)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids, fused_lm_head=True).loss
        loss.backward()
    elif bench.stage == "dpo":
        ids, mask = _batch(vocab, 2 * B, seq_len, device)
        if bench.dpo_reference == "adapter_disabled":
            with torch.no_grad(), model.disable_adapter():
                ref = model(input_ids=ids, attention_mask=mask, labels=ids, fused_lm_head=True).log_probs.sum(-1)
        else:
            ref = torch.zeros(2 * B, device=device)
        logps = model(input_ids=ids, attention_mask=mask, labels=ids, fused_lm_head=True).log_probs.sum(-1)
        margin = (logps[:B] - ref[:B]) - (logps[B:] - ref[B:])
        loss = -F.logsigmoid(0.1 * margin).mean()
        loss.backward()
    elif bench.stage == "reward":
        ids, mask = _batch(vocab, 2 * B, seq_len, device)
        scores = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        loss = -F.logsigmoid(scores[:B] - scores[B:]).mean()
        loss.backward()
    else:
        R = min(bench.ppo_response_len, seq_len - 1)
        ids, mask = _batch(vocab, B, seq_len, device)
        query_width = seq_len - R
        decoder = model.get_base_model().model
        lm_head = model.get_base_model().lm_head
        model.set_adapter("default")
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, query_width - 1 : seq_len - 1]
        logprobs = logprobs_from_logits(lm_head(hidden), ids[:, query_width:], 0.7)
        loss = -logprobs.mean()
        loss.backward()
        del hidden, logprobs
        model.set_adapter("critic")
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, query_width - 1 : seq_len - 1]
        head = extras["value_head"]
        values = head(hidden.to(head.weight.dtype)).squeeze(-1)
        value_loss = (values ** 2).mean()
        value_loss.backward()
        loss = loss + value_loss
    return float(loss.detach())


def measure(bench: StepArgs) -> dict:
    """Load, warm up (a 16-token step that also creates the AdamW state), then measure one full step."""
    import torch

    torch.manual_seed(0)
    if bench.device == "cpu":
        torch.set_num_threads(bench.threads)
    start_rss = rss_bytes()
    t0 = time.time()
    model, _, extras = build(bench)
    model.train()
    params = trainable_parameters(model, extras)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    loaded_rss = rss_bytes()
    loaded_file_rss = (status_kib("RssFile") or 0) * 1024  # memory-mapped checkpoint pages are file-backed
    train_step(bench, model, extras, 16 if bench.stage != "ppo" else bench.ppo_response_len + 8, optimizer)
    result = {"setting": asdict(bench), "start_rss_bytes": start_rss, "loaded_rss_bytes": loaded_rss,
              "loaded_file_rss_bytes": loaded_file_rss,
              "trainable_params": sum(p.numel() for p in params), "load_and_warmup_s": round(time.time() - t0, 2)}
    t1 = time.perf_counter()
    if bench.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss = train_step(bench, model, extras, bench.seq_len, optimizer)
        torch.cuda.synchronize()
        result.update(measured_bytes=torch.cuda.max_memory_allocated(), method="cuda.max_memory_allocated",
                      device_name=torch.cuda.get_device_name())
    else:
        with PeakRSS() as peak:
            loss = train_step(bench, model, extras, bench.seq_len, optimizer)
        result.update(measured_bytes=peak.peak - start_rss, peak_rss_bytes=peak.peak, method=f"rss:{peak.method}")
    # microseconds: a tiny model's step can take under 5 ms, which 2 decimals would call 0 s (and tokens/s infinite)
    result.update(step_s=round(time.perf_counter() - t1, 6), loss=loss)
    return result


@cli_main
def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    bench = parse_config(StepArgs, argv)
    import torch  # noqa: F401 - imported before the starting RSS is read, like everything measure() needs
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import trl.trainer.utils  # noqa: F401

    import align.models.loading  # noqa: F401
    import align.ops.logprobs  # noqa: F401

    result = measure(bench)
    text = json.dumps(result, indent=2)
    if bench.out:
        from align.io import atomic_write_text

        atomic_write_text(bench.out, text + "\n")
    else:
        print(text)

