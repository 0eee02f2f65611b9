"""Reinforcement learning loops this project owns (TRL's trainers cover the rest): `align.rl.ppo`."""
