"""align.trainers.reward_fast: one row per pair gives TRL's reward-model numbers.

The layout by hand, then FastRewardTrainer against TRL's own RewardTrainer on the same batch, weights and LoRA
values (B made non-zero, the score head random), in float32 on a tiny model. The rows run other matmul shapes than
TRL's, so float32 sums round differently: scores agree to 1e-5, the loss to 1e-6, gradients to 1e-4 of each
tensor's largest entry (measured gaps are ~1e-7 relative).
"""

import pytest
import torch
from lora_values import randomize_lora_b

from align.trainers.dpo_fast import CHOSEN, PAD, PROMPT, REJECTED
from align.trainers.reward_fast import pair_rows

GRAD_RTOL = 1e-4


def _trl_batch(examples):
    from trl.trainer.reward_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=0)(examples)


def test_pair_rows_share_the_common_start_by_hand():
    """pair 0: chosen [5 6 7 8], rejected [5 6 9]  -> row [5 6 7 8 9], the rejected part restarts at position 2
    pair 1: chosen [5 6 7], rejected [5 6] (a reply cut short: all of it is the common start) -> row [5 6 7]
    pair 2: chosen [4 7 0] ends with a real pad-id token (pad = 0), rejected [3]: nothing in common
    TRL's rows: chosen 0, 1, 2, then rejected 0, 1, 2. Scores are read at the last non-pad token of each sequence;
    a rejected token past the common start sits after the rest of the chosen sequence. Flat index = row * 5 + column."""
    batch = _trl_batch([
        {"chosen_ids": [5, 6, 7, 8], "rejected_ids": [5, 6, 9]},
        {"chosen_ids": [5, 6, 7], "rejected_ids": [5, 6]},
        {"chosen_ids": [4, 7, 0], "rejected_ids": [3]},
    ])
    rows = pair_rows(batch["input_ids"], batch["attention_mask"], pad_token_id=0)
    assert rows["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 0], [4, 7, 0, 3, 0]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 0, 0], [0, 1, 2, 0, 0]]
    assert rows["branch"].tolist() == [[PROMPT, PROMPT, CHOSEN, CHOSEN, REJECTED], [PROMPT, PROMPT, CHOSEN, PAD, PAD],
                                       [CHOSEN, CHOSEN, CHOSEN, REJECTED, PAD]]
    assert rows["score_index"].tolist() == [3, 5 + 2, 10 + 1, 4, 5 + 1, 10 + 3]


def _pairs():
    """Pairs whose rejected reply shares a start with the chosen one in several ways: none, a sentence, all of a
    shorter reply (cut short), all of the chosen reply plus a postscript."""
    from align.records import PreferencePair

    topics = ["cats", "the sea", "bread", "trains", "chess", "rain"]
    pairs = []
    for i, t in enumerate(topics):
        chosen = f"{t.capitalize()} are interesting. " * (1 + i % 3) + "That is all."
        rejected = ["I do not know." + " Sorry." * (i % 4), chosen[: len(chosen) // 2], chosen + "\n\nP.S. Bye.",
                    f"{t.capitalize()} are interesting. I do not care."][i % 4]
        pairs.append(PreferencePair(prompt=[{"role": "user", "content": f"Tell me about {t}." + " Be brief." * (i % 3)}],
                                    chosen=chosen, rejected=rejected))
    return pairs


def _trainer(model_dir, share_prompt, tmp_path, fast_class=True):
    """A fresh tiny LoRA reward model (same seed: same LoRA and head init), the same non-zero LoRA B in each."""
    import transformers
    from trl import RewardConfig, RewardTrainer

    from align.data.load import to_hf_dataset
    from align.models.loading import ModelArgs, load_model
    from align.trainers.reward_fast import FastRewardTrainer

    transformers.set_seed(0)
    model, tokenizer = load_model(ModelArgs(model_name_or_path=model_dir, dtype="fp32", quantization="none", lora_r=4,
                                            lora_alpha=8), task="reward")
    args = RewardConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=6, max_length=1024, use_cpu=True,
                        bf16=False, report_to=[], save_strategy="no", logging_steps=1, max_steps=2, learning_rate=5e-2, seed=0)
    common = dict(model=model, args=args, train_dataset=to_hf_dataset(_pairs()), processing_class=tokenizer)
    trainer = FastRewardTrainer(**common, share_prompt=share_prompt) if fast_class else RewardTrainer(**common)
    randomize_lora_b(trainer.model)
    return trainer


def _loss_and_grads(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad()
    loss, outputs = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if isinstance(v, list)}
    return loss.detach(), outputs.logits.detach(), grads, metrics


def test_fast_reward_trainer_matches_trl(tiny_model_dir, tmp_path):
    stock = _trainer(tiny_model_dir, False, tmp_path / "stock", fast_class=False)
    fast = _trainer(tiny_model_dir, True, tmp_path / "fast")
    batch = next(iter(stock.get_train_dataloader()))
    fast_batch = next(iter(fast.get_train_dataloader()))
    assert torch.equal(batch["input_ids"], fast_batch["input_ids"])  # same rows, same order

    rows = pair_rows(batch["input_ids"], batch["attention_mask"], fast._pad_token_id)
    assert rows["input_ids"].numel() < 0.8 * batch["input_ids"].numel()  # the shared starts are computed once

    loss, scores, grads, metrics = _loss_and_grads(stock, batch)
    fast_loss, fast_scores, fast_grads, fast_metrics = _loss_and_grads(fast, fast_batch)
    assert scores.shape == fast_scores.shape == (12, 1) and scores.std() > 1e-3  # a real, non-constant score
    torch.testing.assert_close(fast_scores, scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast_loss, loss, rtol=0, atol=1e-6)
    assert grads.keys() == fast_grads.keys() and any("score" in n for n in grads) and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=0, atol=GRAD_RTOL * grad.abs().max().item() + 1e-12, msg=name)
    for key in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward", "num_tokens"):
        assert fast_metrics[key] == pytest.approx(metrics[key], abs=1e-5), key


