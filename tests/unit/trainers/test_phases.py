"""Phase events (align.trainers.phases): the trainers report their phases themselves, in order, to whoever listens.

The bench measures through these events only, so a phase that stops being reported fails here (and in
tests/unit/bench/test_bench_harness.py's PPOSteps test) instead of silently dropping out of the measurements.
"""

from __future__ import annotations


import pytest

from align.trainers.phases import notify, reported_phase
from repo_paths import REPO


class Listener:
    """Records every event it hears, as (event, name) pairs."""

    def __init__(self):
        self.events: list[tuple[str, object]] = []

    def on_phase_start(self, name):
        self.events.append(("start", name))

    def on_phase_end(self, name):
        self.events.append(("end", name))

    def on_log(self, metrics, rollout):
        self.events.append(("log", len(rollout)))


def test_reported_phase_ends_the_phase_when_the_block_raises():
    listener, deaf = Listener(), object()  # a listener without the methods is skipped
    with pytest.raises(ValueError):
        with reported_phase([listener, deaf], "score"):
            raise ValueError("boom")
    assert listener.events == [("start", "score"), ("end", "score")]
    notify([deaf, listener], "on_phase_start", "x")
    assert listener.events[-1] == ("start", "x")


def test_ppo_trainer_reports_every_phase_of_every_update_in_order(tiny_model_dir, tmp_path):
    """Two updates of 8 rollouts: generate, score, advantages, update, then on_log with the update's rollout
    (8 rows on one process), twice; and each phase's own seconds are in the metrics."""
    from ppo_engine import tiny_cfg, trainer_for

    listener = Listener()
    trainer = trainer_for(tiny_cfg(tiny_model_dir, tmp_path, total_updates=2), callbacks=[listener])
    trainer.train()
    one_update = [(event, phase) for phase in ("generate", "score", "advantages", "update") for event in ("start", "end")]
    assert listener.events == (one_update + [("log", 8)]) * 2
    for metrics in trainer.history:
        assert all(metrics[f"time/{phase}_s"] > 0 for phase in ("generate", "score", "advantages", "update")), metrics


def test_dpo_recipe_reports_its_precomputed_reference_as_a_phase(tiny_model_dir, tmp_path):
    """TRL computes precomputed reference log-probs inside DPOTrainer.__init__, where no TrainerCallback event
    fires; the recipe's trainer reports them as the phase precompute_ref to its callbacks (and does not when
    the reference is computed on each step's batch, the recipe's default)."""
    from test_dpo_fast import _pairs, _recipe

    from align.config import build_config
    from align.data.load import to_hf_dataset
    from align.models.loading import load_model
    from transformers import TrainerCallback

    class Heard(TrainerCallback, Listener):
        def __init__(self):
            Listener.__init__(self)

    recipe = _recipe()
    for precompute, expected in ((True, [("start", "precompute_ref"), ("end", "precompute_ref")]), (False, [])):
        cfg = build_config(recipe.DPOArgs, {"model_name_or_path": tiny_model_dir, "output_dir": str(tmp_path / str(precompute)),
                                            "max_steps": 1, "report_to": "none", "max_length": 128, "lora_r": 4, "cpu_threads": -1,
                                            "precompute_ref_log_probs": precompute})
        model, tokenizer = load_model(cfg)
        heard = Heard()
        trainer = recipe.build_trainer(cfg, model, tokenizer, to_hf_dataset(_pairs()), [heard])
        assert heard.events == expected
        assert ("ref_chosen_logps" in trainer.train_dataset.column_names) == precompute


def test_grpo_recipe_reports_generation_inside_scoring_and_every_log_prob_pass(tiny_model_dir, tmp_path):
    """One GRPO step of the recipe's trainer (2 prompts x 2 replies of up to 8 tokens, beta 0.05: a reference
    pass): "generate" opens and closes inside "generate_and_score", the tokens generated follow it, the
    reference pass (no grad) falls inside generate_and_score and the loss's pass (with grad) after it."""
    import importlib.util

    from transformers import TrainerCallback

    from align.config import build_config
    from align.models.loading import load_model
    from align.records import PromptRecord
    from align.trainers.grpo import parse_rewards, prompt_dataset

    class Heard(TrainerCallback, Listener):
        def __init__(self):
            Listener.__init__(self)

        def on_generated(self, prompt_tokens, completion_tokens):
            self.events.append(("generated", (prompt_tokens > 0, completion_tokens > 0)))

        def on_forward(self, tokens, head_tokens, with_grad):
            assert 0 < head_tokens <= tokens
            self.events.append(("forward", with_grad))

    spec = importlib.util.spec_from_file_location("recipe_grpo", REPO / "recipes" / "grpo.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    cfg = build_config(recipe.GRPOArgs, {"model_name_or_path": tiny_model_dir, "output_dir": str(tmp_path), "max_steps": 1,
                                         "report_to": "none", "num_generations": 2, "per_device_train_batch_size": 4,
                                         "max_completion_length": 8, "max_length": 128, "dtype": "fp32", "lora_r": 4,
                                         "cpu_threads": -1, "save_steps": 100, "eval_data": None, "reward_guard": False})
    records = [PromptRecord([{"role": "user", "content": f"say {w}"}], constraints=[{"type": "lowercase"}], source=f"p{i}")
               for i, w in enumerate("ab")]
    model, tokenizer = load_model(cfg, lora=False)
    heard = Heard()
    trainer = recipe.build_trainer(cfg, model, tokenizer, prompt_dataset(records),
                                   recipe.build_reward_funcs(cfg, parse_rewards(cfg.reward), records), [heard])
    trainer.train()
    events = heard.events
    outer = (events.index(("start", "generate_and_score")), events.index(("end", "generate_and_score")))
    inner = (events.index(("start", "generate")), events.index(("end", "generate")))
    assert outer[0] < inner[0] < inner[1] < outer[1], events
    assert events[inner[1] + 1] == ("generated", (True, True)), events
    assert ("forward", False) in events[inner[1]:outer[1]], "the reference pass, inside scoring"
    assert ("forward", True) in events[outer[1]:], "the loss's pass, after scoring"
