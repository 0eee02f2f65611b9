"""align: SFT, reward modelling, PPO and DPO for language models on one consumer GPU (or a CPU)."""

__version__ = "0.1.0"
