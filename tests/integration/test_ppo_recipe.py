"""recipes/ppo.py as a real process on tiny models: end to end with the verifier and with a reward adapter, user
errors, --stop_on_health, SIGTERM and resume, a kill mid-checkpoint, and (slow) two processes under accelerate.
The engine in process is tests/unit/rl/ppo/test_ppo_trainer.py."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from align.rl.ppo.checkpoint import list_checkpoints
from ppo_engine import make_reward_adapter, resume_from_update_2_matches, tiny_cfg, trainer_for
from recipe_harness import reproducible
from repo_paths import REPO, SUPPORT

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def write_prompts(path: Path, n: int = 8, constraints: bool = True) -> str:
    rows = [{"prompt": f"write {i} words about the sea", **({"constraints": [{"type": "lowercase"}]} if constraints else {})}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_demonstrations(path: Path) -> str:
    """Five SFT rows whose replies differ in length (so the processes' halves of a step hold different token counts)."""
    rows = [{"messages": [{"role": "user", "content": f"say it {i} times"}, {"role": "assistant", "content": "yes " * (1 + 3 * i)}]}
            for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def recipe_args(model_dir: str, out_dir: Path, prompts: str, *extra: str) -> list[str]:
    return ["--model_name_or_path", model_dir, "--sft_dir", "none", "--dtype", "fp32", "--output_dir", str(out_dir),
            "--prompts", prompts, "--eval_prompts", prompts, "--num_eval_prompts", "4", "--rollout_batch_size", "4",
            "--minibatch_size", "2", "--micro_batch_size", "2", "--forward_batch_size", "4", "--response_length", "6",
            "--total_updates", "2", "--lora_r", "4", "--lora_alpha", "8", "--temperature", "1.0", "--cpu_threads", "1", *extra]


def run_recipe(args: list[str], launcher: list[str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = (launcher or [sys.executable]) + [str(REPO / "recipes" / "ppo.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_recipe_end_to_end_with_the_verifier(tiny_model_dir, tmp_path):
    from align.models.loading import load_trained

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    # raw verifier score: the tiny random model's few bytes are no answer to the guard (0 everywhere, nothing to learn);
    # the guard is the default (test_verifier_reward_is_guarded_by_default)
    result = run_recipe(recipe_args(tiny_model_dir, out, prompts, "--reward", "verifier", "--reward_guard", "false"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reward: the built-in verifier" in result.stderr
    assert "sft_dir is none: the base is the plain model" in result.stderr
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "critic/value_head.safetensors",
                 "config.yaml", "run_info.json", "metrics.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ("objective/kl", "objective/scores", "objective/rlhf_reward", "ppo/approx_kl", "ppo/clipfrac", "ppo/ratio_mean",
                "ppo/ratio_max", "ppo/value_loss", "ppo/value_clipfrac", "objective/entropy", "rollout/response_length",
                "rollout/eos_rate", "objective/beta", "time_s", "perf/tokens"):
        assert all(math.isfinite(m[key]) for m in metrics), key
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates"] == 2 and summary["peak_memory_mb"] > 0 and summary["method"] == "ppo"
    for side in ("heldout_before", "heldout_after"):  # greedy, the block of the other recipes' summaries
        assert set(summary[side]) >= {"verifier/coherent_strict", "verifier/strict", "verifier/score", "gen/degenerate_share",
                                      "gen/unasked_format_share", "verifier/by_constraint", "rows"}
        assert [r["prompt_id"] for r in summary[side]["rows"]] == [r["prompt_id"] for r in summary["heldout_before"]["rows"]]
    assert len(summary["heldout_after"]["rows"]) == 4
    assert "unguarded (reward_guard false)" in summary["reward"]
    assert "coherent strict (strict and not degenerate):" in result.stderr
    card = (out / "adapter" / "README.md").read_text()  # align.publish.model_card's, with the held-out numbers
    assert "Method: PPO with a LoRA critic" in card and f"BASE = {str(Path(tiny_model_dir).resolve())!r}" in card
    assert f"| coherent strict (strict and not degenerate) | {summary['heldout_before']['verifier/coherent_strict']:.3f} |" in card
    model, _ = load_trained(str(out), dtype="fp32")  # the policy loads like any other adapter
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


def test_recipe_end_to_end_with_a_reward_adapter(tiny_model_dir, tmp_path):
    make_reward_adapter(tiny_model_dir, tmp_path / "reward" / "adapter")  # as recipes/reward.py writes outputs/reward
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    result = run_recipe(recipe_args(tiny_model_dir, out, prompts, "--reward_model", str(tmp_path / "reward")))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert "on the shared base" in summary["reward"]
    assert set(summary["heldout_before"]) >= {"verifier/score", "reward"}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("objective/verifier" in m for m in metrics), "the verifier is logged next to a learned reward"


def test_recipe_user_errors_exit_2_with_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import runpy

    prompts = write_prompts(tmp_path / "plain.jsonl", constraints=False)
    cases = [
        (["--reward", "verifier"], "error: reward: the verifier scores prompts by their constraints, and"),
        (["--reward", "no_such_module_xyz:score"], "error: config: reward: cannot import no_such_module_xyz"),
        (["--reward", "model", "--reward_model", str(tmp_path / "nowhere")], "error: config: reward_model:"),
        (["--rollout_batch_size", "5"], "error: config: minibatch_size (2) must divide rollout_batch_size (5)"),
    ]
    for extra, message in cases:  # in-process: the recipe's main() under cli_main, as `python recipes/ppo.py` runs it
        monkeypatch.setattr(sys, "argv", ["ppo.py", *recipe_args(tiny_model_dir, tmp_path / "out", prompts, *extra)])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(REPO / "recipes" / "ppo.py"), run_name="__main__")
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err[-2000:]
        assert message in err and "Traceback" not in err, err[-2000:]


def test_recipe_stop_on_health_exits_after_a_checkpoint(tiny_model_dir, tmp_path):
    """A health check crossing its threshold under --stop_on_health, end to end: the recipe checkpoints,
    writes summary.json with the reason, and exits 2 with one `error:` line naming the check and the
    checkpoint (no traceback). A KL budget of -1 nats is crossed by the first update (KL 0: B = 0)."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    result = run_recipe(recipe_args(tiny_model_dir, out, prompts, "--reward", "verifier", "--num_eval_prompts", "0",
                                    "--total_updates", "4", "--stop_on_health", "true", "--health_kl_budget", "-1"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    checkpoint = out / "checkpoints" / "update-000001"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: update 1: stopped by --stop_on_health: mean KL 0.000 nats beyond the budget -1.0: the policy is "
                      f"drifting far from the reference (checkpoint {checkpoint}; --resume continues)"], result.stderr[-3000:]
    assert [p.name for p in list_checkpoints(out)] == ["update-000001"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates"] == 1 and summary["stopped"].startswith("health: mean KL 0.000 nats beyond the budget")
    assert not (out / "adapter").exists(), "a stopped run leaves a checkpoint, not a final adapter"


def test_recipe_sigterm_saves_a_checkpoint_and_resumes(tiny_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    args = recipe_args(tiny_model_dir, out, prompts, "--reward", "verifier", "--total_updates", "40", "--save_steps", "100",
                       "--num_eval_prompts", "0")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "recipes" / "ppo.py"), *args], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    for line in proc.stderr:  # wait for the first update, then interrupt
        lines.append(line)
        if line.startswith("[ppo] update 1/40"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=300)[1]
    assert proc.returncode == 128 + signal.SIGTERM, "".join(lines) + rest
    assert "SIGTERM: checkpoint" in rest
    saved = list_checkpoints(out)
    assert len(saved) == 1
    assert json.loads((out / "summary.json").read_text())["stopped"] == "SIGTERM"
    done = int(saved[0].name.split("-")[1])
    result = run_recipe(args[:-4] + ["--total_updates", str(done + 1), "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {saved[0]}" in result.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, done + 2))


KILL_MID_CHECKPOINT = """
import os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, {support!r})
from ppo_engine import tiny_cfg, trainer_for
trainer = trainer_for(tiny_cfg({model!r}, Path({out!r}), **{options!r}))
real_save = torch.save
def save(obj, f, *args, **kwargs):  # checkpoint 3: the adapters are written, state.pt is not
    if str(f).endswith("state.pt") and trainer.update_index == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
trainer.train()
"""


def test_kill_in_the_middle_of_a_checkpoint_then_resume_matches_uninterrupted(tiny_model_dir, tmp_path):
    """SIGKILL while checkpoint 3 is being written (policy and critic adapters on disk, optimizer state not):
    the half-written checkpoint is never seen under its final name, resume continues from update 2, and the
    finished run is bitwise equal to an uninterrupted one (as in test_resume_equals_an_uninterrupted_run)."""
    options = dict(total_updates=4, save_steps=1, kl_target=1.0, lr_scheduler="linear")
    whole = trainer_for(tiny_cfg(tiny_model_dir, tmp_path / "whole", **options))
    whole.train()

    out = tmp_path / "killed"
    code = KILL_MID_CHECKPOINT.format(support=str(SUPPORT), model=tiny_model_dir, out=str(out), options=options)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [p.name for p in list_checkpoints(out)] == ["update-000001", "update-000002"]  # save_total_limit 2

    cfg = tiny_cfg(tiny_model_dir, out, **options)
    metrics = resume_from_update_2_matches(whole, cfg, tmp_path / "whole", out)
    assert [m["step"] for m in metrics[1]] == [1, 2, 3, 4]
    assert metrics[0] == metrics[1]


@pytest.mark.slow
@pytest.mark.parametrize("samples_per_prompt,ptx", [(1, False), (4, False), (1, True)])
def test_two_processes_equal_one(tiny_model_dir, tmp_path, samples_per_prompt, ptx):
    """The same global batch on 1 process and on 2 (accelerate, gloo): same prompts, same sampled tokens (each
    row's sampler is seeded by its global index), advantages whitened over the global batch, gradients summed
    over processes. Only float summation order differs (different padding widths, all-reduce), so the final
    adapters agree to 1e-4 and the logged metrics to 1e-3 (relative) after 2 updates. With 4 samples of one prompt
    an update, the group spans both processes: its leave-one-out baseline needs the other process's scores (a
    reward that tells the samples apart: the share of lowercase letters). With PPO-ptx (--ptx_data), each process
    scores its half of a step's 4 demonstrations (replies of different lengths), weighted by its share of their
    tokens: the same gradient and the same logged ptx/nll as one process's token mean."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    reward = ["--reward", "verifier"]
    if samples_per_prompt > 1:
        (tmp_path / "letters.py").write_text(
            "def letters(prompts, responses):\n    return [sum('a' <= c <= 'z' for c in r) / max(1, len(r)) for r in responses]\n")
        reward = ["--reward", f"{tmp_path / 'letters.py'}:letters", "--samples_per_prompt", str(samples_per_prompt)]
    extra = [*reward, "--num_eval_prompts", "0", "--report_to", "none", "--micro_batch_size", "1"]
    if ptx:
        extra += ["--ptx_data", write_demonstrations(tmp_path / "demos.jsonl"), "--ptx_batch_size", "4"]
    one = run_recipe(recipe_args(tiny_model_dir, tmp_path / "one", prompts, *extra))
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533"]
    two = run_recipe(recipe_args(tiny_model_dir, tmp_path / "two", prompts, *extra), launcher=launcher)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 process(es)" in two.stderr
    if ptx:
        assert "ptx: 5 demonstrations from" in one.stderr and "ptx/nll" in (tmp_path / "two" / "metrics.jsonl").read_text()
    from safetensors.torch import load_file

    for sub, name in (("adapter", "adapter_model.safetensors"), ("critic", "adapter_model.safetensors"), ("critic", "value_head.safetensors")):
        a, b = (load_file(str(tmp_path / run / sub / name)) for run in ("one", "two"))
        assert a.keys() == b.keys()
        worst = max(float((b[k] - a[k]).abs().max()) for k in a)
        print(f"{sub}/{name}: max |2 processes - 1 process| = {worst:.2e}")
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4, msg=f"{sub}/{name}: {key}")
    m1, m2 = ([reproducible(json.loads(x)) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("one", "two"))
    assert len(m1) == len(m2) == 2
    for r1, r2 in zip(m1, m2):
        assert r1.keys() == r2.keys()
        for key in r1:
            assert r2[key] == pytest.approx(r1[key], rel=1e-3, abs=1e-5), key


@pytest.mark.slow
def test_two_process_run_killed_then_resumed_matches_uninterrupted(tiny_model_dir, tmp_path):
    """2 processes, 4 updates, a checkpoint after each. Once update-000001 is complete the launcher and both workers
    are SIGKILLed; `--resume` on 2 processes then ends bitwise equal (tolerance 0) to the uninterrupted 2-process
    run: each row's sampler is seeded by (seed, update, global row), the optimizer, scheduler, KL controller and
    prompt position come from the checkpoint, and gloo sums the same two tensors in the same order."""
    from recipe_harness import kill_tree
    from safetensors.torch import load_file

    prompts = write_prompts(tmp_path / "prompts.jsonl")

    def args(out_dir: Path, *extra: str) -> list[str]:
        argv = recipe_args(tiny_model_dir, out_dir, prompts, "--reward", "verifier", "--num_eval_prompts", "0",
                           "--report_to", "none", "--micro_batch_size", "1", "--save_steps", "1", "--kl_target", "1.0", *extra)
        argv[argv.index("--total_updates") + 1] = "4"
        return argv

    def launcher(port: int) -> list[str]:
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]

    whole = run_recipe(args(tmp_path / "whole"), launcher=launcher(29536))
    assert whole.returncode == 0, whole.stderr[-3000:]

    split = tmp_path / "split"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with (tmp_path / "split.log").open("w") as log:
        process = subprocess.Popen(launcher(29537) + [str(REPO / "recipes" / "ppo.py"), *args(split)], cwd=REPO, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            while not list_checkpoints(split):  # a checkpoint directory appears only once complete (atomic rename)
                if process.poll() is not None or time.time() > deadline:
                    pytest.fail(f"no checkpoint before exit or timeout:\n{(tmp_path / 'split.log').read_text()[-3000:]}")
                time.sleep(0.01)
        finally:
            kill_tree(process)
    saved = [p.name for p in list_checkpoints(split)]
    assert saved[-1] != "update-000004" and not (split / "adapter").exists(), f"the run outran the kill: {saved}"

    resumed = run_recipe(args(split, "--resume"), launcher=launcher(29538))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {split / 'checkpoints' / saved[-1]}" in resumed.stderr
    for sub, name in (("adapter", "adapter_model.safetensors"), ("critic", "adapter_model.safetensors"), ("critic", "value_head.safetensors")):
        a, b = (load_file(str(run / sub / name)) for run in (tmp_path / "whole", split))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{sub}/{name}: {key}"
    m_whole, m_split = ([reproducible(json.loads(x)) for x in (run / "metrics.jsonl").read_text().splitlines()] for run in (tmp_path / "whole", split))
    assert [m["step"] for m in m_split] == [1, 2, 3, 4]
    assert m_whole == m_split
