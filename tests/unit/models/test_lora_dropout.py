"""align.models.lora_dropout: PEFT's LoRA dropout inside lora_A, saving no copy of the input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from saved_tensors import saved_bytes

from align.models.lora_dropout import DroppedLoraA, _DroppedLinear, dropout_scale, fuse_lora_dropout


def test_the_mask_keeps_one_minus_p_scaled_and_is_the_same_for_the_same_seed():
    x = torch.ones(64, 256)
    scale = dropout_scale(x, 0.25, seed=7)
    assert scale.unique().tolist() == [0.0, pytest.approx(1 / 0.75)]
    assert (scale > 0).float().mean().item() == pytest.approx(0.75, abs=0.01)
    assert torch.equal(scale, dropout_scale(x, 0.25, seed=7))
    assert not torch.equal(scale, dropout_scale(x, 0.25, seed=8))


def test_gradients_are_those_of_the_dropped_out_matmul():
    """gradcheck in float64, and the same gradients as autograd through an explicit mask."""
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _DroppedLinear.apply(a, b, 0.3, 11), (x, w))

    h = _DroppedLinear.apply(x, w, 0.3, 11)
    grad_x, grad_w = torch.autograd.grad(h.square().sum(), (x, w))
    reference = (x * dropout_scale(x, 0.3, 11)) @ w.T
    ref_x, ref_w = torch.autograd.grad(reference.square().sum(), (x, w))
    assert torch.allclose(h, reference) and torch.allclose(grad_x, ref_x) and torch.allclose(grad_w, ref_w)


def _tiny_peft(dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=100)
    config = LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False)
    return get_peft_model(LlamaForCausalLM(cfg), config)


def test_fusing_keeps_parameters_and_eval_outputs_and_still_drops_out_in_training():
    model = _tiny_peft(0.2)
    keys = list(model.state_dict())
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    before = model.eval()(input_ids=ids).logits
    assert fuse_lora_dropout(model) == 2 * 7  # every adapted linear of both layers
    assert list(model.state_dict()) == keys
    assert torch.equal(model(input_ids=ids).logits, before)
    lora_a = [m for m in model.modules() if isinstance(m, DroppedLoraA)]
    assert len(lora_a) == 14 and all(m.dropout.p == 0.2 for m in lora_a)
    assert all(isinstance(d, nn.Identity) for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values())
    model.train()
    torch.manual_seed(1)
    first = model(input_ids=ids).logits
    torch.manual_seed(1)
    again = model(input_ids=ids).logits
    torch.manual_seed(2)
    other = model(input_ids=ids).logits
    assert torch.equal(first, again) and not torch.allclose(first, other) and not torch.allclose(first, before)
    assert fuse_lora_dropout(model) == 0  # once only


def test_what_turns_dropout_off_turns_the_fused_dropout_off():
    """TRL's DPO, reward and GRPO trainers call disable_dropout_in_model (every nn.Dropout's p = 0): the fused
    dropout reads its nn.Dropout's p at each call, so a training forward is then the eval forward."""
    from trl.trainer.utils import disable_dropout_in_model

    model = _tiny_peft(0.2)
    fuse_lora_dropout(model)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    evaluated = model.eval()(input_ids=ids).logits
    assert not torch.allclose(model.train()(input_ids=ids).logits, evaluated)
    disable_dropout_in_model(model)
    assert torch.equal(model.train()(input_ids=ids).logits, evaluated)


