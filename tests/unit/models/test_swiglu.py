"""align.models.swiglu: the gated MLP without a saved silu(gate), bit for bit autograd's."""

import copy

import pytest
import torch
from lora_values import randomize_lora_b
from saved_tensors import saved_bytes

from align.models.loading import ModelArgs, load_model
from align.models.swiglu import _forward, fuse_swiglu, swiglu


def _loss_and_grads(model, ids, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # as a Trainer with bf16=True runs it
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _saved_bytes(model, ids, autocast: bool) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward (by storage, as memory counts)."""
    with saved_bytes(model) as saved, torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        model(input_ids=ids, labels=ids).loss
    return saved.total


@pytest.mark.parametrize("dtype, autocast", [("fp32", False), ("bf16", False), ("bf16", True)])
def test_fused_mlp_gives_the_same_loss_and_gradients_and_saves_one_intermediate_tensor_less(tiny_model_dir, one_thread,
                                                                                          dtype, autocast):
    """A LoRA model (random B, so every adapter has a gradient) with every MLP through swiglu: the loss and every
    gradient bit for bit the plain model's, and autograd keeps exactly one (positions x intermediate) tensor a layer
    less. LoRA dropout is off here so that both runs draw no masks."""
    model, _ = load_model(ModelArgs(model_name_or_path=tiny_model_dir, dtype=dtype, quantization="none", lora_dropout=0.0,
                                    fused_swiglu=False))
    randomize_lora_b(model)
    model.train()
    ids = torch.randint(3, 250, (3, 17), generator=torch.Generator().manual_seed(0))
    config = model.get_base_model().config
    layers, itemsize = config.num_hidden_layers, {"fp32": 4, "bf16": 2}[dtype]
    plain = copy.deepcopy(model)
    assert fuse_swiglu(model) == layers and fuse_swiglu(model) == 0  # once per MLP
    want_loss, want_grads = _loss_and_grads(plain, ids, autocast)
    got_loss, got_grads = _loss_and_grads(model, ids, autocast)
    assert torch.equal(got_loss, want_loss)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 0
    assert all(torch.equal(got_grads[n], want_grads[n]) for n in want_grads)
    saved_plain, saved_fused = _saved_bytes(plain, ids, autocast), _saved_bytes(model, ids, autocast)
    assert saved_plain - saved_fused == layers * ids.numel() * config.intermediate_size * itemsize
    assert model.state_dict().keys() == plain.state_dict().keys()


def test_fused_mlp_runs_its_own_forward_without_gradients_and_leaves_other_mlps_alone(tiny_model_dir, one_thread):
    """Without gradients the MLP's forward is the plain expression (no custom node); an MLP with another activation
    or a replaced forward is not changed."""
    model, _ = load_model(ModelArgs(model_name_or_path=tiny_model_dir, dtype="fp32", quantization="none", fused_swiglu=False),
                          lora=False)
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    fuse_swiglu(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)
    gate = torch.randn(4, 6, requires_grad=True)
    assert swiglu(gate, torch.randn(4, 6)).grad_fn.name().endswith("_SwiGLUBackward")
    with torch.no_grad():
        assert swiglu(gate, torch.randn(4, 6)).grad_fn is None

    other, _ = load_model(ModelArgs(model_name_or_path=tiny_model_dir, dtype="fp32", quantization="none", fused_swiglu=False),
                          lora=False)
    mlps = [m for m in other.modules() if type(m).__name__ == "LlamaMLP"]
    mlps[0].act_fn = torch.nn.GELU()
    mlps[1].forward = lambda x: x
    assert fuse_swiglu(other) == 0 and all(type(m).__name__ == "LlamaMLP" and type(m).forward.__name__ == "forward" for m in mlps)


def test_load_model_fuses_every_mlp_unless_asked_not_to(tiny_model_dir):
    """The recipes' models (load_model, and PPO's base through it) have every MLP fused; fused_swiglu false keeps
    transformers' own."""
    fused = lambda args, **kw: sum(type(m).forward is _forward for m in load_model(args, **kw)[0].modules())  # noqa: E731
    args = dict(model_name_or_path=tiny_model_dir, dtype="fp32", quantization="none")
    assert fused(ModelArgs(**args)) == fused(ModelArgs(**args), task="reward") == fused(ModelArgs(**args), lora=False) == 2
    assert fused(ModelArgs(**args, fused_swiglu=False)) == 0


def test_a_fused_model_copies_and_pickles_fused(tiny_model_dir):
    """deepcopy (TRL's reference copies) and pickle (torch.save of a whole model) keep the fused MLPs and outputs."""
    import io

    model, _ = load_model(ModelArgs(model_name_or_path=tiny_model_dir, dtype="fp32", quantization="none"))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    ids = torch.tensor([[5, 6, 7, 8]])
    for other in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert sum(type(m).forward is _forward for m in other.modules()) == 2
        assert torch.equal(other(input_ids=ids).logits, model(input_ids=ids).logits)
