"""bench/peft_methods.py end to end on the tiny model: three PEFT methods (weights and virtual tokens) trained the same
number of steps, each evaluated against the starting model (verifier and perplexity), the JSON and the table; a second
call reuses all."""

import json
from pathlib import Path

from recipe_harness import recipe_args, run_cli, tiny_data  # noqa: F401  (tiny_data is a fixture)


def test_three_methods_side_by_side_on_the_tiny_model(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "peft"
    drop = {"--output_dir", "--max_steps", "--save_steps", "--save_total_limit", "--learning_rate"}
    flags = recipe_args("sft", tiny_model_dir, tiny_data, "unused")
    flags = [f for i, f in enumerate(flags) if f not in drop and flags[i - 1] not in drop]
    cmd = ["bench/peft_methods.py", "--methods", "lora,ia3,prompt_tuning", "--steps", "2", "--eval_prompts", "2", "--ppl_rows", "2",
           "--learning_rates", "ia3=5e-3", "--out", str(out), "--", *flags]
    result = run_cli(cmd, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    table = json.loads((out / "peft_methods.json").read_text())
    lora, ia3, prompt = table["methods"]
    assert (lora["method"], lora["learning_rate"], ia3["method"], ia3["learning_rate"]) == ("lora", 1e-3, "ia3", 5e-3)
    assert 0 < ia3["trainable_params"] < lora["trainable_params"] < lora["total_params"]
    hidden = json.loads((Path(tiny_model_dir) / "config.json").read_text())["hidden_size"]
    assert prompt["trainable_params"] == 16 * hidden  # 16 virtual tokens (peft refuses to load one trainable)
    for m in (lora, ia3, prompt):
        assert m["steps"] == 2 and m["tokens"] > 0 and m["peak_memory_mb"] > 0 and m["train_tokens_per_s"] > 0
        assert m["perplexity"] > 1
        d = m["vs_start"]["coherent_strict"]
        assert d["n"] == 2 and d["lo"] <= d["mean"] <= d["hi"]
        assert f"peft: {m['method']}" in (out / m["method"] / "run" / "config.yaml").read_text()
    assert table["start"]["perplexity"] > 1
    assert "| ia3 | 0.005 |" in (out / "peft_methods.md").read_text()

    again = run_cli(cmd, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "$ " not in again.stdout  # nothing trained or evaluated again
    assert json.loads((out / "peft_methods.json").read_text())["methods"] == table["methods"]


def test_an_unknown_method_is_one_clear_error(tmp_path):
    result = run_cli(["bench/peft_methods.py", "--methods", "lora,qlora", "--out", str(tmp_path / "p")])
    assert result.returncode != 0
    assert "--methods: expected some of lora, dora" in result.stderr and "qlora" in result.stderr