def test_share_prompt_off_is_trl(tiny_model_dir, tmp_path):
    stock = _trainer(tiny_model_dir, False, tmp_path / "stock", fast_class=False)
    off = _trainer(tiny_model_dir, False, tmp_path / "off")
    batch = next(iter(stock.get_train_dataloader()))
    loss, scores, grads, _ = _loss_and_grads(stock, batch)
    off_loss, off_scores, off_grads, _ = _loss_and_grads(off, batch)
    assert torch.equal(off_scores, scores) and torch.equal(off_loss, loss)
    assert all(torch.equal(off_grads[n], g) for n, g in grads.items())


def test_a_prompt_learning_adapter_falls_back_with_one_warning(tiny_model_dir, tmp_path):
    import transformers
    from trl import RewardConfig

    from align.data.load import to_hf_dataset
    from align.models.loading import ModelArgs, load_model
    from align.trainers.reward_fast import FastRewardTrainer

    transformers.set_seed(0)
    model, tokenizer = load_model(ModelArgs(model_name_or_path=tiny_model_dir, dtype="fp32", quantization="none",
                                            peft="prompt_tuning", num_virtual_tokens=4), task="reward")
    args = RewardConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_length=128, use_cpu=True,
                        bf16=False, report_to=[], save_strategy="no", max_steps=1)
    with pytest.warns(UserWarning, match="prompt-learning adapter"):
        trainer = FastRewardTrainer(model=model, args=args, train_dataset=to_hf_dataset(_pairs()), processing_class=tokenizer)
    assert not trainer._share_prompt


def test_recipe_builds_the_fast_trainer(tiny_model_dir, tmp_path):
    from align.config import build_config
    from align.data.load import to_hf_dataset
    from align.models.loading import load_model
    from align.trainers.reward_fast import FastRewardTrainer
    from bench.harness.trainers import load_recipe

    module = load_recipe("reward")
    cfg = build_config(module.RewardArgs, dict(model_name_or_path=tiny_model_dir, output_dir=str(tmp_path / "out"),
                                               dtype="fp32", report_to="none", max_steps=1, return_freed_memory=False))
    model, tokenizer = load_model(cfg, task="reward")
    trainer = module.build_trainer(cfg, model, tokenizer, to_hf_dataset(_pairs()), [])
    assert isinstance(trainer, FastRewardTrainer) and trainer._share_prompt


