"""The KL coefficient beta of the PPO reward (`advantages.compute_rewards`): fixed, or adapted after every
update towards a target KL. Both keep their state in `state_dict()` for the checkpoint.

References:
    [Ziegler19] Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
        arXiv:1909.08593.
"""

from __future__ import annotations


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; present so the loop can call either controller the same way."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller that steers the measured KL towards `target` [Ziegler19, section 2.2].

        e    = clip(KL / target - 1, -0.2, 0.2)
        beta = beta * (1 + e * n_steps / horizon)

    `n_steps` is the number of samples (responses) the KL was measured on, so `horizon` is in samples,
    as in the paper's code (lm-human-preferences) and TRL. On resume the config gives target and
    horizon; the checkpoint gives the current beta.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
