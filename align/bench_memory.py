"""Measure the real peak memory of one LoRA training step, to check align.plan against.

    MALLOC_MMAP_THRESHOLD_=65536 python -m align.bench_memory --stage dpo --seq_len 256 --micro_batch 2 --out /tmp/m.json

One process measures one setting (run each setting in a fresh process so peaks do not mix; see
bench/validate_planner.py). The step has the stage's real shape and code path:
    sft     causal LM, TRL's fused LM head (`model(..., fused_lm_head=True)`), loss = mean token NLL
    dpo     chosen + rejected concatenated (2 x micro_batch rows), fused LM head, sigmoid DPO loss against
            reference log-probs (precomputed constants, or an adapter-disabled no-grad forward)
    reward  sequence classification (one-output score head), 2 x micro_batch rows, Bradley-Terry loss
    ppo     the engine's update: policy forward and backward (align.ppo_math.logprobs_from_logits on the
            response logits), then the critic adapter and value head forward and backward
followed by AdamW on the trainable parameters. The model comes from align.models.load_model.

What is measured:
    cpu   peak RSS minus the RSS at process start (after imports), with MALLOC_MMAP_THRESHOLD_=65536 set by
          run_setting (see GLIBC_MMAP_THRESHOLD). The kernel's high-water mark (VmHWM) is
          reset after loading and a short warm-up step (which also creates the AdamW state), then one full
          step runs; where /proc/self/clear_refs cannot be written, a thread samples RSS every millisecond.
    cuda  torch.cuda.max_memory_allocated after the same warm-up and a reset of the peak statistics.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from align.config import arg, parse_config
from align.errors import ConfigError, cli_main


# glibc serves allocations below its (dynamic, up to 32 MiB) mmap threshold from heaps that keep freed
# blocks: after a checkpointed backward, RSS then overstates live tensors by about 1 GiB on the default
# model (sft T=512 mb=2: 2824 MiB default vs 1781 MiB with this setting). A fixed 64 KiB threshold returns
# every freed tensor to the OS, so RSS follows live memory, as cuda.max_memory_allocated does on a GPU.
GLIBC_MMAP_THRESHOLD = 65536


@dataclass
class BenchArgs:
    model: str = arg("SmolLM2-135M-Instruct", "model name or directory (resolved by align.models)")
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
    device: Literal["cpu", "cuda"] = arg("cpu", "where to run")
    threads: int = arg(2, "CPU threads")
    out: str | None = arg(None, "write the result as JSON here (else print it)")

    def validate(self) -> None:
        if self.seq_len < 8 or self.micro_batch < 1 or self.lora_r < 1:
            raise ConfigError("config: seq_len >= 8, micro_batch >= 1 and lora_r >= 1 are required")
        if self.stage == "ppo" and not 1 <= self.ppo_response_len < self.seq_len:
            raise ConfigError(f"config: ppo_response_len must be in [1, seq_len), got {self.ppo_response_len}")


def plan_args_for(bench: BenchArgs, **overrides):
    """The align.plan PlanArgs describing the same setting as `bench` (used by the validation scripts)."""
    from align.plan import PlanArgs

    values = dict(
        model=bench.model, stage=bench.stage, quantization=bench.quantization, dtype=bench.dtype,
        lora_r=bench.lora_r, lora_targets=bench.lora_targets.split(","), lora_dropout=bench.lora_dropout,
        seq_len=bench.seq_len, micro_batch=bench.micro_batch, gradient_checkpointing=bench.gradient_checkpointing,
        dpo_reference=bench.dpo_reference, ppo_response_len=bench.ppo_response_len,
        target="cuda" if bench.device == "cuda" else "cpu",
    )
    values.update(overrides)
    return PlanArgs(**values)


# ------------------------------------------------------------------------------------------ RSS


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakRSS:
    """Peak RSS over a block: the kernel's VmHWM after a reset, else a 1 ms sampling thread."""

    def __init__(self):
        self.method = "sampled"
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakRSS":
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5 resets the peak RSS (VmHWM) to the current RSS
            if _status_kib("VmHWM") is not None:
                self.method = "VmHWM"
        except OSError:
            pass
        self.peak = rss_bytes()
        if self.method == "sampled":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        if self.method == "VmHWM":
            self.peak = max(self.peak, (_status_kib("VmHWM") or 0) * 1024)


# ------------------------------------------------------------------------------------------ the step


def _batch(vocab: int, rows: int, seq_len: int, device, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (rows, seq_len), generator=gen).to(device)
    return ids, torch.ones_like(ids)