def _step(model, ids, autocast: bool):
    """Loss and LoRA gradients of one training forward and backward (bf16 autocast as TRL's bf16=True)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model.train()(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("autocast", [False, True])
def test_a_training_step_matches_peft_dropout_given_the_same_masks(monkeypatch, autocast):
    """With nn.Dropout made to draw the fused module's masks, PEFT's dropout and the fused one give the same loss
    and LoRA gradients: exactly in float32; under bf16 autocast both are as far from the float32 step."""
    import align.models.lora_dropout as fused_module

    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    draws = []  # (seed, mask) in call order: 14 forward draws, then the same 14 again in backward

    def recording_scale(x, p, seed):
        scale = dropout_scale(x, p, seed)
        draws.append((seed, scale))
        return scale

    seeds = iter(range(1000))
    monkeypatch.setattr(fused_module, "draw_seed", lambda: next(seeds))
    monkeypatch.setattr(fused_module, "dropout_scale", recording_scale)
    fused = _tiny_peft(0.2)
    fuse_lora_dropout(fused)
    fused_loss, fused_grads = _step(fused, ids, autocast)
    forward, backward = dict(draws[:14]), dict(draws[14:])
    assert len(draws) == 28 and forward.keys() == backward.keys()
    assert all(torch.equal(forward[seed], backward[seed]) for seed in forward)

    def plain_step(autocast):
        plain = _tiny_peft(0.2)
        replay = iter(forward.values())
        for module in plain.modules():
            if isinstance(module, nn.Dropout):
                module.forward = lambda x: x * next(replay).to(x.dtype)
        return _step(plain, ids, autocast)

    loss, grads = plain_step(autocast)
    assert grads.keys() == fused_grads.keys() and len(grads) == 28
    if not autocast:
        assert fused_loss == pytest.approx(loss, abs=1e-6)
        for name in grads:
            assert torch.allclose(grads[name], fused_grads[name], rtol=0.0, atol=1e-6), name
        return
    exact_loss, exact = plain_step(False)  # PEFT in float32 with the same masks: what bf16 rounding departs from
    assert abs(fused_loss - exact_loss) <= 2 * abs(loss - exact_loss) + 1e-3
    for name in grads:
        error = {k: ((g[name] - exact[name]).norm() / exact[name].norm()).item() for k, g in (("peft", grads), ("fused", fused_grads))}
        assert error["fused"] <= 1.5 * error["peft"] + 5e-3, (name, error)


def test_gradient_checkpointing_recomputes_the_same_masks():
    """Checkpointing restores the RNG state before recomputing a layer: the recomputed forward draws the seeds
    the first forward drew, so the gradients equal those of a run without checkpointing."""
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = _tiny_peft(0.3)
        fuse_lora_dropout(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        torch.manual_seed(5)
        model.train()(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_lora_modules_share_their_input_under_autocast(tiny_model_dir, one_thread, dropout):
    """bf16 model, fp32 adapters, under autocast as a Trainer with bf16=True trains: with share_lora_inputs (as
    load_model gives every LoRA model) the loss is to the bit the loss with PEFT's casts, the gradients agree to bf16
    rounding, and autograd keeps four hidden-size tensors a layer and position less. Without autocast PEFT casts."""
    from peft.tuners.lora import LoraLayer

    from align.models.loading import ModelArgs, load_model

    def loaded(shared: bool):
        torch.manual_seed(0)  # the same adapter initialisation in both
        model, _ = load_model(ModelArgs(model_name_or_path=tiny_model_dir, dtype="bf16", quantization="none",
                                        lora_dropout=dropout))
        if not shared:  # PEFT's casts as they were: the hook share_lora_inputs adds, removed
            [m._forward_pre_hooks.clear() for m in model.modules() if isinstance(m, LoraLayer)]
        return model.train()

    ids = torch.randint(3, 250, (2, 13), generator=torch.Generator().manual_seed(0))

    def run(model):
        torch.manual_seed(0)  # the same dropout masks in both runs
        with torch.autocast("cpu", dtype=torch.bfloat16), saved_bytes(model) as saved:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}, saved.total

    shared = loaded(True)
    cast_loss, cast_grads, cast_saved = run(loaded(False))
    shared_loss, shared_grads, shared_saved = run(shared)
    config = shared.get_base_model().config
    assert torch.equal(shared_loss, cast_loss)
    assert shared_grads.keys() == cast_grads.keys()
    for name, grad in cast_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=2e-2, atol=1e-5)
    assert cast_saved - shared_saved == config.num_hidden_layers * ids.numel() * 4 * config.hidden_size * 2
    layers = [m for m in shared.modules() if isinstance(m, LoraLayer)]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)  # skipped under autocast
    with torch.no_grad():
        shared(input_ids=ids)  # without autocast: fp32 adapters on a bf16 input need PEFT's cast, and get it
    assert all(m.cast_input_dtype_enabled for m in layers)
