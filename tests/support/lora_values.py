"""Non-zero LoRA B values for equivalence tests: a fresh adapter computes nothing (B = 0), so a fast path that got an
index wrong would still match; with random B the policy (or the reward model) differs from its base."""

import torch


def randomize_lora_b(model, scale: float = 0.3, seed: int = 1) -> None:
    """Set every LoRA B matrix of `model` (default adapter) to `scale` x standard normal values from `seed`, in
    parameter order, so two models built the same way get the same values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.copy_(scale * torch.randn(p.shape, generator=generator))
