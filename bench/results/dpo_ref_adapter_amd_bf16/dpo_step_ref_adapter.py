"""One DPO step of the recipe's trainer (default model, recipe defaults: 4 pairs a batch, max_length 384, DPO from
the first step) with the reference through TRL's "ref" copy of the fresh adapter against the adapter disabled (the
copy dropped, align.trainers.dpo_fast.drop_idle_ref_adapter), in one process, alternating on the same batches:
the reference forward alone and the whole step (loss + backward). No optimizer step: both arms see the same weights.

    python dpo_step_ref_adapter.py      (from a checkout, align importable)
"""
import time

import torch

from align.config import build_config
from align.data.load import to_hf_dataset
from align.models.loading import load_model
from align.trainers.common import load_records
from bench.harness.trainers import load_recipe

torch.set_num_threads(2)
recipe = load_recipe("dpo")
cfg = build_config(recipe.DPOArgs, dict(output_dir="/tmp/dpo_step_ref_adapter", report_to="none", max_steps=10, sft_steps=0,
                                        summary_prompts=0))
model, tokenizer = load_model(cfg)
train_pairs, _ = load_records(cfg, "prefs", tokenizer)
trainer = recipe.build_trainer(cfg, model, tokenizer, to_hf_dataset(train_pairs[:40]), [])
model = trainer.model
print("adapters after build:", list(model.peft_config), flush=True)


def add_ref_copy():  # as trl's DPOTrainer.__init__ does
    model.add_adapter("ref", model.peft_config["default"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".default." in name:
                model.get_parameter(name.replace(".default.", ".ref.")).copy_(param)


def timed(batch):
    model.train()
    t = time.perf_counter()
    trainer.compute_ref_log_probs(model, batch)
    ref_s = time.perf_counter() - t
    model.zero_grad()
    t = time.perf_counter()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return ref_s, time.perf_counter() - t, loss.item()


batches = [b for _, b in zip(range(4), trainer.get_train_dataloader())]
timed(batches[0])  # warm-up
for i, batch in enumerate(batches):
    add_ref_copy()
    with_ref = timed(batch)
    model.delete_adapter("ref")
    without = timed(batch)
    print(f"batch {i} ({batch['input_ids'].shape[1]} tokens wide): reference forward {with_ref[0]:.2f} s through 'ref', "
          f"{without[0]:.2f} s disabled ({with_ref[0] / without[0]:.2f}x); step {with_ref[1]:.2f} s against {without[1]:.2f} s "
          f"({with_ref[1] / without[1]:.2f}x); loss {with_ref[2]:.6f} / {without[2]:.6f}", flush=True)
