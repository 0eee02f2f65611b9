"""align.models.generation.generate_ids: every adapter generates what its training forward computes."""

import contextlib
import functools

import pytest
import torch
from transformers import LogitsProcessorList

from align.models.generation import generate_ids, virtual_token_method
from align.models.loading import ModelArgs, load_model


def _step_logits_and_forward(model, tokenizer, generate):
    """(logits of each generated step as generation saw them, the same positions' logits from one forward of the
    whole sequence without a cache: the path training takes, virtual tokens prepended by peft)."""
    prompt = tokenizer(["hello there world, and more"], return_tensors="pt")
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda mod, args, out: seen.append(out[:, -1].clone()))
    with torch.no_grad():
        ids = generate(model, prompt["input_ids"], prompt["attention_mask"], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    hook.remove()
    n_prompt, n_new = prompt["input_ids"].shape[1], ids.shape[1] - prompt["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -ids.shape[1] :]  # drop virtual positions
    return ids, torch.stack(seen, 1), logits[:, n_prompt - 1 : n_prompt - 1 + n_new]


def _trained_looking(model_dir, method, dtype="fp32"):
    """The tiny model with a `method` adapter whose parameters are random (LoRA's zero B or a fresh prompt would
    change too little to tell paths apart), in eval mode."""
    model, tokenizer = load_model(ModelArgs(model_name_or_path=model_dir, dtype=dtype, peft=method))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return model.eval(), tokenizer


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning", "lora", "ia3"])
def test_each_adapter_generates_what_its_training_forward_computes(tiny_model_dir, one_thread, method):
    """peft 0.21 with transformers 5 re-feeds a prompt-tuning or p-tuning prompt's embeddings at every decode step
    (the cache grows by the prompt per token); generate_ids prepends the virtual tokens itself. Every step's logits
    equal the no-cache forward's at that position, and the prompt comes back in front of the reply."""
    model, tokenizer = _trained_looking(tiny_model_dir, method)
    assert virtual_token_method(model) == (method if method in ("prompt_tuning", "p_tuning", "prefix_tuning") else None)
    ids, steps, forward = _step_logits_and_forward(model, tokenizer, generate_ids)
    assert steps.shape == forward.shape and steps.shape[1] == 5
    torch.testing.assert_close(steps, forward, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_peft_generate_is_what_generate_ids_works_around(tiny_model_dir, one_thread, method):
    """The bugs themselves, so that the workaround goes when a peft release fixes them: peft's own generate computes
    logits that the adapter's training forward does not (prompt tuning: from the second step; prefix tuning: from
    the first, where it answers as the base model)."""
    model, tokenizer = _trained_looking(tiny_model_dir, method)
    _, steps, forward = _step_logits_and_forward(
        model, tokenizer, lambda m, ids, mask, **kw: m.generate(input_ids=ids, attention_mask=mask, **kw))
    assert not torch.allclose(steps[:, 1:], forward[:, 1:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_virtual_tokens_generate_a_left_padded_batch_and_beams(tiny_model_dir, one_thread, method):
    """A left-padded batch gives each row the reply it gets alone; beam search returns one sequence per prompt,
    the prompt in front."""
    model, tokenizer = _trained_looking(tiny_model_dir, method)
    tokenizer.padding_side = "left"
    texts = ["hello there world, and more", "a b"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        together = generate_ids(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=4, do_sample=False)
        for row, text in enumerate(texts):
            alone = tokenizer([text], return_tensors="pt")
            ids = generate_ids(model, alone["input_ids"], alone["attention_mask"], max_new_tokens=4, do_sample=False)
            assert torch.equal(together[row, -4:], ids[0, -4:])
        beams = generate_ids(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=4, do_sample=False, num_beams=2)
    assert beams.shape == (2, batch["input_ids"].shape[1] + 4) and torch.equal(beams[:, : batch["input_ids"].shape[1]], batch["input_ids"])


def test_a_disabled_prompt_adapter_generates_as_the_base_model(tiny_model_dir, one_thread):
    model, tokenizer = load_model(ModelArgs(model_name_or_path=tiny_model_dir, dtype="fp32", peft="prompt_tuning"))
    model.eval()
    prompt = tokenizer(["hello there"], return_tensors="pt")
    with torch.no_grad(), model.disable_adapter():
        assert virtual_token_method(model) is None
        ids = generate_ids(model, prompt["input_ids"], prompt["attention_mask"], max_new_tokens=4, do_sample=False)
        base = model.get_base_model().generate(**prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(ids, base)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_logits_processors_see_the_prompt_as_without_an_adapter(tiny_model_dir, one_thread, method):
    """A repetition penalty reads the ids generate holds; with the virtual tokens in front they are still the
    prompt's (plus placeholders it already has): a prohibitive penalty keeps every prompt token out of the reply."""
    model, tokenizer = _trained_looking(tiny_model_dir, method)
    prompt = tokenizer(["hello there world, and more"], return_tensors="pt")
    with torch.no_grad():
        ids = generate_ids(model, prompt["input_ids"], prompt["attention_mask"], max_new_tokens=6, min_new_tokens=6,
                           do_sample=False, repetition_penalty=1e6)
    reply = ids[0, prompt["input_ids"].shape[1] :].tolist()
    assert not set(reply) & set(prompt["input_ids"][0].tolist()), reply


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merged_adapter_computes_the_same_and_restores_every_weight_bit_for_bit(tiny_model_dir, one_thread, method):
    from align.models.generation import merged_adapter

    model, _ = _trained_looking(tiny_model_dir, method)
    ids = torch.randint(0, 100, (2, 12))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        with merged_adapter(model) as merged:
            assert merged is model
            changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
            assert changed and all("base_layer" in n for n in changed)  # the update went into the base weights
            inside = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    torch.testing.assert_close(inside, unmerged, rtol=1e-4, atol=1e-4)  # float32 rounding of W + scale B A
    assert not torch.equal(inside, unmerged) or method == "ia3"  # the merged path really ran (IA3 may round alike)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert torch.equal(after, unmerged)
    assert not any(getattr(m, "merged", False) for m in model.modules())


@pytest.mark.parametrize("b_std, relative, below", [(8e-5, (0.003, 0.012), 0.15), (2e-3, (0.1, 0.2), 0.0)],
                         ids=["trained-size", "large"])
def test_bf16_merge_is_as_close_to_the_float32_adapter_as_bf16_unmerged(tiny_model_dir, one_thread, b_std, relative, below):
    """Merged into bf16 weights, the adapter's logits are no further from the float32 adapter's than the unmerged bf16
    model's are (within 2x, mean and max), and the weights come back bit for bit. trained-size: |scale B A| / |W|
    about 0.6% with a fifth of its entries below half of bf16's rounding step of their weight, as in the main job's
    trained adapter (median 0.57% and 22% over its 210 layers); there the update moves the logits less than bf16
    rounding does, so the large case (15%, the update's effect 4x+ the bf16 error) is the one a wrong merge would fail."""
    from align.models.generation import adapter_merges_faithfully, merged_adapter

    fp32, _ = load_model(ModelArgs(model_name_or_path=tiny_model_dir, dtype="fp32", peft="lora"))
    bf16, _ = load_model(ModelArgs(model_name_or_path=tiny_model_dir, dtype="bf16", peft="lora"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in fp32.named_parameters():
            if "lora_A" in name:
                p.normal_(0, p.shape[1] ** -0.5)
            elif "lora_B" in name:
                p.normal_(0, b_std)
        adapter = {n: p for n, p in fp32.named_parameters() if p.requires_grad}
        for n, p in bf16.named_parameters():
            if p.requires_grad:
                p.copy_(adapter[n])
        fp32.eval(), bf16.eval()
        layer = next(m for m in fp32.modules() if hasattr(m, "get_delta_weight"))
        delta, weight = layer.get_delta_weight("default"), layer.get_base_layer().weight
        assert relative[0] < float(delta.norm() / weight.norm()) < relative[1]
        half_step = weight.to(torch.bfloat16).float().abs() * 2.0**-9
        assert float((delta.abs() < half_step).float().mean()) >= below
        assert adapter_merges_faithfully(bf16)
        ids = torch.randint(0, 250, (4, 24))
        before = {n: p.detach().clone() for n, p in bf16.named_parameters()}
        reference = fp32(input_ids=ids).logits
        with fp32.disable_adapter():
            update = (fp32(input_ids=ids).logits - reference).abs().mean()
        unmerged = (bf16(input_ids=ids).logits.float() - reference).abs()
        with merged_adapter(bf16):
            assert any(not torch.equal(p, before[n]) for n, p in bf16.named_parameters())  # the merge happened
            merged = (bf16(input_ids=ids).logits.float() - reference).abs()
    assert all(torch.equal(p, before[n]) for n, p in bf16.named_parameters())
    assert merged.mean() < 2 * unmerged.mean() and merged.max() < 2 * unmerged.max(), (merged.mean(), unmerged.mean())
    if below == 0.0:
        assert update > 4 * unmerged.mean()


def test_merged_adapter_leaves_alone_what_it_cannot_merge(tiny_model_dir, one_thread):
    """fp16 weights (not measured), a disabled adapter, virtual tokens: used as they are; an error inside the block
    still restores the weights."""
    from align.models.generation import adapter_merges_faithfully, merged_adapter

    fp16, _ = load_model(ModelArgs(model_name_or_path=tiny_model_dir, dtype="fp16", peft="lora"))
    prompt, _ = load_model(ModelArgs(model_name_or_path=tiny_model_dir, dtype="fp32", peft="prompt_tuning"))
    lora, _ = _trained_looking(tiny_model_dir, "lora")
    assert not adapter_merges_faithfully(fp16) and not adapter_merges_faithfully(prompt)
    with lora.disable_adapter():
        assert not adapter_merges_faithfully(lora)
    assert adapter_merges_faithfully(lora)
    for model in (fp16, prompt):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with merged_adapter(model):
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    with pytest.raises(RuntimeError, match="inside"):
        with merged_adapter(lora):
            raise RuntimeError("inside")
    assert all(torch.equal(p, before[n]) for n, p in lora.named_parameters())
    assert adapter_merges_faithfully(lora)  # unmerged again: it can merge next time


@pytest.mark.parametrize("preallocate", [True, False])
@pytest.mark.parametrize("sampled", [False, True])
def test_decode_ids_is_generate_with_ended_rows_dropped(tiny_model_dir, one_thread, sampled, preallocate):
    """decode_ids stops computing a row at its EOS and returns what model.generate returns: the same ids, EOS kept,
    pad after it, the width of the longest reply; greedy (argmax), and sampled with PPO's per-row GumbelSampler
    (generate with it as a logits processor). The EOS is a token some rows write at step 2 or later and others never,
    so rows leave the batch and its cache mid-way. With the KV cache preallocated (the default) and with
    transformers' DynamicCache."""
    from align.evaluation.logprobs import left_pad
    from align.models.generation import decode_ids
    from align.rl.ppo.rollout import GumbelSampler

    model, tokenizer = _trained_looking(tiny_model_dir, "lora")
    texts = ["hello there world, and more", "a", "the quick brown fox jumps", "one two", "numbers 1 2 3 4 5 6 7", "why"]
    ids, mask = left_pad([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)
    n, seeds = 12, [11, 12, 13, 14, 15, 16]
    sampler = (lambda: GumbelSampler(seeds, temperature=0.8)) if sampled else (lambda: None)

    def reference(eos):
        processors = [sampler()] if sampled else []
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=sampled, num_beams=1,
                                  top_k=0, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                  logits_processor=LogitsProcessorList(processors))

    free = reference(None)[:, ids.shape[1] :]  # no EOS: every row runs to n tokens
    eos = next(int(t) for t in free[:, 2:].flatten().unique()
               if (free == t).any(-1).sum() < len(texts) and (free[:, :2] != t).all())
    expected = reference(eos)
    pick = sampler().pick if sampled else None
    got = decode_ids(model, ids, mask, n, eos, tokenizer.pad_token_id, pick=pick, preallocate=preallocate)
    assert torch.equal(got, expected)
    ended = (got[:, ids.shape[1] :] == eos).any(-1)
    assert ended.any() and not ended.all()  # rows were dropped and others went on
    for row in torch.nonzero(ended).flatten().tolist():  # only pad after an EOS
        reply = got[row, ids.shape[1] :].tolist()
        assert set(reply[reply.index(eos) + 1 :]) <= {tokenizer.pad_token_id}


def test_preallocated_cache_refuses_more_positions_than_its_capacity(tiny_model_dir):
    """decode_ids sizes the cache to prompt + max_new_tokens; a write past that is an error, not a silent overwrite."""
    from align.models.generation import preallocated_cache

    model, tokenizer = _trained_looking(tiny_model_dir, "lora")
    ids = torch.tensor([tokenizer("hello there world")["input_ids"]])
    cache = preallocated_cache(ids.shape[1] + 1)
    with torch.no_grad():
        out = model(input_ids=ids, cache=cache, use_cache=True)
        assert out.cache.get_seq_length() == ids.shape[1]
        out = model(input_ids=ids[:, :1], cache=out.cache, use_cache=True)
        with pytest.raises(ValueError, match="capacity"):
            model(input_ids=ids[:, :1], cache=out.cache, use_cache=True)


needs_bf16_packing = pytest.mark.skipif(
    not __import__("align.models.generation", fromlist=["x"]).packs_bf16_weights(),
    reason="this CPU has no oneDNN bf16 matmul (AVX2-only): packed_linear_weights packs nothing here (tested below)")


@needs_bf16_packing
def _count_plain_linear_calls(monkeypatch) -> list:
    """The ids of the modules torch.nn.Linear.forward runs for from now on (the packed path does not call it)."""
    plain, calls = torch.nn.Linear.forward, []
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: calls.append(id(self)) or plain(self, x))
    return calls


@needs_bf16_packing
def test_packed_weights_compute_the_plain_layers_bits_and_decode_the_same_ids(tiny_model_dir, one_thread, monkeypatch):
    """Inside packed_linear_weights every plain bf16 linear layer (base layers of the unmerged adapter and the LM
    head) runs through its prepacked weight, not torch's linear: the logits of a left-padded batch and
    decode_ids's greedy ids are bit for bit the plain model's, merged and unmerged; on exit no layer keeps a
    replaced forward."""
    from align.evaluation.logprobs import left_pad
    from align.models.generation import decode_ids, merged_adapter, packed_linear_weights

    model, tokenizer = _trained_looking(tiny_model_dir, "lora", dtype="bf16")
    plain_calls = _count_plain_linear_calls(monkeypatch)
    ids, mask = left_pad([tokenizer(t)["input_ids"] for t in ["hello there world, and more", "a", "one two three"]],
                         tokenizer.pad_token_id)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16]
    for merge in (False, True):
        with torch.no_grad(), (merged_adapter(model) if merge else contextlib.nullcontext()):
            plain_logits = model(input_ids=ids, attention_mask=mask).logits
            plain_ids = decode_ids(model, ids, mask, 8, -1, tokenizer.pad_token_id)
            calls = []
            with packed_linear_weights(model) as packed:
                assert packed is model
                plain_calls.clear()
                hook = [m.register_forward_hook(lambda mod, a, out: calls.append(mod)) for m in linears]
                packed_logits = model(input_ids=ids, attention_mask=mask).logits
                packed_ids = decode_ids(model, ids, mask, 8, -1, tokenizer.pad_token_id)
                assert all(isinstance(vars(m)["forward"], functools.partial) for m in linears)
                [h.remove() for h in hook]
                assert not set(plain_calls) & set(map(id, linears))  # none through torch's linear
        assert set(map(id, calls)) == set(map(id, linears))  # every layer ran
        assert torch.equal(packed_logits, plain_logits) and torch.equal(packed_ids, plain_ids)
        assert not any("forward" in vars(m) for m in model.modules())


@needs_bf16_packing
def test_packed_weights_step_aside_for_gradients_autocast_and_a_changed_weight(tiny_model_dir, one_thread, monkeypatch):
    """With gradients on a packed layer runs its plain forward (the gradient reaches the input); a weight changed
    after packing is used as it is now, not as packed; float32 layers and a second, nested packing are left
    alone; an error inside restores every layer."""
    from align.models.generation import packed_linear_weights

    model, _ = _trained_looking(tiny_model_dir, "lora", dtype="bf16")
    layer = next(m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16)
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    with packed_linear_weights(model) as _, packed_linear_weights(model) as __:
        inner = [m for m in model.modules() if "forward" in vars(m)]
        assert inner and all(type(m) is torch.nn.Linear for m in inner)
        plain_calls = _count_plain_linear_calls(monkeypatch)
        x_grad = x.clone().requires_grad_()
        layer(x_grad).float().sum().backward()
        assert x_grad.grad is not None and x_grad.grad.abs().sum() > 0 and plain_calls == [id(layer)]
        with torch.no_grad():
            layer(x)
            assert plain_calls == [id(layer)]  # no grad: the packed path
            with torch.autocast("cpu", dtype=torch.bfloat16):
                layer(x)
            layer.weight.mul_(2)  # the packed copy is now stale
            assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
            layer.weight.div_(2)
            assert plain_calls == [id(layer)] * 3
    assert not any("forward" in vars(m) for m in model.modules())
    fp32, _ = load_model(ModelArgs(model_name_or_path=tiny_model_dir, dtype="fp32", peft="lora"))
    with packed_linear_weights(fp32) as _:
        assert not any("forward" in vars(m) for m in fp32.modules())
    with pytest.raises(RuntimeError, match="inside"):
        with packed_linear_weights(model):
            raise RuntimeError("inside")
    assert not any("forward" in vars(m) for m in model.modules())


def test_packed_weights_pack_nothing_without_onednn_bf16(tiny_model_dir, one_thread, monkeypatch):
    """On a CPU without oneDNN's bf16 matmul (AVX2-only) the context is a no-op: the layers keep their forward."""
    from align.models import generation

    model, _ = _trained_looking(tiny_model_dir, "lora", dtype="bf16")
    monkeypatch.setattr(generation, "packs_bf16_weights", lambda: False)
    with generation.packed_linear_weights(model) as packed:
        assert packed is model and not any("forward" in vars(m) for m in model.modules())


@needs_bf16_packing
def test_packed_weights_pack_nothing_without_the_memory_for_a_copy(tiny_model_dir, one_thread, monkeypatch):
    """Nothing is packed where the packed copy would take more than a quarter of the memory available."""
    import psutil

    from align.models import generation

    model, _ = _trained_looking(tiny_model_dir, "lora", dtype="bf16")
    size = sum(m.weight.nbytes for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16)
    for available, packs in ((4 * size - 1, False), (4 * size, True)):
        monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": available}))
        with generation.packed_linear_weights(model) as packed:
            assert any("forward" in vars(m) for m in model.modules()) == packs, available


def test_own_forward_sets_aside_the_training_wrapper_so_the_summary_after_training_is_computed_as_before(
        tiny_model_dir, prepare_as_trainer, one_thread):
    """A Trainer with bf16=True leaves accelerate's mixed-precision wrapper on the model's forward (autocast, logits
    copied to float32). Inside own_forward the model's own forward runs (no autocast, bf16 logits), and the wrapper is
    back on exit; summarize_policy on the prepared model runs no forward under autocast and gives the summary of the
    model before it was prepared, every number and reply."""
    from align.data.load import load_preferences, load_prompts
    from align.evaluation.policy_report import summarize_policy
    from align.models.generation import own_forward

    model, tokenizer = _trained_looking(tiny_model_dir, "lora", dtype="bf16")
    pairs, prompts = load_preferences("ifprefs:prefs_test", max_rows=3), load_prompts("ifprefs:eval", max_rows=4)
    summary = lambda: {k: v for k, v in summarize_policy(model, tokenizer, pairs, prompts, beta=0.1, adapter=True,  # noqa: E731
                                                          max_new_tokens=6, batch_size=2).items() if k != "time_s"}
    plain = summary()
    with own_forward(model) as own:  # nothing to set aside yet
        assert own is model and "forward" not in vars(model)
    prepare_as_trainer(model)
    wrapper, autocast = vars(model)["forward"], []
    model.get_base_model().register_forward_pre_hook(lambda m, a: autocast.append(torch.is_autocast_enabled("cpu")))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert model(input_ids=ids).logits.dtype == torch.float32 and autocast == [True]  # through the wrapper
        with own_forward(model) as own:
            assert own is model and model(input_ids=ids).logits.dtype == torch.bfloat16 and autocast[-1] is False
        assert vars(model)["forward"] is wrapper
    autocast.clear()
    assert summary() == plain
    assert autocast and not any(autocast) and vars(model)["forward"] is wrapper
