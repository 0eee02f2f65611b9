"""align.trainers.sft_fast: the label-only LM head gives TRL's SFT loss, gradients and metrics.

Equivalence invariants on a tiny model: FastSFTTrainer against TRL's own SFTTrainer (assistant_only_loss,
multi-turn chats, right padding) on the same batch, the same weights and the same LoRA values (B made
non-zero so the adapters get gradients everywhere). Tolerances: in float32 the two differ only in how the
LM head's matmul and the log-softmax are blocked (labelled rows in chunks of 5 here, against every row in
TRL's tiles): the loss, a mean of ~100 log-probs of magnitude ~5, agrees to 1e-5 and each gradient to
1e-4 of its tensor's largest entry (measured gaps ~1e-7). In bf16 the logits themselves are rounded to
8 bits of mantissa, differently blocked matmuls round differently: 1e-2 on the loss, 5e-2 relative on
gradients.
"""

import pytest
import torch

LOSS_ATOL = {"fp32": 1e-5, "bf16": 1e-2}
GRAD_RTOL = {"fp32": 1e-4, "bf16": 5e-2}


def _chats():
    """Multi-turn conversations of uneven length (padding in every batch), one to three assistant turns."""
    from align.records import SFTExample

    topics = ["cats", "the sea", "bread", "trains", "chess", "rain", "maps", "tea"]
    chats = []
    for i, t in enumerate(topics):
        messages = [{"role": "user", "content": f"Tell me about {t}." + " Be brief." * (i % 3)},
                    {"role": "assistant", "content": f"{t.capitalize()} are interesting. " * (1 + i % 4)}]
        for turn in range(i % 3):
            messages += [{"role": "user", "content": "And then?" + " Why?" * turn},
                         {"role": "assistant", "content": "Then more happens." * (1 + turn)}]
        chats.append(SFTExample(messages=messages, source=f"test:{i}"))
    return chats


def _trainer(model_dir, fast, tmp_path, dtype="fp32", gradient_checkpointing=False, batch_size=4, accumulation=1,
             packing=False, max_steps=2, selective=False, lora_dropout=0.0, padding_free=None):
    """A fresh tiny LoRA model (same seed: same LoRA init), the same non-zero LoRA B in every trainer."""
    import transformers
    from trl import SFTConfig, SFTTrainer

    from align.data.load import to_hf_dataset
    from align.models.chat import training_chat_template
    from align.models.loading import ModelArgs, load_model
    from align.trainers.sft_fast import FastSFTTrainer

    transformers.set_seed(0)
    model, tokenizer = load_model(ModelArgs(model_name_or_path=model_dir, dtype=dtype, quantization="none", lora_r=4,
                                            lora_alpha=8, lora_dropout=lora_dropout))
    tokenizer.chat_template = training_chat_template(tokenizer)
    if selective:
        from align.models.activations import enable_selective_checkpointing

        enable_selective_checkpointing(model.get_base_model())
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        max_length=None if padding_free else 256, assistant_only_loss=True, packing=packing, padding_free=packing if padding_free is None else padding_free,
        gradient_checkpointing=gradient_checkpointing, use_cpu=True, bf16=dtype == "bf16", report_to=[],
        save_strategy="no", logging_steps=1, max_steps=max_steps, learning_rate=5e-2, seed=0, data_seed=0,
    )
    common = dict(model=model, args=args, train_dataset=to_hf_dataset(_chats()), processing_class=tokenizer)
    trainer = FastSFTTrainer(**common, chunk_size=5) if fast else SFTTrainer(**common)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    if gradient_checkpointing:  # as Trainer.train does when training starts
        trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return trainer


def _loss_and_grads(trainer, batch, num_items_in_batch=None):
    trainer.model.train()
    trainer.model.zero_grad()
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items_in_batch)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach().float(), grads, metrics


def _assert_same(got, want, dtype):
    loss, grads, metrics = want
    fast_loss, fast_grads, fast_metrics = got
    torch.testing.assert_close(fast_loss, loss, rtol=0, atol=LOSS_ATOL[dtype])
    assert grads.keys() == fast_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        tol = GRAD_RTOL[dtype] * grad.abs().max().item() + 1e-12
        torch.testing.assert_close(fast_grads[name], grad, rtol=0, atol=tol, msg=name)
    assert fast_metrics["num_tokens"] == metrics["num_tokens"]
    for key in ("entropy", "mean_token_accuracy"):
        assert fast_metrics[key] == pytest.approx(metrics[key], abs=1e-4 if dtype == "fp32" else 5e-2), key


