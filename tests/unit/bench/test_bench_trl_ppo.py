"""bench/trl_ppo: the trl-ppo arm's pure parts, without its venv (building it takes minutes and a registry).

The arm itself runs by hand: `python bench/run.py --stage ppo --compare trl-ppo,align --steps 3` (README).
"""

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.harness.recorders import ppo_step_record
from bench.harness.report import format_table, summarize
from bench.harness.runs import ppo_arm_config
from bench.harness.stage import BenchArgs
from align.config import build_config
from align.errors import ConfigError
from bench.trl_ppo import venv
from bench.trl_ppo.settings import response_hashes, trl_phase_flops, trl_ppo_config

SPEC = {"arm": "align", "model_path": "m", "steps": 3, "seed": 42, "dtype": "bf16", "lora_r": 16}


def test_trl_ppo_config_maps_our_ppo_settings():
    """The PPO recipe's defaults: 8 rollouts, optimizer steps of 4 rows made of micro-batches of 4 (TRL: mini_batch_size
    4 x gradient_accumulation_steps 1), 1 epoch, lr 5e-5, fixed KL 0.05 (TRL's default is adaptive from 0.2), clip 0.2."""
    cfg = ppo_arm_config(SPEC, "/tmp/unused")
    mapped = trl_ppo_config(cfg, steps=3)
    assert (mapped["batch_size"], mapped["mini_batch_size"], mapped["gradient_accumulation_steps"]) == (8, 4, 1)
    assert (mapped["ppo_epochs"], mapped["learning_rate"], mapped["steps"], mapped["seed"]) == (1, 5e-5, 3, 42)
    assert (mapped["adap_kl_ctrl"], mapped["init_kl_coef"], mapped["kl_penalty"]) == (False, 0.05, "kl")
    assert (mapped["cliprange"], mapped["cliprange_value"], mapped["gamma"], mapped["lam"], mapped["max_grad_norm"]) == (0.2, 0.2, 1.0, 0.95, 1.0)
    assert mapped["whiten_rewards"] is False and mapped["use_score_scaling"] is False and mapped["early_stopping"] is False


def test_trl_ppo_config_follows_overrides_and_refuses_what_it_cannot_map():
    """minibatch 8 of micro-batches of 2: TRL's mini_batch_size 2 x 4 accumulation steps; no value clip: a range no
    return reaches. An adaptive KL target is TRL's own controller, not ours: refused, not silently changed."""
    cfg = ppo_arm_config({**SPEC, "arm": "align:minibatch_size=8:micro_batch_size=2:cliprange_value=none"}, "/tmp/unused")
    mapped = trl_ppo_config(cfg, steps=1)
    assert (mapped["mini_batch_size"], mapped["gradient_accumulation_steps"], mapped["cliprange_value"]) == (2, 4, 1e9)
    with pytest.raises(ValueError, match="kl_target"):
        trl_ppo_config(ppo_arm_config({**SPEC, "arm": "align:kl_target=6"}, "/tmp/unused"), steps=1)
    with pytest.raises(ValueError, match="whiten_rewards"):
        trl_ppo_config(ppo_arm_config({**SPEC, "arm": "align:whiten_rewards=true"}, "/tmp/unused"), steps=1)


def test_trl_phase_flops_by_hand():
    """N = 1,100 with an LM head of 100 (D = 1,000), P = 8, R = 2 (P + R = 10), 2 epochs:
        generate  2 * (1,000 * 10 + 100 * 2)            = 20,400
        score     2 * 2 * (1,000 * 10 + 100 * 10)       = 44,000   (policy with values, reference; head on every position)
        update    2 * 4 * (1,000 * 10 + 100 * 10)       = 88,000   (one pass: the value head shares the trunk)
    """
    assert trl_phase_flops(1100, 100, prompt_tokens=8, new_tokens=2, ppo_epochs=2) == {"generate": 20_400, "score": 44_000, "update": 88_000}


def test_bench_args_take_trl_ppo_for_ppo_only():
    assert build_config(BenchArgs, {"stage": "ppo", "compare": ["trl-ppo", "align"]}).compare == ["trl-ppo", "align"]
    with pytest.raises(ConfigError, match="unknown arm 'trl-ppo' for stage dpo"):
        build_config(BenchArgs, {"stage": "dpo", "compare": ["trl-ppo", "align"]})


