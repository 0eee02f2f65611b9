"""Training on TRL: what every TRL-based recipe shares (common), the fast DPO and SFT paths, GRPO rewards, and the phase events."""
