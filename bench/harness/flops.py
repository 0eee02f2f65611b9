"""Model FLOPs of the benchmarked stages, and the matmul peak that MFU is measured against (see stage.py)."""

from __future__ import annotations

import math
import time

from .meter import sync

FLOPS_PER_TOKEN = {"full": 6, "lora": 4, "forward": 2}


def matmul_params(model) -> int:
    """N: parameters that take part in a matmul for every token.

    Every parameter of the base model once (tied weights once), minus the input embedding, which is a
    table lookup, plus the output embedding when it is tied to the input one (then it is the LM head's
    matmul). LoRA adapters and PEFT's trainable copies (`modules_to_save`) are left out: with rank 16
    they add ~4% on a 135M model, and 4N already counts the base forward and backward they ride on.
    """
    def base(name: str) -> bool:
        return "lora_" not in name and "modules_to_save" not in name

    seen, total = set(), 0
    for name, p in model.named_parameters():
        if base(name) and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    return total - (0 if tied else embed.numel())


def stage_flops(n_params: int, trained_tokens: int, forward_tokens: int, lora: bool) -> float:
    """Model FLOPs: (4N with LoRA, else 6N) per trained token plus 2N per forward-only token.

    >>> stage_flops(1000, trained_tokens=10, forward_tokens=5, lora=True)   # 4*1000*10 + 2*1000*5
    50000
    """
    per_trained = FLOPS_PER_TOKEN["lora" if lora else "full"]
    return per_trained * n_params * trained_tokens + FLOPS_PER_TOKEN["forward"] * n_params * forward_tokens


def ppo_phase_flops(n_params: int, n_head: int, prompt_tokens: int, new_tokens: int, ppo_epochs: int,
                    shared_critic: bool = False) -> dict[str, float]:
    """Model FLOPs of one PPO update's phases (align.rl.ppo: LoRA policy and critic on one frozen base).

    n_params is the base's N (`matmul_params`), n_head the LM head's part of it (vocabulary x hidden); the
    decoder is D = N - n_head. P prompt and R response tokens (real tokens, padding left out). Every pass
    runs the decoder on all P + R tokens. The LM head runs only where a response token is predicted, R
    positions: generate() keeps the last position's logits (transformers' logits_to_keep=1), the policy and
    reference forwards apply it to the response positions only, and the critic has none (its value head,
    hidden x 1, is left out, as are the LoRA adapters):
        generate  2D(P + R) + 2 n_head R                  KV cache: each token through the decoder once
        score     3 x 2D(P + R) + 2 x 2 n_head R          policy, reference, critic (a verifier is free)
        update    ppo_epochs x (4D(P + R) + 4 n_head R  +  4D(P + R))    policy, critic (4: LoRA, see stage_flops)
    With a shared critic (--critic shared) the values come from the policy's passes: score has 2 decoder passes,
    update 1.

    >>> ppo_phase_flops(1100, 100, prompt_tokens=8, new_tokens=2, ppo_epochs=1)["update"]  # 8*1000*10 + 4*100*2
    80800
    """
    decoder, seq = n_params - n_head, prompt_tokens + new_tokens
    forward, trained = FLOPS_PER_TOKEN["forward"], FLOPS_PER_TOKEN["lora"]
    passes = 1 if shared_critic else 2  # policy and reference score, (+ critic); the update trains policy (+ critic)
    return {
        "generate": forward * (decoder * seq + n_head * new_tokens),
        "score": (passes + 1) * forward * decoder * seq + 2 * forward * n_head * new_tokens,
        "update": ppo_epochs * (passes * trained * decoder * seq + trained * n_head * new_tokens),
    }


def pass_flops(n_params: int, n_head: int, tokens: int, head_tokens: int, per_token: int) -> float:
    """Model FLOPs of one pass of a causal LM: the decoder (N - n_head) on `tokens` real tokens, the LM head
    (n_head, vocabulary x hidden) on the `head_tokens` of them whose logits are used; `per_token` is 2 for a
    forward-only pass, 4 for a LoRA training pass, 6 for full fine-tuning (see stage_flops).

    >>> pass_flops(1100, 100, tokens=10, head_tokens=4, per_token=4)   # 4 * (1000 * 10 + 100 * 4)
    41600
    """
    return per_token * ((n_params - n_head) * tokens + n_head * head_tokens)


def matmul_peak_flops(device: str = "cpu", dtype_name: str = "fp32", size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a (size x size) @ (size x size) matmul in `dtype` on `device` (2 size^3 FLOPs each)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = math.inf
    for _ in range(repeats + 1):  # the first one warms up
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def machine_peak(device: str, dtype: str) -> float:
    """The matmul peak MFU is measured against: on a CPU the better of torch's default threads and one
    thread (on a loaded machine one thread can be faster, and an arm may train with one)."""
    import torch

    default = torch.get_num_threads()
    peak = matmul_peak_flops(device, dtype)
    if device == "cpu" and default > 1:
        torch.set_num_threads(1)
        peak = max(peak, matmul_peak_flops(device, dtype))
        torch.set_num_threads(default)
    return peak