def _step(loss: float, hashes: list[str]) -> dict:
    phase = {"time_s": 2.0, "peak_mb": 600.0}
    flops = {"generate": 1e9, "score": 2e9, "update": 4e9}
    metrics = {"ppo/policy_loss": loss, "ppo/value_loss": 0.5, "objective/kl": 0.0, "objective/scores": 0.25}
    step = ppo_step_record(1, 7.0, prompt_tokens=300, new_tokens=100, ppo_epochs=1,
                           measured={"generate": phase, "score": phase, "update": {"time_s": 2.5, "peak_mb": 700.0}}, flops=flops, metrics=metrics)
    return {**step, "response_hashes": hashes}


def _run(arm: str, peak_mb: float, step_s: float, loss: float, hashes: list[str]) -> dict:
    """A child's JSON record, as run_child writes it (the fields summarize and format_table read)."""
    return {"stage": "ppo", "arm": arm, "run": 1, "device": "cpu", "dtype": "bf16", "threads": 2, "start_mb": 500.0,
            "data": "ifprefs:sft", "lora_A_init_abs_sum": None, "steps": [_step(loss, hashes)], "phases": {},
            "ppo_config": {"rollout_batch_size": 8, "response_length": 64, "ppo_epochs": 1, "minibatch_size": 4},
            "train_tokens_per_s": 400 / 2.5 * (7.0 / step_s), "end_to_end_tokens_per_s": 400 / step_s, "peak_mb": peak_mb,
            "train_peak_mb": peak_mb, "step_time_s_median": step_s, "train_flops_per_s": 1e9, "end_to_end_flops_per_s": 1e9,
            "losses": [loss], "tokens_total": 400}


def test_ppo_step_record_holds_the_first_update_losses():
    """TRL's stats mapped to align's metric names land in the same fields as the align arm's."""
    step = _step(-0.03, ["a"])
    assert (step["loss"], step["value_loss"], step["kl"], step["score"]) == (-0.03, 0.5, 0.0, 0.25)
    assert (step["tokens"], step["peak_mb"], step["train_time_s"], step["tokens_per_s"]) == (400, 700.0, 2.5, 160.0)


def test_table_compares_trl_ppo_and_align_from_their_json():
    """Two children's JSON (through a file, as _run_arm reads it): ratios to the first arm (trl-ppo), each arm's
    phases, its first update's losses, and how many first-update responses were the same (2 of 3 here)."""
    runs = [_run("trl-ppo", 2000.0, 14.0, -0.0274, response_hashes([[1, 2], [3], [4, 5]])),
            _run("align", 800.0, 7.0, 0.0, response_hashes([[1, 2], [3], [4, 6]]))]
    runs = json.loads(json.dumps(runs))
    report = {"setup": {"stage": "ppo", "model_name_or_path": "m", "data": "ifprefs:sft", "steps": 1, "batch_size": 4, "max_length": 256,
                        "device": "cpu", "dtype": "bf16", "threads": 2, "peak_flops": 1e11, "compare": ["trl-ppo", "align"], "warmup_steps": 0},
              "runs": runs, "summary": summarize(runs, ["trl-ppo", "align"])}
    ratios = report["summary"]["ratios"]["align"]
    assert ratios["vs"] == "trl-ppo" and ratios["peak_mb"] == 0.4 and ratios["end_to_end_tokens_per_s"] == 2.0
    table = format_table(report)
    assert "ppo trl-ppo run 1, per update: generate 2.0 s" in table
    assert "ppo trl-ppo run 1, first update: score 0.2500 | kl 0.0000 | policy loss -0.0274 | value loss 0.5000 (token-weighted)" in table
    assert "ppo first update: 2 of 3 responses the same token for token in both arms" in table
    assert "align / trl-ppo: train tok/s 2.00x, end-to-end tok/s 2.00x, peak memory 0.40x" in table


def test_token_weighted_losses_are_aligns_aggregate():
    """Minibatches of 30 and 10 tokens: policy (30 * 1 + 10 * -1) / 40 = 0.5, value (30 * 2 + 10 * 6) / 40 = 3.0;
    TRL's own aggregate would be the plain means 0.0 and 4.0."""
    from bench.trl_ppo.arm import token_weighted

    assert token_weighted([(30.0, 1.0, 2.0), (10.0, -1.0, 6.0)]) == (0.5, 3.0)


