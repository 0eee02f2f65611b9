"""The stage benchmark's summary (medians per arm, ratios of each arm to the first) and its printed table."""

from __future__ import annotations

import statistics
from typing import Any


def summarize(runs: list[dict], arms: list[str]) -> dict:
    """Per arm: medians over its runs; per arm after the first: ratios to the first, and the loss gap."""
    ok = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {"arms": {}, "ratios": {}}
    for arm in arms:
        mine = [r for r in ok if r["arm"] == arm]
        if not mine:
            continue
        out["arms"][arm] = {key: statistics.median(r[key] for r in mine) for key in (
            "train_tokens_per_s", "end_to_end_tokens_per_s", "peak_mb", "train_peak_mb", "step_time_s_median",
            "train_flops_per_s", "end_to_end_flops_per_s")}
        out["arms"][arm]["runs"] = len(mine)
    base = arms[0]
    for arm in arms[1:]:
        base_runs = [r for r in ok if r["arm"] == base]
        arm_runs = [r for r in ok if r["arm"] == arm]
        if not base_runs or not arm_runs:
            continue
        # ratios within each repeat (the runs that ran next to each other), then the median
        pairs = [(b, a) for b in base_runs for a in arm_runs if a["run"] == b["run"]]

        def ratio(key: str) -> float:
            return statistics.median(a[key] / b[key] for b, a in pairs)

        losses_b, losses_a = base_runs[0]["losses"], arm_runs[0]["losses"]
        # PPO's policy loss is not DPO's loss; GRPO's arms sample different replies (temperature, beta: TRL's defaults
        # in the baseline) and so take their losses over different data
        same_loss = base_runs[0]["stage"] not in ("ppo", "grpo")
        inits = (base_runs[0]["lora_A_init_abs_sum"], arm_runs[0]["lora_A_init_abs_sum"])
        gaps = [abs(x - y) for x, y in zip(losses_b, losses_a) if x is not None and y is not None] if same_loss else []
        out["ratios"][arm] = {
            "vs": base,
            "train_tokens_per_s": ratio("train_tokens_per_s"),
            "end_to_end_tokens_per_s": ratio("end_to_end_tokens_per_s"),
            "peak_mb": ratio("peak_mb"),
            "train_peak_mb": ratio("train_peak_mb"),
            "per_repeat_train_tokens_per_s": [a["train_tokens_per_s"] / b["train_tokens_per_s"] for b, a in pairs],
            "loss_max_abs_diff": max(gaps) if gaps else None,
            "loss_steps_compared": len(gaps),
            # None where an arm has no LoRA A checksum (PPO: its adapters are not the DPO arm's)
            "same_lora_init": None if None in inits else inits[0] == inits[1],
        }
    return out


def format_table(report: dict) -> str:
    head = report["setup"]
    lines = [
        f"stage {head['stage']} | {head['model_name_or_path']} | data {head['data']} | {head['steps']} steps x {head['batch_size']} "
        f"| max_length {head['max_length']} | {head['device']} {head['dtype']}, {head['threads']} threads "
        f"| matmul peak {head['peak_flops'] / 1e9:.1f} GFLOP/s",
        *[f"  {r['arm']}: prompts {r['data']} | {r['ppo_config']['rollout_batch_size']} rollouts x up to "
          f"{r['ppo_config']['response_length']} new tokens per update | ppo_epochs {r['ppo_config']['ppo_epochs']} "
          f"| minibatch {r['ppo_config']['minibatch_size']}" for r in report["runs"][:2] if "ppo_config" in r],
        *[f"  {r['arm']}: {r['grpo_config']['algorithm']} on prompts {r['data']} | {r['grpo_config']['per_device_train_batch_size']} replies "
          f"({r['grpo_config']['num_generations']} per prompt) of up to {r['grpo_config']['max_completion_length']} tokens per step "
          f"| temperature {r['grpo_config']['temperature']} | beta {r['grpo_config']['beta']} | lr {r['grpo_config']['learning_rate']:g} "
          f"| gradient checkpointing {r['grpo_config']['gradient_checkpointing']}"
          for r in report["runs"][:len(set(head['compare']))] if "grpo_config" in r],
        f"{'arm':<34} {'run':>3} {'train tok/s':>11} {'e2e tok/s':>9} {'step s':>7} {'peak MB':>8} {'train MB':>8} "
        f"{'MFU':>6} {'e2e MFU':>7} {'precomp s':>9}",
    ]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"{r['arm']:<34} {r['run']:>3} FAILED: {r['error'].splitlines()[0]}")
            continue
        lines.append(
            f"{r['arm']:<34} {r['run']:>3} {r['train_tokens_per_s']:>11.1f} {r['end_to_end_tokens_per_s']:>9.1f} "
            f"{r['step_time_s_median']:>7.2f} {r['peak_mb']:>8.0f} {r['train_peak_mb']:>8.0f} "
            f"{r['train_flops_per_s'] / head['peak_flops']:>6.1%} {r['end_to_end_flops_per_s'] / head['peak_flops']:>7.1%} "
            f"{r['phases'].get('precompute_ref', {}).get('time_s', 0.0):>9.1f}"
        )
    for r in report["runs"]:
        if "generate_s" not in (r.get("steps") or [{}])[0]:
            continue
        timed = r["steps"][head["warmup_steps"]:]
        total = {k: sum(s[f"{k}_s"] for s in timed) for k in ("generate", "score", "update")}
        whole = sum(s["time_s"] for s in timed)
        parts = ", ".join(
            f"{k} {total[k] / len(timed):.1f} s ({total[k] / whole:.0%}, "
            f"MFU {sum(s[f'{k}_flops'] for s in timed) / total[k] / head['peak_flops'] if total[k] else 0:.1%}, "
            f"peak {max(s[f'{k}_peak_mb'] for s in timed) - (r['start_mb'] if r['device'] == 'cpu' else 0):.0f} MB)"
            for k in total)
        new_tokens = sum(s["new_tokens"] for s in timed)
        rate = f"{new_tokens / total['generate']:.1f}" if total["generate"] else "n/a"
        if r["stage"] == "ppo":
            lines.append(f"ppo {r['arm']} run {r['run']}, per update: {parts}; other {(whole - sum(total.values())) / len(timed):.1f} s; "
                         f"generation {rate} new tokens/s")
        else:  # grpo: update is the rest of the step
            rewards = [s["reward"] for s in r["steps"] if s.get("reward") is not None]
            reward = f"{rewards[0]:.3f} -> {rewards[-1]:.3f}" if rewards else "n/a"
            lines.append(f"{r['stage']} {r['arm']} run {r['run']}, per step: {parts}; generation {rate} reply tokens/s "
                         f"({new_tokens / len(timed):.0f} per step); reward mean {reward}")
    from bench.trl_ppo.settings import first_update_lines

    lines += first_update_lines(report["runs"])
    for arm, q in report["summary"]["ratios"].items():
        loss = "n/a" if q["loss_max_abs_diff"] is None else f"{q['loss_max_abs_diff']:.4f} over {q['loss_steps_compared']} steps"
        lines.append(
            f"{arm} / {q['vs']}: train tok/s {q['train_tokens_per_s']:.2f}x, end-to-end tok/s {q['end_to_end_tokens_per_s']:.2f}x, "
            f"peak memory {q['peak_mb']:.2f}x (train phase {q['train_peak_mb']:.2f}x); "
            f"loss max |diff| {loss}; same LoRA init: {'n/a' if q['same_lora_init'] is None else q['same_lora_init']}"
        )
    return "\n".join(lines)