@pytest.mark.parametrize("dtype,gradient_checkpointing,num_items", [
    ("fp32", False, None), ("fp32", True, None), ("fp32", False, 37), ("bf16", False, None),
])
def test_fast_sft_matches_trl(tiny_model_dir, tmp_path, one_thread, dtype, gradient_checkpointing, num_items):
    """One batch of 4 multi-turn chats; num_items 37 stands for the labelled tokens of a whole accumulated step
    (TRL's Trainer passes it): the loss is then the batch's summed NLL over 37, in both."""
    stock = _trainer(tiny_model_dir, False, tmp_path / "stock", dtype, gradient_checkpointing)
    fast = _trainer(tiny_model_dir, True, tmp_path / "fast", dtype, gradient_checkpointing)
    batch = next(iter(stock.get_train_dataloader()))
    assert torch.equal(batch["input_ids"], next(iter(fast.get_train_dataloader()))["input_ids"])
    assert (batch["attention_mask"] == 0).any(), "the batch must hold padding"
    labelled = batch["labels"] != -100
    assert (labelled & batch["attention_mask"].bool()).sum() < batch["attention_mask"].sum(), "prompts are not trained on"
    _assert_same(_loss_and_grads(fast, batch, num_items), _loss_and_grads(stock, batch, num_items), dtype)


def test_head_sees_only_labelled_positions(tiny_model_dir, tmp_path, one_thread, monkeypatch):
    """The fast head gets exactly the hidden states whose next token is labelled, and TRL's tiled head is never run."""
    import trl.trainer.utils as trl_utils

    import align.models.lm_head as lm_head

    fast = _trainer(tiny_model_dir, True, tmp_path / "fast")
    batch = next(iter(fast.get_train_dataloader()))
    rows_seen = []
    inner = lm_head.completion_logprobs

    def counting(hidden, *args, **kwargs):
        rows_seen.append(hidden.shape[0])
        return inner(hidden, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("TRL's fused head ran")

    monkeypatch.setattr(lm_head, "completion_logprobs", counting)
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", refuse)
    _loss_and_grads(fast, batch)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert rows_seen == [labelled]
    assert labelled < batch["input_ids"][:, 1:].numel() // 2  # padding and prompts: most positions are skipped


def test_forward_output_matches_trl(tiny_model_dir, tmp_path, one_thread):
    """The patched forward keeps TRL's FusedCausalLMOutput contract field by field, `loss` over num_items_in_batch
    included (Trainer.compute_loss reads it under sequence parallelism)."""
    stock = _trainer(tiny_model_dir, False, tmp_path / "stock")
    fast = _trainer(tiny_model_dir, True, tmp_path / "fast")
    batch = next(iter(stock.get_train_dataloader()))
    outs = [t.model(**batch, fused_lm_head=True, num_items_in_batch=37) for t in (stock, fast)]
    (want, got) = outs
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-5)
    assert torch.equal(got.label_mask, want.label_mask) and torch.equal(got.is_top1, want.is_top1)
    for key in ("log_probs", "entropy"):
        torch.testing.assert_close(getattr(got, key), getattr(want, key), rtol=0, atol=1e-4, msg=key)


def test_accumulated_training_matches_trl(tiny_model_dir, tmp_path, one_thread):
    """Two optimizer steps of 2 micro-batches x 2 chats (TRL's num_items_in_batch across accumulation): the logged
    losses and the trained LoRA weights agree."""
    runs = {}
    for fast in (False, True):
        trainer = _trainer(tiny_model_dir, fast, tmp_path / str(fast), batch_size=2, accumulation=2)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        runs[fast] = (losses, weights)
    (losses, weights), (fast_losses, fast_weights) = runs[False], runs[True]
    assert len(losses) == 2
    assert fast_losses == pytest.approx(losses, abs=1e-5)
    for name, w in weights.items():
        torch.testing.assert_close(fast_weights[name], w, rtol=0, atol=1e-5, msg=name)


