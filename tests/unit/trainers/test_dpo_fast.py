"""align.trainers.dpo_fast: the fast log-prob path gives TRL's numbers.

Equivalence invariants on a tiny model in float32: FastDPOTrainer against TRL's own DPOTrainer on the same
batch, the same weights and the same LoRA values (B made non-zero so the policy differs from the
reference). Tolerances, and why they are not zero: the fast path runs different matmul shapes (rows of
prompt + chosen + rejected, the LM head on completion positions only), so float32 sums round
differently. Per-sequence log-probs are sums of ~100 terms of magnitude ~5, so they agree to
|diff| <= 1e-4 (float32 epsilon 6e-8 x 500 x a few); the loss to 1e-5; gradients to 1e-4 of the largest
gradient entry of each tensor. Measured gaps are ~1e-6 relative.
"""

import pytest
import torch
from lora_values import randomize_lora_b

from align.errors import ConfigError
from align.models.lm_head import completion_logprobs
from align.trainers.dpo_fast import CHOSEN, PAD, PROMPT, REJECTED, branch_attention_mask, preference_rows

LOGP_ATOL = 1e-4
LOSS_ATOL = 1e-5
GRAD_RTOL = 1e-4


# ------------------------------------------------------------------------------------------ layout


def _trl_batch(examples):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=0)(examples)


def test_preference_rows_shares_the_prompt():
    """Two pairs, hand-laid out.

    pair 0: prompt [5 6 7], chosen [8 9], rejected [10]      -> row [5 6 7 8 9 10]
    pair 1: prompt [5 6],   chosen [11],  rejected [12 13 14] -> row [5 6 11 12 13 14]
    TRL's layout: rows chosen0, chosen1, rejected0, rejected1, length L = 5, log-probs (4, L - 1 = 4).
    The hidden state predicting a token: chosen token at TRL column t <- row column t - 1; the first
    rejected token <- the last prompt token; later rejected tokens <- the rejected token before them,
    shifted right by the chosen reply's length (pair 0: +2, pair 1: +1). Flat index = row * 6 + column.
    """
    batch = _trl_batch([
        {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]},
        {"prompt_ids": [5, 6], "chosen_ids": [11], "rejected_ids": [12, 13, 14]},
    ])
    rows = preference_rows(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], True, pad_token_id=0)
    assert rows["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10], [5, 6, 11, 12, 13, 14]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 2, 3, 4]]
    assert rows["branch"].tolist() == [[PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED], [PROMPT] * 2 + [CHOSEN] + [REJECTED] * 3]
    # per pair: chosen tokens, then rejected tokens
    assert rows["targets"].tolist() == [8, 9, 10, 11, 12, 13, 14]
    assert rows["hidden_index"].tolist() == [2, 3, 2, 6 + 1, 6 + 1, 6 + 3, 6 + 4]
    # TRL rows: chosen0 = 0, chosen1 = 1, rejected0 = 2, rejected1 = 3; index = row * 4 + (t - 1)
    assert rows["out_index"].tolist() == [0 * 4 + 2, 3, 2 * 4 + 2, 1 * 4 + 1, 3 * 4 + 1, 3 * 4 + 2, 3 * 4 + 3]


def test_preference_rows_share_a_common_start_of_the_replies():
    """prompt [5 6], chosen [8 9 10], rejected [8 9 11 12]: the row shares [5 6 8 9]; the chosen part is [10], the
    rejected part [11 12] restarts at position 4. Rejected tokens 8 and 9 (TRL columns 2, 3) are predicted inside the
    shared start (row columns 1, 2), token 11 (column 4) by the shared 9 (row column 3), token 12 by 11 (row column 5)."""
    batch = _trl_batch([{"prompt_ids": [5, 6], "chosen_ids": [8, 9, 10], "rejected_ids": [8, 9, 11, 12]}])
    rows = preference_rows(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], True, pad_token_id=0)
    assert rows["input_ids"].tolist() == [[5, 6, 8, 9, 10, 11, 12]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 3, 4, 4, 5]]
    assert rows["branch"].tolist() == [[PROMPT] * 4 + [CHOSEN] + [REJECTED] * 2]
    assert rows["targets"].tolist() == [8, 9, 10, 8, 9, 11, 12]
    assert rows["hidden_index"].tolist() == [1, 2, 3, 1, 2, 3, 5]