def test_recipe_learning_rate_is_chosen_by_hardware(monkeypatch, tmp_path):
    """learning_rate none: 1e-3 for a CPU's short run, 1e-4 on a GPU, as the DPO recipe's (at 1e-4 the pipeline's 24
    CPU steps left a reward model near chance on held-out pairs); a rate given on the command line is kept."""
    from align.config import build_config
    from align.trainers import common
    from bench.harness.trainers import load_recipe

    module = load_recipe("reward")
    cfg = build_config(module.RewardArgs, dict(output_dir=str(tmp_path / "a"), report_to="none"))
    assert cfg.learning_rate is None
    notes = common.apply_hardware_defaults(cfg, 40, module.LEARNING_RATES)
    assert cfg.learning_rate == (1e-4 if torch.cuda.is_available() else 1e-3)
    assert any(note.startswith(f"learning_rate={cfg.learning_rate:g} ") for note in notes), notes
    given = build_config(module.RewardArgs, dict(output_dir=str(tmp_path / "b"), report_to="none", learning_rate=5e-5))
    common.apply_hardware_defaults(given, 40, module.LEARNING_RATES)
    assert given.learning_rate == 5e-5
    monkeypatch.setattr(common, "on_gpu", lambda: True)
    assert common.hardware_learning_rate(module.LEARNING_RATES) == 1e-4


@pytest.mark.parametrize("peft", ["lora", "prompt_tuning"])
def test_score_pairs_equals_scoring_each_text(tiny_model_dir, peft):
    """align.models.reward_model.score_pairs (the recipe's held-out accuracy) gives score_texts' scores, one row per
    pair with LoRA, and score_texts itself where a pair cannot be one row (a prompt-learning adapter)."""
    import transformers

    from align.models.loading import ModelArgs, load_model
    from align.models.reward_model import score_pairs, score_texts

    transformers.set_seed(0)
    model, tokenizer = load_model(ModelArgs(model_name_or_path=tiny_model_dir, dtype="fp32", quantization="none", lora_r=4,
                                            lora_alpha=8, peft=peft, num_virtual_tokens=4), task="reward")
    randomize_lora_b(model)
    model.eval()
    pairs = _pairs()
    prompts, chosen, rejected = [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs]
    got_chosen, got_rejected = score_pairs(model, tokenizer, prompts, chosen, rejected, batch_size=4)
    want_chosen = score_texts(model, tokenizer, prompts, chosen, batch_size=4)
    want_rejected = score_texts(model, tokenizer, prompts, rejected, batch_size=4)
    assert torch.tensor(want_chosen + want_rejected).std() > 1e-3
    torch.testing.assert_close(torch.tensor(got_chosen), torch.tensor(want_chosen), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got_rejected), torch.tensor(want_rejected), rtol=0, atol=1e-5)


def test_held_out_accuracy_after_training_is_computed_as_before(tiny_model_dir, prepare_as_trainer):
    """The reward recipe scores the held-out pairs before training on the plain model and after it on
    trainer.model, whose forward a Trainer with bf16=True has wrapped (accelerate: autocast, outputs to float32; the
    float32 score head would then run in bf16). held_out_accuracy sets the wrapper aside: the same numbers."""
    import transformers
    from align.models.loading import ModelArgs, load_model
    from bench.harness.trainers import load_recipe

    module = load_recipe("reward")
    transformers.set_seed(0)
    model, tokenizer = load_model(ModelArgs(model_name_or_path=tiny_model_dir, dtype="bf16", quantization="none", lora_r=4,
                                            lora_alpha=8), task="reward")
    randomize_lora_b(model)
    model.eval()
    before = module.held_out_accuracy(model, tokenizer, _pairs(), batch_size=4)
    prepare_as_trainer(model)
    assert "_original_forward" in vars(model)  # the wrapper is on
    assert module.held_out_accuracy(model, tokenizer, _pairs(), batch_size=4) == before
