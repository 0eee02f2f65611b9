"""bench/average_adapters.py: the exact average of LoRA checkpoints, loaded by PEFT on a real (tiny) model, merges to
the mean of the checkpoints' merged weights; the factor average is rank r; bad input is refused with the reason."""

import json

import pytest
import torch
from recipe_harness import run_cli


def _checkpoints(model_dir, tmp_path, n=3):
    """n LoRA adapters (r 4) of the tiny model with random A and B, as checkpoints of one run would differ."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = []
    for i in range(n):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                               LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.2)
        model.save_pretrained(tmp_path / f"checkpoint-{i}")
        dirs.append(str(tmp_path / f"checkpoint-{i}"))
    return dirs


def _merged(model_dir, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).merge_and_unload().state_dict()


def test_exact_average_merges_to_the_mean_of_the_merged_checkpoints(tiny_model_dir, tmp_path):
    checkpoints = _checkpoints(tiny_model_dir, tmp_path)
    out = tmp_path / "soup"
    proc = run_cli(["bench/average_adapters.py", str(out), *checkpoints])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rank 12" in proc.stdout and "relative error of the mean delta 0.0000" in proc.stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (12, 24)  # scale alpha / r unchanged
    merged = [_merged(tiny_model_dir, c) for c in checkpoints]
    soup = _merged(tiny_model_dir, str(out))
    changed = 0
    for name, weight in soup.items():
        mean = sum(m[name] for m in merged) / len(merged)
        torch.testing.assert_close(weight, mean, atol=1e-5, rtol=1e-5)
        changed += not torch.equal(merged[0][name], merged[1][name])
    assert changed > 0  # the checkpoints differ, so the test compares something

    factors = tmp_path / "factors"
    proc = run_cli(["bench/average_adapters.py", str(factors), *checkpoints, "--mode", "factors"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((factors / "adapter_config.json").read_text())["r"] == 4
    error = float(proc.stdout.rsplit(" ", 1)[-1])
    assert 0 < error < 2  # an approximation of the mean delta, and said how far off


@pytest.mark.parametrize("case", ["exists", "not_an_adapter"])
def test_bad_input_is_refused_with_the_reason(tiny_model_dir, tmp_path, case):
    checkpoints = _checkpoints(tiny_model_dir, tmp_path, n=2)
    out = tmp_path / "soup"
    if case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("a user's file")
        expected = "exists; choose a new folder"
    else:
        checkpoints.append(str(tmp_path))
        expected = "adapter_config.json: missing"
    proc = run_cli(["bench/average_adapters.py", str(out), *checkpoints])
    assert proc.returncode != 0 and expected in proc.stderr
    if case == "exists":
        assert (out / "keep.txt").read_text() == "a user's file"