def test_preference_rows_without_sharing_keeps_trl_rows():
    batch = _trl_batch([{"prompt_ids": [5, 6], "chosen_ids": [8, 9], "rejected_ids": [10]}])
    rows = preference_rows(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], False, pad_token_id=0)
    assert rows["input_ids"].tolist() == [[5, 6, 8, 9], [5, 6, 10, 0]]
    assert rows["branch"].tolist() == [[CHOSEN] * 4, [CHOSEN] * 3 + [PAD]]
    assert rows["hidden_index"].tolist() == [1, 2, 4 + 1]


def test_different_prompts_are_not_shared():
    """keep_end truncation can cut the two prompts of a pair differently: such a pair keeps two rows."""
    batch = _trl_batch([{"prompt_ids": [5, 6], "chosen_ids": [8], "rejected_ids": [10]}])
    batch["input_ids"][1, 0] = 7  # the rejected sequence's prompt now differs
    rows = preference_rows(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], True, pad_token_id=0)
    assert rows["input_ids"].tolist() == [[5, 6, 8], [7, 6, 10]]


def test_branch_attention_mask_by_hand():
    """Row [p p p c c r] (bits 3 3 3 1 1 2) plus one padding token: the rejected token sees the prompt and
    itself, not the chosen reply; the padding token sees everything before it (no empty softmax row)."""
    branch = torch.tensor([[PROMPT, PROMPT, PROMPT, CHOSEN, CHOSEN, REJECTED, PAD]], dtype=torch.uint8)
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(branch_attention_mask(branch)[0, 0], expected)


# ------------------------------------------------------------------------------------------ LM head


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
def test_completion_logprobs_equals_log_softmax(chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64)
    targets = torch.randint(0, 11, (7,))
    logps, entropy, mean_logits, is_top1 = completion_logprobs(hidden, weight, bias, targets, chunk_size)
    logits = hidden @ weight.T + bias
    expected = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(logps, expected, rtol=0, atol=1e-12)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy.double(), -(probs * probs.log()).sum(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(mean_logits.double(), logits.mean(-1), rtol=0, atol=1e-5)
    assert torch.equal(is_top1, logits.argmax(-1) == targets)
    weights = torch.randn(7, dtype=torch.float64)
    grads = torch.autograd.grad((logps * weights).sum(), (hidden, weight))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (hidden, weight))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("with_bias", [False, True])
def test_completion_logprobs_in_bf16_follows_float64(with_bias):
    """bf16 hidden states and head (the dtype of a bf16 CPU run): log-probs and every gradient agree with the float64
    log-softmax within bf16 rounding, gradients come back in their inputs' dtypes, and a frozen head gets none."""
    torch.manual_seed(0)
    hidden64, weight64 = torch.randn(9, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64) * 0.3
    bias64 = torch.randn(50, dtype=torch.float64) if with_bias else None
    targets, weights = torch.randint(0, 50, (9,)), torch.randn(9, dtype=torch.float64)

    def reference(hidden, weight, bias):
        logits = torch.nn.functional.linear(hidden, weight, bias)
        return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)

    leaves64 = [t.requires_grad_(True) for t in (hidden64, weight64, bias64) if t is not None]
    want = reference(hidden64, weight64, bias64)
    want_grads = torch.autograd.grad((want * weights).sum(), leaves64)
    hidden, weight = hidden64.detach().bfloat16().requires_grad_(True), weight64.detach().bfloat16().requires_grad_(True)
    bias = bias64.detach().bfloat16().requires_grad_(True) if with_bias else None
    (got,) = completion_logprobs(hidden, weight, bias, targets, chunk_size=4, stats=False)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.detach(), rtol=0, atol=0.1)
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad((got * weights.float()).sum(), leaves)
    for leaf, grad, want_grad in zip(leaves, grads, want_grads):
        assert grad.dtype == torch.bfloat16 == leaf.dtype
        torch.testing.assert_close(grad.double(), want_grad, rtol=0.05, atol=0.05)

    frozen = weight.detach()  # a LoRA run's head: only the hidden states get a gradient
    (got,) = completion_logprobs(hidden, frozen, None, targets, chunk_size=4, stats=False)
    (grad_hidden,) = torch.autograd.grad(got.sum(), hidden)
    assert grad_hidden.shape == hidden.shape and torch.isfinite(grad_hidden).all()


