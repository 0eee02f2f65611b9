"""The PPO engine in process on the tiny model, for the tests that train it: prompts, a config, a reward the tiny
model can learn, a trainer, and what a reward recipe would have written.

    trainer = trainer_for(tiny_cfg(tiny_model_dir, tmp_path, total_updates=2))
    trainer.train()
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from align.config import build_config
from align.records import PromptRecord
from align.rl.ppo.checkpoint import list_checkpoints
from align.rl.ppo.config import CRITIC, POLICY, PPOArgs
from align.rl.ppo.models import build_models
from align.rl.ppo.trainer import PPOTrainer
from recipe_harness import reproducible

PROMPTS = [PromptRecord(prompt=[{"role": "user", "content": f"say {w}"}], constraints=[{"type": "lowercase"}], source=f"p{i}")
           for i, w in enumerate(("a", "b", "c", "d", "e", "f", "g", "h", "i", "j"))]


def tiny_cfg(model_dir: str, out_dir: Path, **overrides) -> PPOArgs:
    # quantization none: these tests check CPU numerics with CPU tensors; auto would mean 4-bit on cuda:0 on a GPU
    # machine (tests/unit/rl/ppo/test_ppo_adapters.py covers the 4-bit stack)
    values = dict(model_name_or_path=model_dir, sft_dir=None, reward="verifier", dtype="fp32", quantization="none", output_dir=str(out_dir),
                  rollout_batch_size=8, minibatch_size=4, micro_batch_size=2, forward_batch_size=8, response_length=6,
                  total_updates=2, temperature=1.0, report_to="none", lora_r=4, lora_alpha=8, eval_prompts=None, save_steps=100,
                  learning_rate=1e-2, critic_learning_rate=1e-2)
    values.update(overrides)
    return build_config(PPOArgs, values)


def letters_reward(records, responses):
    """Fraction of characters that are lowercase ASCII letters (26 of the tiny tokenizer's 256 bytes)."""
    return [sum("a" <= c <= "z" for c in r) / max(1, len(r)) for r in responses]


def trainer_for(cfg, reward=letters_reward, prompts=PROMPTS, **kwargs) -> PPOTrainer:
    models, _ = build_models(cfg)
    return PPOTrainer(cfg, models, prompts, reward, **kwargs)


def adapter_state(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    state = {n: p.detach().clone() for n, p in trainer.models.model.named_parameters() if f".{POLICY}." in n or f".{CRITIC}." in n}
    state.update({f"value_head.{n}": p.detach().clone() for n, p in trainer.models.value_head.named_parameters()})
    return state


def resume_from_update_2_matches(whole: PPOTrainer, cfg: PPOArgs, whole_dir: Path, out: Path) -> list[list[dict]]:
    """Resume `cfg`'s run from its last checkpoint (update 2), train to the end, and check the adapters are bitwise
    those of the uninterrupted trainer `whole`; returns both runs' reproducible metrics, whole's first."""
    resumed = trainer_for(cfg)
    resumed.load_checkpoint(list_checkpoints(out)[-1])
    assert resumed.update_index == 2
    resumed.train()
    a, b = adapter_state(whole), adapter_state(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    return [[reproducible(json.loads(x)) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (whole_dir, out)]


def make_reward_adapter(base_dir: str, out_dir: Path, seed: int = 0) -> str:
    """What recipes/reward.py writes: a SEQ_CLS LoRA adapter + `score` head (modules_to_save) on `base_dir`.
    The LoRA B matrices and the head are random (not zero) so that the reward adapter changes the model."""
    from align.models.loading import ModelArgs, load_model

    model, tokenizer = load_model(ModelArgs(model_name_or_path=base_dir, dtype="fp32", quantization="none", lora_r=4, lora_alpha=8), task="reward")
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "score" in name:
                p.normal_(0.0, 0.5)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return str(out_dir)
