"""Training plumbing: checkpoint trust, metric names, OOM advice, assistant-only chat templates."""

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from align.errors import ConfigError
from align.models.chat import has_generation_markers, training_chat_template
from align.trainers.common import MARKER, MetricsFile, last_complete_checkpoint, out_of_memory_advice

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello!"},
    {"role": "user", "content": "more"},
    {"role": "assistant", "content": "sure"},
]


def test_last_complete_checkpoint_trusts_only_marked(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-2" / MARKER).write_text("{}")
    (tmp_path / "checkpoint-4" / MARKER).write_text("{}")
    # checkpoint-6 was being written when the process was killed: no marker
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert not (tmp_path / "checkpoint-6").exists()
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_metrics_file_namespaces_keys(tmp_path):
    cb = MetricsFile(str(tmp_path))
    state = SimpleNamespace(is_world_process_zero=True, global_step=3, num_input_tokens_seen=100)
    cb.on_log(None, state, None, logs={"loss": 0.5, "rewards/margins": 0.1, "note": "text"})
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["train/loss"] == 0.5 and record["rewards/margins"] == 0.1 and record["step"] == 3
    assert "note" not in record and "train/note" not in record


def test_oom_advice_names_settings_that_fit():
    @dataclass
    class C:
        per_device_train_batch_size: int = 8
        gradient_accumulation_steps: int = 2
        quantization: str = "none"
        gradient_checkpointing: bool = False
        max_length: int = 2048

    text = out_of_memory_advice(C())
    assert "--per_device_train_batch_size 4 --gradient_accumulation_steps 4" in text
    assert "--quantization 4bit" in text and "--gradient_checkpointing true" in text and "--max_length 1024" in text


@pytest.mark.parametrize("template", [SMOLLM2_TEMPLATE, None], ids=["smollm2", "tiny"])
def test_training_template_renders_the_same_and_masks_every_reply(template):
    from align.testing import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    if template:
        tok.chat_template = template
    marked = training_chat_template(tok)
    assert has_generation_markers(marked)
    assert tok.apply_chat_template(CHAT, tokenize=False) == tok.apply_chat_template(CHAT, tokenize=False, chat_template=marked)
    out = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, chat_template=marked)
    trained = tok.decode([i for i, keep in zip(out["input_ids"], out["assistant_masks"]) if keep])
    assert trained == "hello!<|im_end|>sure<|im_end|>"  # both replies and their end-of-turn, nothing else


def test_template_without_known_markup_is_a_config_error():
    from align.testing import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ConfigError, match="generation"):
        training_chat_template(tok)