def build(bench: BenchArgs):
    """(model, tokenizer, extras): the LoRA model as a recipe loads it; extras holds PPO's value head."""
    import torch

    from align.models import ModelArgs, load_model

    margs = ModelArgs(
        model_name_or_path=bench.model, quantization=bench.quantization, dtype=bench.dtype, lora_r=bench.lora_r,
        lora_dropout=0.0 if bench.stage == "ppo" else bench.lora_dropout, lora_target_modules=bench.lora_targets,
        gradient_checkpointing=bench.gradient_checkpointing,
    )
    task = "reward" if bench.stage == "reward" else "causal_lm"
    model, tokenizer = load_model(margs, task=task)
    extras = {}
    if bench.stage in ("sft", "dpo"):
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model.get_base_model(), outputs=("log_probs",))
    if bench.stage == "ppo":
        from align.models import lora_config

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


def autocast_for(bench: BenchArgs):
    """TRL's Trainer runs bf16/fp16 under autocast (bf16=True); the PPO engine runs the bf16 model without it."""
    import contextlib

    import torch

    if bench.dtype == "fp32" or bench.stage == "ppo":
        return contextlib.nullcontext()
    return torch.autocast(bench.device, dtype=torch.bfloat16 if bench.dtype == "bf16" else torch.float16)


def train_step(bench: BenchArgs, model, extras, seq_len: int, optimizer) -> float:
    """One forward + backward + AdamW step of the stage on random tokens; returns the loss."""
    with autocast_for(bench):
        loss = _forward_backward(bench, model, extras, seq_len)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _forward_backward(bench: BenchArgs, model, extras, seq_len: int) -> float:
    import torch
    import torch.nn.functional as F

    from align import ppo_math

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
        logprobs = ppo_math.logprobs_from_logits(lm_head(hidden), ids[:, query_width:], 0.7)
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


def measure(bench: BenchArgs) -> dict:
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
    loaded_file_rss = (_status_kib("RssFile") or 0) * 1024  # memory-mapped checkpoint pages are file-backed
    train_step(bench, model, extras, 16 if bench.stage != "ppo" else bench.ppo_response_len + 8, optimizer)
    result = {"setting": asdict(bench), "start_rss_bytes": start_rss, "loaded_rss_bytes": loaded_rss,
              "loaded_file_rss_bytes": loaded_file_rss,
              "trainable_params": sum(p.numel() for p in params), "load_and_warmup_s": round(time.time() - t0, 2)}
    t1 = time.time()
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
    result.update(step_s=round(time.time() - t1, 2), loss=loss)
    return result


# ------------------------------------------------------------------------------------------ validation


@dataclass
class SettingsArgs:
    out_dir: str = arg("bench/results", "where the JSON and Markdown tables go")
    only: list[int] = arg([], "indices of the settings to run (default: all)")
    model: str | None = arg(None, "model directory or name for every setting (default: the embedded default)")
    timeout_s: int = arg(900, "give up on one setting after this many seconds")
    tolerance: float = arg(0.25, "a prediction passes when |predicted / measured - 1| <= tolerance")
    reuse: str | None = arg(None, "a previous <name>.json: compare against its recorded measurements instead of measuring again")


def run_setting(bench: BenchArgs, timeout_s: int) -> dict:
    """Measure `bench` in a fresh process (so peaks never mix) and return its result."""
    import subprocess
    import tempfile

    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="align-bench-") as tmp:
        out = Path(tmp) / "result.json"
        argv = [sys.executable, "-m", "align.bench_memory", "--out", str(out)]
        for key, value in asdict(bench).items():
            if key != "out" and value is not None:
                argv += [f"--{key}", str(value)]
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "PYTHONPATH": str(repo)}
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(GLIBC_MMAP_THRESHOLD))
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, cwd=repo, env=env)
        except subprocess.TimeoutExpired:
            return {"setting": asdict(bench), "error": f"timed out after {timeout_s} s"}
        if proc.returncode != 0 or not out.is_file():
            return {"setting": asdict(bench), "error": proc.stderr.strip()[-2000:] or f"exit {proc.returncode}"}
        return json.loads(out.read_text())


def describe(bench: BenchArgs) -> str:
    parts = [bench.stage, f"T={bench.seq_len}", f"mb={bench.micro_batch}", f"r={bench.lora_r}",
             "ckpt" if bench.gradient_checkpointing else "no-ckpt", bench.quantization, bench.dtype]
    if bench.stage == "dpo":
        parts.append(f"ref={bench.dpo_reference}")
    if bench.stage == "ppo":
        parts.append(f"R={bench.ppo_response_len}")
    return " ".join(parts)


