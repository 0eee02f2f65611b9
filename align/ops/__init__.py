"""Pure tensor functions shared by DPO, evaluation and PPO: log-probs, masked statistics, KL, EOS truncation."""