def test_packed_batches_match_trl(tiny_model_dir, tmp_path, one_thread):
    """Packing (padding-free rows kept apart by position ids): TRL shifts the labels of one long row; so does the fast head."""
    stock = _trainer(tiny_model_dir, False, tmp_path / "stock", packing=True)
    fast = _trainer(tiny_model_dir, True, tmp_path / "fast", packing=True)
    batch = next(iter(stock.get_train_dataloader()))
    assert "position_ids" in batch and batch["input_ids"].shape[0] == 1
    _assert_same(_loss_and_grads(fast, batch), _loss_and_grads(stock, batch), "fp32")


def test_selective_checkpointing_is_exact(tiny_model_dir, tmp_path, one_thread, monkeypatch):
    """Selective checkpointing (keep matmul and attention outputs, recompute the rest) gives the loss and gradients of no
    checkpointing, bit for bit in float32 (a recomputed op repeats its forward), with LoRA dropout on (the masks are
    replayed); and it is in effect: the policy kept some outputs."""
    import align.models.activations as activations
    from align.models.lora_dropout import DroppedLoraA

    kept = []
    policy_factory = activations.keep_matmul_outputs

    def counting_factory(*args, **kwargs):
        policy = policy_factory(*args, **kwargs)

        def counting(ctx, op, *a, **k):
            decision = policy(ctx, op, *a, **k)
            kept.append(decision.name == "MUST_SAVE")
            return decision

        return counting

    monkeypatch.setattr(activations, "keep_matmul_outputs", counting_factory)
    plain = _trainer(tiny_model_dir, True, tmp_path / "plain", lora_dropout=0.1)
    selective = _trainer(tiny_model_dir, True, tmp_path / "selective", gradient_checkpointing=True, selective=True, lora_dropout=0.1)
    batch = next(iter(plain.get_train_dataloader()))
    assert any(isinstance(m, DroppedLoraA) and m.dropout.p > 0 for m in selective.model.modules())  # fused by load_model
    torch.manual_seed(3)
    want = _loss_and_grads(plain, batch)
    torch.manual_seed(3)
    got = _loss_and_grads(selective, batch)
    assert any(kept) and not all(kept)
    assert torch.equal(got[0], want[0])
    for name, grad in want[1].items():
        assert torch.equal(got[1][name], grad), name


def test_padding_free_matches_padded_trl(tiny_model_dir, tmp_path, one_thread):
    """padding_free: the batch's conversations in one row without padding, kept apart by position ids, give TRL's
    padded loss and gradients (the same tokens see the same tokens)."""
    stock = _trainer(tiny_model_dir, False, tmp_path / "stock")
    fast = _trainer(tiny_model_dir, True, tmp_path / "fast", padding_free=True)
    batch = next(iter(stock.get_train_dataloader()))
    flat = next(iter(fast.get_train_dataloader()))
    assert flat["input_ids"].shape == (1, int(batch["attention_mask"].sum()))
    _assert_same(_loss_and_grads(fast, flat), _loss_and_grads(stock, batch), "fp32")


def test_logit_softcapping_falls_back_to_trl(tiny_model_dir, tmp_path, one_thread):
    """A model whose logits are soft-capped keeps TRL's head (which applies the cap), with a warning."""
    import transformers
    from trl import SFTConfig

    from align.data.load import to_hf_dataset
    from align.models.chat import training_chat_template
    from align.models.loading import ModelArgs, load_model
    from align.trainers.sft_fast import FastSFTTrainer

    transformers.set_seed(0)
    model, tokenizer = load_model(ModelArgs(model_name_or_path=tiny_model_dir, dtype="fp32", quantization="none", lora_r=4))
    model.config.final_logit_softcapping = 30.0
    tokenizer.chat_template = training_chat_template(tokenizer)
    args = SFTConfig(output_dir=str(tmp_path / "out"), assistant_only_loss=True, use_cpu=True, report_to=[], max_steps=1)
    with pytest.warns(UserWarning, match="soft-capping"):
        trainer = FastSFTTrainer(model=model, args=args, train_dataset=to_hf_dataset(_chats()), processing_class=tokenizer)
    assert trainer.fallback_reason == "logit soft-capping or scaling"
    assert not getattr(trainer.model.get_base_model(), "_align_label_head", False)