def _fake_pip(calls: list, code: int = 0, stderr: str = ""):
    def run(cmd, **kwargs):
        calls.append(cmd)
        if code == 0 and cmd[1:3] == ["-m", "venv"]:
            python = Path(cmd[-1]) / "bin" / "python"
            python.parent.mkdir(parents=True)
            python.write_text("")
        return SimpleNamespace(returncode=code, stdout="", stderr=stderr)
    return run


def test_venv_is_built_once_then_reused(tmp_path):
    """First call: create + install (torch held at the running version, every pin), then the marker; second call:
    nothing run. Other pins in the marker, or no marker (a build that stopped half way): built again."""
    calls = []
    python = venv.ensure_venv(tmp_path, torch_version="2.13.0", run=_fake_pip(calls), log=lambda m: None)
    assert python == tmp_path / "trl-ppo-venv" / "bin" / "python" and len(calls) == 2
    assert calls[0][-3:] == ["venv", "--system-site-packages", str(tmp_path / "trl-ppo-venv")]
    assert "torch==2.13.0" in calls[1] and "trl==0.11.4" in calls[1] and "transformers==4.46.3" in calls[1]
    marker = json.loads((tmp_path / "trl-ppo-venv" / venv.MARKER).read_text())
    assert marker["pins"] == venv.PINS and marker["torch"] == "2.13.0" and marker["build_s"] >= 0
    venv.ensure_venv(tmp_path, torch_version="2.13.0", run=_fake_pip(calls), log=lambda m: None)
    assert len(calls) == 2
    assert not venv.is_built(tmp_path, "2.14.0")  # another torch: rebuilt
    (tmp_path / "trl-ppo-venv" / venv.MARKER).write_text(json.dumps({"pins": {**venv.PINS, "trl": "0.12.0"}, "torch": "2.13.0"}))
    venv.ensure_venv(tmp_path, torch_version="2.13.0", run=_fake_pip(calls), log=lambda m: None)
    assert len(calls) == 4
    (tmp_path / "trl-ppo-venv" / venv.MARKER).unlink()
    assert not venv.is_built(tmp_path, "2.13.0")


def test_venv_that_cannot_be_built_is_one_line(tmp_path):
    """pip's last line (not its 'Location ... is ignored' noise) in one message naming the folder."""
    stderr = "WARNING: Location 'file:///x' is ignored\nERROR: Could not find a version that satisfies the requirement trl==0.11.4\n"
    calls = []
    with pytest.raises(venv.VenvError) as err:
        venv.ensure_venv(tmp_path, torch_version="2.13.0", run=_fake_pip(calls, code=1, stderr=stderr), log=lambda m: None)
    message = str(err.value)
    assert "\n" not in message and len(calls) == 1
    assert message.startswith(f"trl-ppo: could not create the venv in {tmp_path / 'trl-ppo-venv'} (exit 1): ERROR: Could not find a version")
    assert not venv.is_built(tmp_path, "2.13.0")


def test_bench_stops_before_any_run_when_the_venv_cannot_be_built(tmp_path, monkeypatch, capsys):
    """`python bench/run.py --stage ppo --compare trl-ppo,align` without a registry: exit 2, one error line, no run."""
    from bench.harness import stage as bench

    monkeypatch.setattr(venv.subprocess, "run", lambda cmd, **kw: SimpleNamespace(returncode=1, stdout="", stderr="ERROR: no registry\n"))
    monkeypatch.setattr(bench, "run_arm", lambda *a: pytest.fail("an arm ran"))
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--stage", "ppo", "--compare", "trl-ppo,align", "--steps", "2", "--output_dir", str(tmp_path)])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "trl-ppo: could not create the venv" in errors[0] and "ERROR: no registry" in errors[0]


def test_child_command_is_the_venv_python(tmp_path, monkeypatch):
    """run_arm starts the trl-ppo child (with overrides too) with the venv's python, the align arms with this one."""
    from bench.harness import process, stage

    seen = []
    monkeypatch.setattr(process.subprocess, "run", lambda cmd, **kw: seen.append(cmd[0]) or subprocess.CompletedProcess(cmd, 1))
    for arm in ("trl-ppo", "trl-ppo:response_length=32", "align"):
        stage.run_arm({"arm": arm, "run": 1, "output_dir": str(tmp_path)}, tmp_path / "arm.log", timeout_s=5)
    assert seen == [str(tmp_path / "trl-ppo-venv" / "bin" / "python")] * 2 + [stage.sys.executable]