def test_completion_logprobs_without_grad_matches_with_grad():
    """The reference pass (no_grad) and the policy pass give the same log-probs and stats, chunk by chunk."""
    torch.manual_seed(1)
    hidden, weight = torch.randn(10, 8).bfloat16(), torch.randn(30, 8).bfloat16()
    targets = torch.randint(0, 30, (10,))
    with torch.no_grad():
        plain = completion_logprobs(hidden, weight, None, targets, 3)
    tracked = completion_logprobs(hidden.clone().requires_grad_(True), weight, None, targets, 3)
    assert tracked[0].requires_grad and not any(t.requires_grad for t in tracked[1:])
    for a, b in zip(plain, tracked):
        assert torch.equal(a, b.detach())


# ------------------------------------------------------------------------------------------ trainer


def _pairs():
    from align.records import PreferencePair

    topics = ["cats", "the sea", "bread", "trains", "chess", "rain"]
    pairs = []
    for i, t in enumerate(topics):
        chosen = f"{t.capitalize()} are interesting. " * (1 + i % 3)
        # rejected replies of three kinds: unrelated, the chosen reply cut short, the chosen reply plus a postscript
        # (the last two share a start with the chosen reply beyond the prompt)
        rejected = ["I do not know." + " Sorry." * (i % 4), chosen[: len(chosen) // 2], chosen + "P.S. Bye."][i % 3]
        pairs.append(PreferencePair(prompt=[{"role": "user", "content": f"Tell me about {t}." + " Please be brief." * (i % 3)}],
                                    chosen=chosen, rejected=rejected))
    return pairs


def _trainer(model_dir, fast, tmp_path, share_prompt=True, precompute=True, gradient_checkpointing=False, truncation_mode="keep_start", max_length=512):
    """A fresh tiny LoRA model (same seed: same LoRA init) and a trainer; then the same non-zero LoRA B
    in every trainer, so that the policy differs from the (already computed) reference."""
    import transformers
    from trl import DPOConfig, DPOTrainer

    from align.data.load import to_hf_dataset
    from align.models.loading import ModelArgs, load_model
    from align.trainers.dpo_fast import FastDPOTrainer

    transformers.set_seed(0)
    model, tokenizer = load_model(ModelArgs(model_name_or_path=model_dir, dtype="fp32", quantization="none", lora_r=4, lora_alpha=8))
    args = DPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, max_length=max_length, truncation_mode=truncation_mode,
        precompute_ref_log_probs=precompute, gradient_checkpointing=gradient_checkpointing, use_cpu=True, bf16=False,
        report_to=[], save_strategy="no", logging_steps=1, max_steps=3, learning_rate=5e-2, seed=0,
    )
    # a fresh dataset per trainer: TRL caches precomputed reference log-probs by dataset fingerprint
    common = dict(model=model, args=args, train_dataset=to_hf_dataset(_pairs()), processing_class=tokenizer)
    if fast:
        trainer = FastDPOTrainer(**common, share_prompt=share_prompt, chunk_size=5)
    else:
        trainer = DPOTrainer(**common)
    randomize_lora_b(trainer.model)
    return trainer


def _loss_and_grads(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


@pytest.mark.parametrize(
    "share_prompt,precompute,gradient_checkpointing",
    [(True, True, False), (False, True, False), (True, False, False), (True, True, True)],
)
def test_fast_trainer_matches_trl(tiny_model_dir, tmp_path, share_prompt, precompute, gradient_checkpointing):
    stock = _trainer(tiny_model_dir, False, tmp_path / "stock", precompute=precompute, gradient_checkpointing=gradient_checkpointing)
    fast = _trainer(tiny_model_dir, True, tmp_path / "fast", share_prompt, precompute, gradient_checkpointing)
    batch = next(iter(stock.get_train_dataloader()))
    fast_batch = next(iter(fast.get_train_dataloader()))
    assert torch.equal(batch["input_ids"], fast_batch["input_ids"])  # same rows, same order
    if precompute:  # the reference log-probs the fast trainer precomputed through its own path
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            torch.testing.assert_close(fast_batch[key], batch[key], rtol=0, atol=LOGP_ATOL)

    loss, grads, metrics = _loss_and_grads(stock, batch)
    fast_loss, fast_grads, fast_metrics = _loss_and_grads(fast, fast_batch)
    assert abs(loss.item() - 0.6931) > 1e-3  # the policy differs from the reference: a real test
    torch.testing.assert_close(fast_loss, loss, rtol=0, atol=LOSS_ATOL)
    assert grads.keys() == fast_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        tol = GRAD_RTOL * grad.abs().max().item() + 1e-12
        torch.testing.assert_close(fast_grads[name], grad, rtol=0, atol=tol, msg=name)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert fast_metrics[key] == pytest.approx(metrics[key], abs=LOGP_ATOL), key
    for key in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "num_tokens"):
        assert fast_metrics[key] == pytest.approx(metrics[key], abs=1e-4), key


def test_reference_log_probs_match_trl(tiny_model_dir, tmp_path):
    """compute_ref_log_probs (adapter disabled / "ref" adapter), with and without the shared prompt."""
    stock = _trainer(tiny_model_dir, False, tmp_path / "stock", precompute=False)
    batch = next(iter(stock.get_train_dataloader()))
    want = stock.compute_ref_log_probs(stock.model, batch)
    for share in (True, False):
        fast = _trainer(tiny_model_dir, True, tmp_path / f"fast{share}", share_prompt=share, precompute=False)
        got = fast.compute_ref_log_probs(fast.model, batch)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=LOGP_ATOL)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_a_fresh_adapters_ref_copy_is_dropped_and_the_reference_is_unchanged(tiny_quant_model_dir, tmp_path, dtype):
    """TRL adds a "ref" copy of the policy's adapter; for a fresh LoRA adapter (B = 0) the fast trainer deletes it and
    computes the reference with the adapter disabled. The log-probs are those through the copy to the bit, in bf16 too;
    the policy's own adapter stays trainable."""
    from trl.trainer.utils import use_adapter

    trainer = _recipe_trainer(tiny_quant_model_dir, tmp_path, _uneven_pairs(), dtype=dtype, max_length=512,
                              per_device_train_batch_size=2)
    model = trainer.model
    assert list(model.peft_config) == ["default"]
    assert all(p.requires_grad == (".default." in n) for n, p in model.named_parameters() if "lora_" in n)
    assert any(p.requires_grad for p in model.parameters())
    randomize_lora_b(model)  # the policy moves away; the reference must not
    batch = next(iter(trainer.get_train_dataloader()))
    disabled = trainer.compute_ref_log_probs(model, batch)
    # TRL's copy, rebuilt as TRL builds it (from "default" with zero B: the adapter as it started)
    model.add_adapter("ref", model.peft_config["default"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".default." in name:
                model.get_parameter(name.replace(".default.", ".ref.")).copy_(torch.zeros_like(param) if "lora_B" in name else param)
    with torch.no_grad(), use_adapter(model, adapter_name="ref"):
        through_copy = trainer._sequence_logps(model, batch)
    policy = trainer._sequence_logps(model, batch)
    for d, c, p in zip(disabled, through_copy, policy):
        assert torch.equal(d, c)
        assert not torch.equal(d, p)  # the randomized policy differs: the comparison can fail


def test_a_trained_adapters_ref_copy_is_kept(tiny_model_dir, tmp_path):
    """DPO from a trained adapter (non-zero B, e.g. after SFT): the reference is that adapter, so "ref" stays, and so
    does a "ref" that is not plain LoRA."""
    from align.trainers.dpo_fast import drop_idle_ref_adapter

    trainer = _recipe_trainer(tiny_model_dir, tmp_path, _pairs(), prepare_model=randomize_lora_b)
    assert set(trainer.model.peft_config) == {"default", "ref"}
    assert drop_idle_ref_adapter(trainer.model) is False
    import dataclasses

    dora = dataclasses.replace(trainer.model.peft_config["ref"], use_dora=True)
    trainer.model.peft_config["ref"] = dora
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B.ref" in name:
                param.zero_()
    assert drop_idle_ref_adapter(trainer.model) is False  # DoRA: zero B is not a zero update
    trainer.model.peft_config["ref"] = dataclasses.replace(dora, use_dora=False)
    sharded = next(p for n, p in trainer.model.named_parameters() if "lora_B.ref" in n)
    values, sharded.data = sharded.data, torch.empty(0)  # a parameter ZeRO-3 has partitioned away: its values unknown
    assert drop_idle_ref_adapter(trainer.model) is False
    sharded.data = values
    assert drop_idle_ref_adapter(trainer.model) is True and "ref" not in trainer.model.peft_config


def test_keep_end_truncation_matches_trl(tiny_model_dir, tmp_path):
    """Truncated from the left, the chosen and rejected prompts differ: those pairs keep two rows."""
    stock = _trainer(tiny_model_dir, False, tmp_path / "stock", truncation_mode="keep_end", max_length=40)
    fast = _trainer(tiny_model_dir, True, tmp_path / "fast", truncation_mode="keep_end", max_length=40)
    batch = next(iter(stock.get_train_dataloader()))
    loss, grads, _ = _loss_and_grads(stock, batch)
    fast_loss, fast_grads, _ = _loss_and_grads(fast, next(iter(fast.get_train_dataloader())))
    torch.testing.assert_close(fast_loss, loss, rtol=0, atol=LOSS_ATOL)
    for name, grad in grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=0, atol=GRAD_RTOL * grad.abs().max().item() + 1e-12)


def test_training_trajectory_matches_trl(tiny_model_dir, tmp_path):
    """Three optimizer steps (learning rate 5e-2, so the weights move): the same loss at every step."""
    losses = {}
    for fast in (False, True):
        trainer = _trainer(tiny_model_dir, fast, tmp_path / str(fast))
        trainer.train()
        losses[fast] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses[False]) == 3  # max_steps=3 (6 pairs, 3 per step: the third step starts epoch 2)
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)


