"""recipes/pipeline.py end to end on the tiny model: SFT -> reward -> DPO and PPO on the SFT base -> evaluation of
the starting model and every policy -> the comparison report, each stage a real recipe process."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

from recipe_harness import REPO, tiny_data  # noqa: F401  (tiny_data is a fixture)


def flags(**values) -> str:
    return shlex.join(part for key, value in values.items() for part in (f"--{key}", str(value)))


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_writes_the_report(tiny_model_dir, tiny_data, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"say {w}", "constraints": [{"type": "lowercase"}]}) + "\n"
                               for i, w in enumerate("abcd")))
    common = dict(dtype="fp32", report_to="none", cpu_threads=1, max_steps=2, save_steps=10, per_device_train_batch_size=2,
                  max_length=128, lora_r=4, lora_alpha=8)
    root = tmp_path / "out"
    cmd = [
        sys.executable, "recipes/pipeline.py", "--output_root", str(root), "--launcher", sys.executable,
        "--sft_args", flags(model_name_or_path=tiny_model_dir, train_data=tiny_data["sft"], **common),
        "--reward_args", flags(train_data=tiny_data["prefs"], eval_data=tiny_data["prefs"], eval_rows=4, **common),
        "--dpo_args", flags(train_data=tiny_data["prefs"], eval_data=tiny_data["prefs"], eval_rows=4, summary_prompts=2,
                            summary_max_new_tokens=4, **common),
        "--ppo_args", flags(prompts=tiny_data["prefs"], eval_prompts=str(prompts), num_eval_prompts=2, dtype="fp32",
                            report_to="none", cpu_threads=1, rollout_batch_size=4, minibatch_size=2, micro_batch_size=2,
                            forward_batch_size=4, response_length=6, total_updates=2, lora_r=4, lora_alpha=8),
        "--grpo_args", flags(train_data=str(prompts), eval_data="none", num_generations=2, per_device_train_batch_size=4,
                             max_completion_length=6, summary_prompts=0, dtype="fp32", report_to="none", cpu_threads=1,
                             max_steps=2, save_steps=10, lora_r=4, lora_alpha=8, algorithm="rloo"),
        "--stages", "sft,reward,dpo,ppo,grpo,compare",
        "--eval_args", flags(prompts=str(prompts), max_prompts=4, max_new_tokens=6, batch_size=4, pref_data=tiny_data["prefs"],
                             max_pairs=4, ppl_data=tiny_data["sft"], max_ppl_rows=4, dtype="fp32"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    for stage in ("sft", "reward", "dpo", "ppo", "grpo"):
        assert (root / stage / "summary.json").is_file(), stage
    assert (root / "sft" / "merged" / "config.json").is_file()
    # reward, DPO and PPO started from the SFT model; the starting model evaluated as `base` is the SFT stage's own
    for stage in ("reward", "dpo", "grpo"):
        assert f"model_name_or_path: {root / 'sft' / 'merged'}" in (root / stage / "config.yaml").read_text()
    # GRPO (here RLOO) is rewarded by the pipeline's reward model, as PPO is
    assert f"reward:\n- {root / 'reward'}\n" in (root / "grpo" / "config.yaml").read_text()
    assert f"evaluate {tiny_model_dir}" in result.stdout
    # on a CPU the shortened stage defaults come first and the user's flags after them (the last flag wins)
    dpo_cmd = next(line for line in result.stdout.splitlines() if line.startswith("[pipeline] dpo: "))
    assert (f"--output_dir {root / 'dpo'} --max_steps 112 --lr_scheduler_type constant --summary_prompts 16 " in dpo_cmd) == (not torch.cuda.is_available())
    ppo_cmd = next(line for line in result.stdout.splitlines() if line.startswith("[pipeline] ppo: "))
    assert (f"--output_dir {root / 'ppo'} --total_updates 12 --num_eval_prompts 0 " in ppo_cmd) == (not torch.cuda.is_available())
    dpo_summary = json.loads((root / "dpo" / "summary.json").read_text())
    assert dpo_summary["steps"] == 2 and dpo_summary["sft_steps"] == 0  # the user's max_steps: DPO from the SFT model
    dpo_after = dpo_summary["after"]
    counted = dpo_after["verifier/by_constraint"]  # the 2 summary prompts' constraints, each counted once
    assert sum(t["total"] for t in counted.values()) == sum(len(r["constraints"]) for r in dpo_after["rows"]) > 0
    report = json.loads((root / "report" / "summary.json").read_text())
    assert [r["method"] for r in report["runs"]][1:] == ["sft", "dpo", "ppo", "rloo"]
    assert {("grpo", "dpo"), ("ppo", "grpo"), ("grpo", "sft")} <= {(d["a"], d["b"]) for d in report["decision"]}  # run names
    for name in ("report.md", "report.html"):
        assert (root / "report" / name).stat().st_size > 1000
    # a second call with --resume skips every training stage
    again = subprocess.run(cmd + ["--resume", "true", "--stages", "sft,reward,dpo,ppo,grpo"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("summary.json exists; skipped") == 5


def test_pipeline_refuses_an_earlier_pipeline_and_overwrite_moves_it_aside(tmp_path):
    """A root holding an earlier pipeline's stage: refused before any stage starts (exit 2, one line, every byte
    kept); --overwrite true moves the whole root aside and starts the stages in a fresh one (here the launcher is
    `false`, so the first stage fails at once: what matters is what happened to the earlier outputs)."""
    import hashlib

    root = tmp_path / "out"
    (root / "sft" / "adapter").mkdir(parents=True)
    (root / "sft" / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (root / "sft" / "summary.json").write_text('{"steps": 20}\n')

    def digest(folder):
        return {str(p.relative_to(folder)): p.is_dir() or hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))}

    before = digest(root)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "recipes/pipeline.py", "--output_root", str(root), "--stages", "sft,dpo", "--launcher", "false"]
    refused = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr == (f"error: --output_root {root} holds an earlier run (sft/); nothing was changed. Use --resume true to "
                              f"continue it, or --overwrite true to move it aside to {root}.old-<time>, or another --output_root\n")
    assert digest(root) == before and "[pipeline] sft:" not in refused.stdout
    # only the stages to run count: DPO alone on the finished SFT overwrites nothing (it fails here: launcher false)
    alone = subprocess.run(cmd[:-4] + ["--stages", "dpo", "--launcher", "false"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
    assert "error: stage dpo failed" in alone.stderr and digest(root) == {**before, ".align-run.lock": digest(root)[".align-run.lock"]}

    moved = subprocess.run(cmd + ["--overwrite", "true"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert "error: stage sft failed" in moved.stderr
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert f"[pipeline] --overwrite: moved what was there (sft/) to {aside}; nothing was deleted" in moved.stdout
    assert {k: v for k, v in digest(aside).items() if k != ".align-run.lock"} == before
