"""QLoRA through every training recipe: a 4-bit NF4 base with LoRA, the recipes' default on a GPU.

bitsandbytes quantizes on the CPU too, so the path a GPU user takes by default is exercised here, on the tiny
model, as a real recipe process. Found on an H200 (the device tool): the reward recipe with a 4-bit base and
float32 compute failed in its first step, because TRL casts every trainable parameter of a quantized model to
bf16 (the QLoRA paper's advice for adapters), the score head too, which then met float32 hidden states.
"""

from __future__ import annotations

import json
import math

import pytest

from recipe_harness import recipe_args, run_recipe, tiny_data  # noqa: F401  (tiny_data is a fixture)


@pytest.mark.parametrize("recipe", ["sft", "reward", "dpo"])
def test_recipe_trains_on_a_4bit_base(recipe, tiny_quant_model_dir, tiny_data, tmp_path):
    out = tmp_path / recipe
    code, log = run_recipe(recipe, recipe_args(recipe, tiny_quant_model_dir, tiny_data, out, quantization="4bit", max_steps=2,
                                               save_steps=10), tmp_path / "run.log")
    assert code == 0, log[-4000:]
    assert "quantization: 4bit" in (out / "config.yaml").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    losses = [r["train/loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