def test_fast_off_is_trl(tiny_model_dir, tmp_path):
    """fast=False: no patched forward is used, and the loss is TRL's to the last bit."""
    stock = _trainer(tiny_model_dir, False, tmp_path / "stock")
    off = _trainer(tiny_model_dir, False, tmp_path / "off")
    from align.trainers.dpo_fast import FastDPOTrainer

    batch = next(iter(stock.get_train_dataloader()))
    loss = _loss_and_grads(stock, batch)[0]
    off.__class__ = FastDPOTrainer
    off._fast, off._share_prompt, off._chunk_size, off._fallback_reason, off._reference_free = False, True, 5, None, False
    off._sft_steps = 0
    assert torch.equal(_loss_and_grads(off, batch)[0], loss)


def _recipe():
    import importlib.util

    from repo_paths import REPO

    path = REPO / "recipes" / "dpo.py"
    spec = importlib.util.spec_from_file_location("recipe_dpo", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


def _recipe_trainer(model_dir, tmp_path, pairs, prepare_model=None, **overrides):
    """recipes/dpo.py's own trainer (build_trainer) with the recipe's defaults, on a tiny model; `prepare_model(model)`
    runs on the loaded model before the trainer is built."""
    from align.config import build_config
    from align.data.load import to_hf_dataset
    from align.models.loading import load_model

    recipe = _recipe()
    cfg = build_config(recipe.DPOArgs, {"model_name_or_path": model_dir, "output_dir": str(tmp_path), "max_steps": 1,
                                        "report_to": "none", "max_length": 128, "lora_r": 4, "cpu_threads": -1,
                                        "learning_rate": recipe.LEARNING_RATES[0], **overrides})
    model, tokenizer = load_model(cfg)
    if prepare_model is not None:
        prepare_model(model)
    return recipe.build_trainer(cfg, model, tokenizer, to_hf_dataset(pairs), [])


def test_recipe_builds_the_fast_trainer(tiny_model_dir, tmp_path):
    from align.trainers.dpo_fast import FastDPOTrainer

    trainer = _recipe_trainer(tiny_model_dir, tmp_path, _pairs())
    assert isinstance(trainer, FastDPOTrainer) and trainer._fast and trainer._share_prompt
    assert "ref_chosen_logps" not in trainer.train_dataset.column_names  # the reference on each step's own batch
    pre = _recipe_trainer(tiny_model_dir, tmp_path / "pre", _pairs(), precompute_ref_log_probs=True)
    assert "ref_chosen_logps" in pre.train_dataset.column_names


def _uneven_pairs():
    """Pairs of very different lengths (40 to 400 tokens): a batch's padded width depends on which pairs it holds."""
    from align.records import PreferencePair

    return [
        PreferencePair(prompt=[{"role": "user", "content": "Hi there. " * (1 + 20 * (i % 2))}],
                       chosen="Yes indeed. " * (1 + 15 * (i % 3)), rejected="No. " * (1 + i))
        for i in range(6)
    ]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_recipe_first_step_is_exactly_ln2(tiny_quant_model_dir, tmp_path, dtype):
    """Before the first update the policy is the reference, so every implicit reward is exactly 0 and the
    sigmoid loss exactly ln 2, in every dtype: the recipe computes the reference on the step's own batch
    through the policy's own path and sums it in the same order. (Precomputed in other batches, bf16
    log-probs of a row depend on the padded width of the batch it sat in: on the real model the first loss
    was 0.6971 instead of 0.6931.) The 64-wide tiny model is wide enough for bf16 matmuls to round by shape."""
    trainer = _recipe_trainer(tiny_quant_model_dir, tmp_path, _uneven_pairs(), dtype=dtype, max_length=512,
                              per_device_train_batch_size=2, loss_type="sigmoid")
    assert (trainer.args.bf16, trainer._fast) == (dtype == "bf16", True)
    trainer.model.train()
    for batch in list(trainer.get_train_dataloader())[:2]:
        loss = trainer.compute_loss(trainer.model, batch)
        assert loss.item() == torch.tensor(2.0).log().item()
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        assert metrics["rewards/chosen"] == metrics["rewards/rejected"] == metrics["rewards/margins"] == 0.0


def _first_loss_without_reference(trainer):
    """The trainer's loss on its first batch, with non-zero LoRA B (the policy away from its base, so a reference would
    change the loss) and a reference forward that fails if it runs. Returns (batch, loss)."""
    randomize_lora_b(trainer.model)

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference forward ran")

    trainer.compute_ref_log_probs = no_reference
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    return batch, trainer.compute_loss(trainer.model, batch)


@pytest.mark.parametrize("fast", [True, False])
def test_reference_free_loss_uses_no_reference(tiny_model_dir, tmp_path, fast):
    """--reference_free: the sigmoid loss of beta * (log pi(chosen) - log pi(rejected)), the implicit rewards
    beta * log pi(reply); the reference forward never runs (fast path and TRL's stock path alike)."""
    import torch.nn.functional as F

    trainer = _recipe_trainer(tiny_model_dir, tmp_path, _pairs(), loss_type="sigmoid", reference_free=True, fast_logprobs=fast)
    batch, loss = _first_loss_without_reference(trainer)
    # the policy's log-probs per pair, by the fast path of a trainer with the same LoRA weights
    scorer = trainer if fast else _recipe_trainer(tiny_model_dir, tmp_path / "scorer", _pairs(), loss_type="sigmoid")
    if not fast:
        randomize_lora_b(scorer.model)
    with torch.no_grad():
        chosen, rejected = scorer._sequence_logps(scorer.model, batch)
    beta = trainer.args.beta
    torch.testing.assert_close(loss, -F.logsigmoid(beta * (chosen - rejected)).mean(), rtol=0, atol=1e-5)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert metrics["rewards/chosen"] == pytest.approx(beta * chosen.mean().item(), abs=1e-4)
    assert metrics["rewards/rejected"] == pytest.approx(beta * rejected.mean().item(), abs=1e-4)


def test_preference_rows_chosen_only_lays_out_prompt_and_chosen():
    """The SFT phase's rows, by hand: each pair's `prompt + chosen` alone, its tokens indexed into TRL's layout.

    pair 0: prompt [5 6 7], chosen [8 9], rejected [10 11 12] -> row [5 6 7 8 9]
    pair 1: prompt [5 6],   chosen [13],  rejected [14 15]    -> row [5 6 13 0 0]
    TRL's layout: rows chosen0, chosen1, rejected0, rejected1, L = 6, log-probs (4, 5); only chosen rows are indexed.
    """
    batch = _trl_batch([
        {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12]},
        {"prompt_ids": [5, 6], "chosen_ids": [13], "rejected_ids": [14, 15]},
    ])
    rows = preference_rows(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], True, pad_token_id=0,
                           chosen_only=True)
    assert rows["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 13, 0, 0]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 0]]
    assert rows["branch"].tolist() == [[CHOSEN] * 5, [CHOSEN] * 3 + [PAD] * 2]
    assert rows["targets"].tolist() == [8, 9, 13]  # no rejected token
    assert rows["hidden_index"].tolist() == [2, 3, 5 + 1]
    assert rows["out_index"].tolist() == [0 * 5 + 2, 0 * 5 + 3, 1 * 5 + 1]


@pytest.mark.parametrize("fast", [True, False])
def test_sft_phase_is_trls_sft_loss_without_rejected_or_reference(tiny_model_dir, tmp_path, fast):
    """--sft_steps: in the first steps the loss is TRL's own "sft" loss of the batch (the mean NLL of the chosen tokens),
    computed without the reference forward and without reading the rejected replies; after them, DPO's loss (the
    recipe's sigmoid,sft, with TRL's reward metrics)."""
    trainer = _recipe_trainer(tiny_model_dir, tmp_path, _pairs(), sft_steps=1, max_steps=2, fast_logprobs=fast, dtype="fp32")
    batch, loss = _first_loss_without_reference(trainer)
    # TRL's stock DPOTrainer with loss_type sft alone, on the same weights
    stock = _recipe_trainer(tiny_model_dir, tmp_path / "stock", _pairs(), loss_type="sft", fast_logprobs=False, dtype="fp32")
    missing, unexpected = stock.model.load_state_dict(trainer.model.state_dict(), strict=False)
    assert not unexpected and all(".ref." in k for k in missing)  # the fast trainer dropped TRL's idle "ref" copy
    stock.model.train()
    torch.testing.assert_close(loss, stock.compute_loss(stock.model, batch), rtol=0, atol=1e-5)
    assert trainer._metrics["train"]["sft_phase/nll"][-1] == pytest.approx(loss.item())
    # other rejected replies change nothing in the SFT phase
    half = batch["input_ids"].shape[0] // 2
    scrambled = {**batch, "input_ids": batch["input_ids"].clone()}
    rejected_tokens = (batch["completion_mask"][half:] * batch["attention_mask"][half:]).bool()
    scrambled["input_ids"][half:][rejected_tokens] = 3
    torch.testing.assert_close(trainer.compute_loss(trainer.model, scrambled), loss, rtol=0, atol=0)
    assert "rewards/margins" not in trainer._metrics["train"]
    # tokens seen in the SFT phase: the chosen half's (non-padding) tokens, not the rejected replies it skipped
    trainer.state.num_input_tokens_seen = 0
    trainer._track_num_input_tokens(batch)
    assert trainer.state.num_input_tokens_seen == int(batch["attention_mask"][:half].sum())
    del trainer.compute_ref_log_probs
    trainer.state.global_step = 1  # the DPO phase: DPO's loss and metrics
    dpo_loss = trainer.compute_loss(trainer.model, batch)
    assert "rewards/margins" in trainer._metrics["train"] and abs(dpo_loss.item() - loss.item()) > 0.1
    trainer.state.num_input_tokens_seen = 0
    trainer._track_num_input_tokens(batch)
    assert trainer.state.num_input_tokens_seen == int(batch["attention_mask"].sum())


def test_sft_phase_schedule_is_constant_then_the_dpo_schedule(tiny_model_dir, tmp_path):
    """--sft_steps 4 of 10, cosine with warmup 0.1: the SFT phase warms up over ceil(0.4) = 1 step and stays at the
    peak; the 6 DPO steps follow the cosine schedule of a 6-step run with its own warmup, from its start."""
    from transformers import get_scheduler

    trainer = _recipe_trainer(tiny_model_dir, tmp_path, _pairs(), sft_steps=4, max_steps=10)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    peak = trainer.args.learning_rate
    lrs = []
    for _ in range(10):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    alone = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    cosine = get_scheduler("cosine", alone, num_warmup_steps=1, num_training_steps=6)
    expected_dpo = []
    for _ in range(6):
        expected_dpo.append(alone.param_groups[0]["lr"])
        alone.step()
        cosine.step()
    assert lrs[:4] == pytest.approx([peak / 2, peak, peak, peak])
    assert lrs[4:] == pytest.approx(expected_dpo)
    with pytest.raises(ValueError, match="sft_steps: 4 SFT steps leave none of the run's 4 for DPO"):
        _recipe_trainer(tiny_model_dir, tmp_path / "all", _pairs(), sft_steps=4, max_steps=4).create_optimizer_and_scheduler(4)


def test_sft_steps_must_not_be_negative(tmp_path):
    from align.config import build_config

    with pytest.raises(ConfigError, match="sft_steps: expected 0 or more steps, got -1"):
        build_config(_recipe().DPOArgs, {"output_dir": str(tmp_path), "sft_steps": -1})


def test_reference_free_has_nothing_to_precompute(tiny_model_dir, tmp_path):
    from align.config import build_config

    recipe = _recipe()
    with pytest.raises(ConfigError, match="reference_free: there is no reference to precompute"):
        build_config(recipe.DPOArgs, {"output_dir": str(tmp_path), "reference_free": True, "precompute_ref_log_probs": True})


def test_recipe_loss_weights_reach_the_loss(tiny_model_dir, tmp_path):
    """--loss_weights goes to TRL's multi-loss sum: sigmoid,sft weighted 1,0 is DPO alone (ln 2 at the first step,
    policy = reference), weighted 0,1 is the SFT term alone, and 1,1 is their sum."""
    losses = {}
    for weights in ("1.0,0.0", "0.0,1.0", "1.0,1.0"):
        trainer = _recipe_trainer(tiny_model_dir, tmp_path / weights, _pairs(), loss_type="sigmoid,sft", loss_weights=weights)
        assert trainer.args.loss_weights == [float(w) for w in weights.split(",")]
        batch = next(iter(trainer.get_train_dataloader()))
        losses[weights] = trainer.compute_loss(trainer.model, batch).item()
    assert losses["1.0,0.0"] == pytest.approx(torch.tensor(2.0).log().item(), abs=1e-6)
    assert losses["0.0,1.0"] > 1.0  # an untrained tiny model's NLL per token of the chosen reply
    assert losses["1.0,1.0"] == pytest.approx(losses["1.0,0.0"] + losses["0.0,1.0"], rel=1e-5)


def test_cpu_short_run_starts_with_the_sft_phase(monkeypatch):
    """sft_steps none: the CPU short run (no max_steps given) trains its first CPU_SFT_STEPS steps on the SFT term
    alone; a GPU's epochs, or a max_steps the user chose, are plain DPO; a given sft_steps stays."""
    from align.config import build_config

    recipe = _recipe()

    def resolved(on_gpu=False, **fields):
        monkeypatch.setattr(recipe, "on_gpu", lambda: on_gpu)
        cfg = build_config(recipe.DPOArgs, fields)
        notes = recipe.default_sft_steps(cfg)
        assert bool(notes) == (cfg.sft_steps > 0 and "sft_steps" not in fields)  # said when chosen
        return cfg.sft_steps

    assert resolved() == recipe.CPU_SFT_STEPS == 150 and recipe.CPU_MAX_STEPS == 200
    assert resolved(on_gpu=True) == 0
    assert resolved(max_steps=56) == 0
    assert resolved(max_steps=56, sft_steps=20) == 20


def test_cpu_short_run_trades_peak_memory_for_speed(monkeypatch):
    """freed_memory_mmap_mb none: 4 MiB in the CPU short run (no max_steps given), else left for start_run, which
    makes it the lean 1 MiB; a given threshold stays, and with return_freed_memory off nothing is chosen."""
    from align.config import build_config
    from align.models.activations import LEAN_MMAP_MB, SHORT_RUN_MMAP_MB

    recipe = _recipe()

    def resolved(on_gpu=False, **fields):
        monkeypatch.setattr(recipe, "on_gpu", lambda: on_gpu)
        cfg = build_config(recipe.DPOArgs, fields)
        notes = recipe.default_freed_memory(cfg)
        assert bool(notes) == (cfg.freed_memory_mmap_mb is not None and "freed_memory_mmap_mb" not in fields)
        if cfg.return_freed_memory:
            cfg.check_freed_memory()  # start_run's resolution of what is still none
        return cfg.freed_memory_mmap_mb

    assert resolved() == SHORT_RUN_MMAP_MB == 4
    assert resolved(max_steps=56) == LEAN_MMAP_MB == 1
    assert resolved(on_gpu=True) == 1
    assert resolved(freed_memory_mmap_mb=2) == 2
    assert resolved(return_freed_memory=False) is None


def test_cpu_default_weighs_the_dpo_term_a_quarter(monkeypatch):
    """loss_weights none with the default sigmoid,sft becomes 0.25,1.0 on a CPU (the short run's measured best),
    and stays as given for other loss types, given weights, or a GPU."""
    from align.config import build_config

    recipe = _recipe()

    def resolved(on_gpu=False, **fields):
        monkeypatch.setattr(recipe, "on_gpu", lambda: on_gpu)
        cfg = build_config(recipe.DPOArgs, fields)
        notes = recipe.default_loss_weights(cfg)
        assert bool(notes) == (cfg.loss_weights is not None and "loss_weights" not in fields)  # said when chosen
        return cfg.loss_weights

    assert resolved() == [0.25, 1.0] == list(recipe.CPU_LOSS_WEIGHTS)
    assert resolved(on_gpu=True) is None
    assert resolved(loss_type="sigmoid") is None
    assert resolved(loss_type="ipo,sft") is None
    assert resolved(loss_weights="1.0,1.0") == [1.0, 1.0]
