def zero(prompts, responses):
    """The ablation's reward: 0 for every reply (PPO-ptx's likelihood term alone, with the KL penalty)."""
    return [0.0] * len(responses)
