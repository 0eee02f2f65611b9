"""The trl-ppo arm's pure parts: our PPO settings as TRL 0.11's PPOConfig, its phases' FLOPs, and the first-update
comparison lines of the bench's table. Imports no TRL, so the tests run without the venv."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from bench.harness.flops import pass_flops


def trl_ppo_config(cfg: Any, steps: int) -> dict[str, Any]:
    """TRL 0.11 `PPOConfig(**kwargs)` for our PPOArgs `cfg`: the same batch, minibatch, epochs, learning rate, clip
    ranges, GAE, fixed KL coefficient and gradient clipping.

    TRL's `mini_batch_size` is the rows of one forward/backward and `gradient_accumulation_steps` of them make one
    optimizer step, so our micro_batch_size and minibatch_size map to those two. Left at TRL's values, and so
    differing from align (see bench/trl_ppo/__init__.py): vf_coef 0.1 (the value head shares the policy's trunk
    and adapter), scoring forwards of mini_batch_size rows, no temperature in the log-probs.
    """
    if cfg.kl_target is not None:
        raise ValueError("trl-ppo: kl_target: TRL 0.11's adaptive KL (target, horizon) is not ours; the arm runs a fixed kl_coef")
    if cfg.kl_estimator != "k1" or cfg.whiten_rewards or cfg.missing_eos_penalty is not None:
        raise ValueError("trl-ppo: kl_estimator k1, whiten_rewards false and no missing_eos_penalty are the settings the arm maps")
    return {
        "seed": cfg.seed, "learning_rate": cfg.learning_rate, "batch_size": cfg.rollout_batch_size,
        "mini_batch_size": cfg.micro_batch_size, "gradient_accumulation_steps": cfg.minibatch_size // cfg.micro_batch_size,
        "ppo_epochs": cfg.ppo_epochs, "steps": steps, "cliprange": cfg.cliprange,
        # TRL clips the value always; ours may not (None): a range wider than any return is no clip
        "cliprange_value": cfg.cliprange_value if cfg.cliprange_value is not None else 1e9,
        "gamma": cfg.gamma, "lam": cfg.lam, "adap_kl_ctrl": False, "init_kl_coef": cfg.kl_coef, "kl_penalty": "kl",
        "whiten_rewards": False, "max_grad_norm": cfg.max_grad_norm, "gradient_checkpointing": cfg.gradient_checkpointing,
        "early_stopping": False, "use_score_scaling": False, "use_score_norm": False, "log_with": None,
        "exp_name": "bench-trl-ppo", "remove_unused_columns": False,
    }


def trl_phase_flops(n_params: int, n_head: int, prompt_tokens: int, new_tokens: int, ppo_epochs: int) -> dict[str, float]:
    """Model FLOPs of one TRL 0.11 PPO step's phases (`pass_flops` for each pass; cf. bench.harness.flops.ppo_phase_flops).

    TRL's value head sits on the policy's last hidden state, so one pass gives log-probs and values: scoring is
    two forwards (policy with values, reference), an update one forward and backward per epoch. TRL's
    batched_forward_pass applies the LM head to every position, prompt included (P + R):
        generate  2D(P + R) + 2 n_head R
        score     2 x (2D(P + R) + 2 n_head (P + R))
        update    ppo_epochs x (4D(P + R) + 4 n_head (P + R))

    >>> trl_phase_flops(1100, 100, prompt_tokens=8, new_tokens=2, ppo_epochs=1)["update"]  # 4*(1000*10 + 100*10)
    44000
    """
    seq = prompt_tokens + new_tokens
    return {
        "generate": pass_flops(n_params, n_head, seq, new_tokens, per_token=2),
        "score": 2 * pass_flops(n_params, n_head, seq, seq, per_token=2),
        "update": ppo_epochs * pass_flops(n_params, n_head, seq, seq, per_token=4),
    }


def response_hashes(responses: list[list[int]]) -> list[str]:
    """A short digest of each response's token ids (up to and including EOS): two arms sampled the same response
    for a prompt when the digests agree.

    >>> response_hashes([[1, 2], [1, 2]]) == response_hashes([[1, 2], [1, 2]]), len(response_hashes([[5]])[0])
    (True, 12)
    """
    return [hashlib.sha1(json.dumps(list(map(int, ids))).encode()).hexdigest()[:12] for ids in responses]


def first_update_lines(runs: list[dict]) -> list[str]:
    """The table's lines comparing the first update of every PPO run that records it (align and trl-ppo):
    mean score, KL, policy and value loss, and the first response tokens for a same-rollout check."""
    rows = [r for r in runs if "error" not in r and r.get("stage") == "ppo" and r.get("steps") and "kl" in r["steps"][0]]
    lines = []
    for r in rows:
        first = r["steps"][0]
        own = (f" (TRL's own, the minibatches' plain mean: {first['trl_policy_loss']:.4f}, {first['trl_value_loss']:.4f})"
               if "trl_policy_loss" in first else "")
        lines.append(f"ppo {r['arm']} run {r['run']}, first update: score {first['score']:.4f} | kl {first['kl']:.4f} | "
                     f"policy loss {first['loss']:.4f} | value loss {first['value_loss']:.4f} (token-weighted){own}")
    hashes = [r["steps"][0]["response_hashes"] for r in rows if r["run"] == 1 and r["steps"][0].get("response_hashes")]
    if len(hashes) == 2:
        same = sum(a == b for a, b in zip(*hashes))
        lines.append(f"ppo first update: {same} of {len(hashes[0])} responses the same token for token in both arms")
    return lines
