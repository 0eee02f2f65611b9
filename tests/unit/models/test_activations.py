"""align.models.activations: saved activations in bf16, compute in float32.

A tiny Llama with LoRA on every projection, float32. With compression the loss is bit-identical (the
forward does not change), the gradients differ (so the hooks really ran) but only by bf16 rounding of the
saved activations: relative error per tensor below 2e-2 (bf16 keeps 8 bits of mantissa, 4e-3 relative per
element; errors partly cancel over tokens). Weights are never compressed, and a tensor saved by several
operations is compressed once.
"""

import pytest
import torch

from align.models.activations import compressed_saved_activations


@pytest.fixture(scope="module")
def lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from align.testing import tiny_config

    torch.manual_seed(0)
    config = tiny_config(259, hidden_size=64, intermediate_size=128, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(config)
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False))
    return model.train()


def _loss_and_grads(model, ids, compress: bool):
    model.zero_grad(set_to_none=True)
    stats = None
    if compress:
        with compressed_saved_activations(model, min_numel=1) as stats:
            loss = model(input_ids=ids, labels=ids).loss
    else:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()  # outside the context: backward unpacks whatever was saved
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, stats


def test_forward_identical_gradients_within_bf16_rounding(lora_model):
    ids = torch.randint(3, 259, (3, 40), generator=torch.Generator().manual_seed(1))
    loss_ref, grads_ref, _ = _loss_and_grads(lora_model, ids, compress=False)
    loss, grads, stats = _loss_and_grads(lora_model, ids, compress=True)

    assert torch.equal(loss, loss_ref)
    assert stats["compressed"] > 0 and stats["compressed_bytes"] > 0
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    differ = 0
    for name, g in grads.items():
        rel = (g - grads_ref[name]).norm() / grads_ref[name].norm().clamp_min(1e-12)
        assert rel < 2e-2, f"{name}: relative gradient error {rel:.2e}"
        differ += not torch.equal(g, grads_ref[name])
    assert differ > len(grads) // 2  # the compressed activations were really used in backward


def test_weights_never_compressed_and_shared_saves_compressed_once(lora_model):
    weights = {p.untyped_storage().data_ptr() for p in lora_model.parameters()}
    seen = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):  # every compression is a .to(bf16) of the saved tensor
        if args and args[0] is torch.bfloat16:
            seen.append(self.untyped_storage().data_ptr())
        return original(self, *args, **kwargs)

    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(2))
    torch.Tensor.to = spy
    try:
        with compressed_saved_activations(lora_model, min_numel=1) as stats:
            loss = lora_model(input_ids=ids, labels=ids).loss
    finally:
        torch.Tensor.to = original
    loss.backward()
    assert seen and not weights.intersection(seen)
    assert len(seen) == stats["compressed"]
    assert stats["kept"] > 0  # the weights (and integer tensors) went through unchanged
    # the normed hidden state is the input of q, k and v's LoRA A (and the MLP's gate and up): saved once each
    assert stats["shared"] >= 2 * lora_model.config.num_hidden_layers


def test_min_numel_keeps_small_tensors(lora_model):
    ids = torch.randint(3, 259, (1, 8), generator=torch.Generator().manual_seed(3))
    with compressed_saved_activations(lora_model, min_numel=10**9) as stats:
        lora_model(input_ids=ids, labels=ids).loss.backward()
    assert stats["compressed"] == 0 and stats["kept"] > 0


class _SavesStrided(torch.autograd.Function):
    """y = x * mask; backward checks that the mask comes back with the strides it was saved with."""

    @staticmethod
    def forward(ctx, x, mask):
        ctx.save_for_backward(mask)
        ctx.saved_stride = mask.stride()
        return x * mask

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        assert mask.stride() == ctx.saved_stride, (mask.stride(), ctx.saved_stride)
        return grad * mask, None


@pytest.mark.parametrize("layout", ["padded rows", "expanded", "transposed"])
def test_saved_tensors_come_back_with_their_strides(layout):
    """CUDA's memory-efficient attention saves its mask with rows padded to a multiple of 4 elements (and
    often expanded over heads, stride 0) and refuses it in backward otherwise ("attn_bias is not correctly
    aligned"): seen on an H200 when a compressed mask came back as a plain contiguous copy. Such tensors are
    kept as they are; a dense permuted one (a transpose) is compressed and keeps its strides."""
    from align.models.activations import dense_layout

    torch.manual_seed(0)
    if layout == "padded rows":  # 66 columns in rows of 68, as sdpa pads an attention bias
        mask = torch.randn(2, 3, 66, 68)[..., :66]
    elif layout == "expanded":
        mask = torch.randn(2, 1, 66, 66).expand(2, 3, 66, 66)
    else:
        mask = torch.randn(2, 3, 66, 66).transpose(-1, -2)
    assert not mask.is_contiguous() and dense_layout(mask) == (layout == "transposed")
    x = torch.randn(2, 3, 66, 66, requires_grad=True)
    with compressed_saved_activations(torch.nn.Linear(1, 1), min_numel=1) as stats:
        y = _SavesStrided.apply(x, mask)
    y.sum().backward()
    compressed = layout == "transposed"
    assert stats["compressed"] == int(compressed) and stats["kept"] == int(not compressed)
    expected = mask.to(torch.bfloat16).float() if compressed else mask
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


def test_dense_layout_hand_cases():
    from align.models.activations import dense_layout

    assert dense_layout(torch.zeros(3, 4)) and dense_layout(torch.zeros(3, 4).t()) and dense_layout(torch.zeros(1, 5)[:, :5])
    assert dense_layout(torch.zeros(2, 1, 4).expand(2, 1, 4)) and dense_layout(torch.zeros(()))
    assert not dense_layout(torch.zeros(3, 4)[:, :3]) and not dense_layout(torch.zeros(3, 1).expand(3, 4))
    assert not dense_layout(torch.zeros(6)[::2])
