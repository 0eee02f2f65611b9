"""The bench's trl-ppo arm: TRL 0.11's classic PPOTrainer (the one LLaMA-Factory and many users still pin) as a PPO
baseline beside align's engine.

    python bench/run.py --stage ppo --compare trl-ppo,align --steps 3

- venv.py: OUTPUT/trl-ppo-venv, `python -m venv --system-site-packages` (this torch) with trl 0.11.4, transformers
  4.46.3, peft 0.13.2, accelerate 1.0.1 and what they need pinned inside; built by the parent before any run, once
  (a marker holds the pins), then reused.
- arm.py: the run, in that venv's python, as `run_child` of bench/harness/runs.py calls it (align is imported from the
  checkout: it imports under trl 0.11). AutoModelForCausalLMWithValueHead with a peft LoRA config, the reference =
  the same base with the adapter off (`ref_model=None`), as LLaMA-Factory does; per step `generate`, the verifier,
  `step(queries, responses, scores)`.
- settings.py: the pure parts (our PPOArgs as PPOConfig, FLOPs, the table's first-update lines), tested offline.

What the two share: the model (its safetensors folder; the transformers-5 config's RoPE and tokenizer read for 4.46),
the prompts and their order per update (align's `batch_records`), the chat template, response length, sampling
(temperature, no top-k/top-p, align's per-row seeded Gumbel sampler, one generate() for the batch: the first update
samples the same responses where both forwards agree; the table counts them: 6 of 8 on the default model once), the verifier reward (raw, as the align arm's), rollout batch,
minibatch, micro-batch, ppo_epochs, LoRA (r, alpha, targets, dropout 0, B = 0), learning rate, the fixed KL
coefficient with the k1 estimator, GAE (gamma, lambda), advantage whitening over the batch, clip ranges, gradient
clipping norm, dtype (bf16 weights where align uses bf16), threads, a critic that starts at 0.

Where the objectives differ (TRL 0.11's design, left as it is):
- Critic: TRL's value head sits on the policy's trunk and LoRA adapter and trains through one loss
  pg + 0.1 vf at the policy's learning rate; align's critic is its own LoRA adapter on the shared base with its own
  loss and learning rate (2e-4). So after the first optimizer step the values, and through GAE the advantages, differ.
- Temperature: TRL's log-probs (ratio, KL) come from logits at T = 1 while sampling at T = 0.7; align's divide by T.
  At the first update both KLs are exactly 0 (B = 0); later TRL's ratio and KL are those of another distribution.
- Reported losses: TRL averages the minibatches' token means; align weights them by tokens. The arm records both
  (`loss`/`value_loss` token-weighted as align's, `trl_policy_loss`/`trl_value_loss` TRL's own).
- Gradient clipping: TRL clips policy and value head together; align clips policy and critic apart.
- TRL skips a minibatch whose mean ratio exceeds 10; align warns (health_max_ratio).
- Memory and FLOPs, not objective: TRL's value-head model casts the logits of every position (prompt included) to
  fp32 and keeps them for the minibatch; align takes fp32 log-probs of response positions only, in chunks. TRL scores
  in mini_batch_size rows; glibc's malloc as TRL's users run it (align's mmap threshold is one of align's levers).
Timing: TRL's step is one call; its own timers split it into score (forward_pass + compute_rewards, plus the
verifier) and update (optimize_step); the rest of it is "other". Its peak memory is the step's, for both phases.
"""
