"""Models: loading, quantization and LoRA; chat templates; the reward model; architecture facts; the fused LM head; activation memory."""