def compare(bench: BenchArgs, measured_bytes: float, tolerance: float, *, subtract_overhead: bool) -> dict:
    """Predicted vs measured for one setting. On CUDA the planner's runtime overhead (not seen by
    max_memory_allocated) is left out of the prediction."""
    from align.plan import estimate

    est = estimate(plan_args_for(bench))
    predicted = est.peak_bytes - (est.components["runtime_overhead"] if subtract_overhead else 0.0)
    ratio = predicted / measured_bytes
    return {
        "setting": describe(bench), "predicted_mib": round(predicted / 2**20, 1), "measured_mib": round(measured_bytes / 2**20, 1),
        "ratio": round(ratio, 3), "within_tolerance": abs(ratio - 1) <= tolerance,
        "predicted_components_mib": {k: round(v / 2**20, 1) for k, v in est.components.items()},
    }


def format_table(rows: list[dict]) -> str:
    lines = ["| setting | predicted MiB | measured MiB | predicted / measured | within tolerance |", "|---|---:|---:|---:|:---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['setting']} | - | - | - | error: {row['error'].splitlines()[-1][:80]} |")
        else:
            mark = "yes" if row["within_tolerance"] else "NO"
            lines.append(f"| {row['setting']} | {row['predicted_mib']:.0f} | {row['measured_mib']:.0f} | {row['ratio']:.3f} | {mark} |")
    return "\n".join(lines)


def run_validation(settings: list[BenchArgs], args: SettingsArgs, *, name: str, calibration_index: int | None = None) -> list[dict]:
    """Run each setting in its own process, compare with the planner, write <out_dir>/<name>.json and .md."""
    from align.io import atomic_write_json, atomic_write_text, package_versions

    chosen = args.only or list(range(len(settings)))
    recorded = {}
    if args.reuse:
        recorded = {row["index"]: row for row in json.loads(Path(args.reuse).read_text())["rows"] if "error" not in row}
    rows = []
    for index in chosen:
        bench = settings[index]
        if args.model is not None:
            bench = BenchArgs(**{**asdict(bench), "model": args.model})
        print(f"[{index}] {describe(bench)} ...", file=sys.stderr, flush=True)
        if args.reuse:
            if index not in recorded or recorded[index]["setting"] != describe(bench):
                print(f"    not in {args.reuse}; skipped", file=sys.stderr)
                continue
            old = recorded[index]
            result = {"measured_bytes": old.get("measured_bytes", old["measured_mib"] * 2**20), "method": old["method"],
                      "step_s": old["step_s"], "trainable_params": old["trainable_params"]}
        else:
            result = run_setting(bench, args.timeout_s)
        if "error" in result:
            row = {"setting": describe(bench), "error": result["error"]}
        else:
            row = compare(bench, result["measured_bytes"], args.tolerance, subtract_overhead=bench.device == "cuda")
            row.update(measured_bytes=result["measured_bytes"], method=result["method"], step_s=result["step_s"],
                       trainable_params=result["trainable_params"])
        row["index"] = index
        row["calibration"] = index == calibration_index
        rows.append(row)
        print(f"    {json.dumps({k: row[k] for k in row if k != 'predicted_components_mib'})}", file=sys.stderr, flush=True)
    checked = [r for r in rows if not r["calibration"] and "error" not in r]
    summary = {
        "validated": len(checked), "within_tolerance": sum(r["within_tolerance"] for r in checked),
        "tolerance": args.tolerance, "versions": package_versions(), "argv": sys.argv,
        "measurements_from": args.reuse or "this run",
    }
    out = Path(args.out_dir)
    atomic_write_json(out / f"{name}.json", {"summary": summary, "rows": rows})
    table = format_table([{**r, "setting": r["setting"] + (" (calibration)" if r["calibration"] else "")} for r in rows])
    atomic_write_text(out / f"{name}.md", table + "\n")
    print(table)
    print(f"{summary['within_tolerance']} of {summary['validated']} validated settings within {args.tolerance:.0%}")
    return rows


@cli_main
def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    bench = parse_config(BenchArgs, argv)
    import torch  # noqa: F401 - imported before the starting RSS is read, like everything measure() needs
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import trl.trainer.utils  # noqa: F401

    import align.models  # noqa: F401
    import align.ppo_math  # noqa: F401

    result = measure(bench)
    text = json.dumps(result, indent=2)
    if bench.out:
        from align.io import atomic_write_text

        atomic_write_text(bench.out, text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
