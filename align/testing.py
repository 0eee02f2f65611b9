"""Tiny real models for tests: a random Llama built from a config and a byte-level tokenizer built
locally (no Hub), with the same ChatML chat template as the embedded default model."""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tiny_tokenizer():
    """A byte-level tokenizer: 256 byte tokens plus ChatML specials; encodes any text, decodes it back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for ch, i in sorted(byte_vocab.items(), key=lambda kv: kv[1])})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    tok_ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    values = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, **tok_ids,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def make_tiny_model(directory: str | Path, task: str = "causal_lm", seed: int = 0, **config_overrides) -> str:
    """Write a tiny random Llama (hidden 32, 2 layers, vocab 259) and its tokenizer to `directory`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    directory = Path(directory)
    if (directory / "config.json").is_file():
        return str(directory)
    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(len(tokenizer), **config_overrides)
    if task == "reward":
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return str(directory)
