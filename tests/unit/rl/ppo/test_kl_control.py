"""align.rl.ppo.kl_control: the adaptive controller's update by hand, and both controllers resuming from a state dict."""

from __future__ import annotations

import json

import pytest

from align.rl.ppo.kl_control import AdaptiveKLController, FixedKLController


def test_adaptive_controller_raises_beta_when_kl_is_above_target():
    """KL 6.6, target 6: e = 6.6 / 6 - 1 = 0.1; beta = 0.1 * (1 + 0.1 * 256 / 10000) = 0.1 * 1.00256."""
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    controller.update(current_kl=6.6, n_steps=256)
    assert controller.value == pytest.approx(0.100256, abs=1e-12)


def test_adaptive_controller_lowers_beta_when_kl_is_below_target():
    """KL 5.4, target 6: e = 5.4 / 6 - 1 = -0.1; beta = 0.1 * (1 - 0.1 * 256 / 10000) = 0.1 * 0.99744."""
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    controller.update(current_kl=5.4, n_steps=256)
    assert controller.value == pytest.approx(0.099744, abs=1e-12)


def test_adaptive_controller_clips_the_proportional_error():
    """KL 30, target 6: e = 4 clipped to 0.2; beta = 0.1 * (1 + 0.2 * 500 / 1000) = 0.11.
    KL 0: e = -1 clipped to -0.2; beta = 0.11 * (1 - 0.2 * 500 / 1000) = 0.099."""
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=1000)
    controller.update(current_kl=30.0, n_steps=500)
    assert controller.value == pytest.approx(0.11, abs=1e-12)
    controller.update(current_kl=0.0, n_steps=500)
    assert controller.value == pytest.approx(0.099, abs=1e-12)


def test_controllers_resume_from_state_dict():
    running = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=1000)
    running.update(current_kl=9.0, n_steps=64)
    resumed = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=1000)
    resumed.load_state_dict(json.loads(json.dumps(running.state_dict())))
    for kl in (3.0, 7.5):
        running.update(kl, 64)
        resumed.update(kl, 64)
    assert resumed.value == running.value != 0.2

    fixed = FixedKLController(0.05)
    fixed.update(current_kl=100.0, n_steps=64)
    assert fixed.value == 0.05
    restored = FixedKLController(0.3)
    restored.load_state_dict(fixed.state_dict())
    assert restored.value == 0.05
