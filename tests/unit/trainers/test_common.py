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



# ------------------------------------------------------------------------------------------ LoRA+


def _loraplus_trainer(tiny_model_dir, tmp_path, ratio, use_dora=False):
    """A real transformers Trainer over the tiny model with a LoRA (or DoRA) adapter, LoraPlusMixin mixed in."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from align.trainers.common import LoraPlusMixin

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora))

    class T(LoraPlusMixin, Trainer):
        loraplus_lr_ratio = ratio

    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.01, lr_scheduler_type="linear",
                             warmup_steps=2, report_to=[], use_cpu=True)
    return T(model=model, args=args), model


@pytest.mark.parametrize("use_dora", [False, True])
def test_loraplus_gives_b_matrices_ratio_times_the_learning_rate_through_the_schedule(tiny_model_dir, tmp_path, use_dora):
    trainer, model = _loraplus_trainer(tiny_model_dir, tmp_path, 16.0, use_dora)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    optimizer = trainer.optimizer
    assert trainer.create_optimizer() is optimizer  # asked again (HF does): not split, nor sped up, twice
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(id(p) for g in optimizer.param_groups for p in g["params"]) == sorted(id(p) for p in trainable.values())  # each trainable once
    b = [n for n in trainable if "lora_B" in n or (use_dora and "magnitude" in n)]
    a = [n for n in trainable if n not in b]
    assert b and a and all("lora_A" in n for n in a)
    for step in range(4):  # warmup then decay: B stays at 16x A at every step
        lr_now = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        lrs_a, lrs_b = {lr_now[id(trainable[n])] for n in a}, {lr_now[id(trainable[n])] for n in b}
        assert len(lrs_a) == 1 and len(lrs_b) == 1
        assert lrs_b.pop() == pytest.approx(16.0 * lrs_a.pop())
        optimizer.step()
        trainer.lr_scheduler.step()
    assert lr_now[id(trainable[a[0]])] > 0  # past the warmup's 0
    # the weight decay of HF's groups is kept: LoRA weights decay (1e-2), nothing is left at the default
    assert {g["weight_decay"] for g in optimizer.param_groups} <= {0.01, 0.0}


def test_loraplus_off_leaves_the_trainers_optimizer_alone(tiny_model_dir, tmp_path):
    trainer, _ = _loraplus_trainer(tiny_model_dir, tmp_path, None)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    assert {g["lr"] for g in trainer.optimizer.param_groups} <= {0.0, 1e-3}  # HF's groups, warmup's 0 at step 0


def test_loraplus_settings_are_checked_at_start():
    from align.trainers.common import check_loraplus

    check_loraplus(SimpleNamespace(loraplus_lr_ratio=None, peft="prompt_tuning", use_lora=True))  # off: nothing to check
    check_loraplus(SimpleNamespace(loraplus_lr_ratio=16.0, peft="dora", use_lora=True))
    with pytest.raises(ConfigError, match=r"^config: loraplus_lr_ratio: expected a ratio > 0 .* got 0.0$"):
        check_loraplus(SimpleNamespace(loraplus_lr_ratio=0.0, peft="lora", use_lora=True))
    with pytest.raises(ConfigError, match=r"LoRA or DoRA adapter .* but peft is prompt_tuning$"):
        check_loraplus(SimpleNamespace(loraplus_lr_ratio=16.0, peft="prompt_tuning", use_lora=True))
    with pytest.raises(ConfigError, match=r"but peft is none \(use_lora false\)$"):
        check_loraplus(SimpleNamespace(loraplus_lr_ratio=16.0, peft="lora", use_lora=False))
