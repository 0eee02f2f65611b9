"""The PPO engine: one base model carries the policy, the critic and the reward model as LoRA adapters.

    from align.rl.ppo.models import build_models
    from align.rl.ppo.rewards import reward_function
    from align.rl.ppo.trainer import PPOTrainer

    models, plan = build_models(cfg, dist=dist)           # the base once + adapters, heads, tokenizer
    reward_fn = reward_function(cfg, plan, models)        # shared adapter, separate model or a function
    trainer = PPOTrainer(cfg, models, prompts, reward_fn, dist=dist)
    summary = trainer.train()                             # recipes/ppo.py is the runnable version

The modules, in the order a run meets them:
    config.py      PPOArgs: every setting, its default and its help text
    dist.py        Dist: this process's rank among the run's processes, and the collectives the loop needs
    models.py      the base, the adapters and heads on it (PPOModels), adapter_phase, the reward plan
    rewards.py     the reward as one call: a shared adapter, a separate reward model or a Python function
    rollout.py     phases 1 and 2: sample responses (GumbelSampler), score them (log-probs, values, reward)
    advantages.py  phase 3: KL-penalised rewards, GAE and whitening over the global batch
    kl_control.py  the KL coefficient of those rewards: fixed or adaptive
    losses.py      phase 4's losses: the clipped policy surrogate and the clipped value loss
    trainer.py     PPOTrainer: the loop, phase 4 (the update) and the events it reports (align.trainers.phases)
    health.py      phase 5: per-update metrics and the checks on them
    heldout.py     greedy replies to held-out prompts before and after training
    checkpoint.py  adapters, optimizer and RNG state on disk; resume
The math is pure functions with shapes and citations: advantages.py, losses.py, kl_control.py here, and
align.ops (log-probs, masked statistics, KL estimators, EOS truncation) shared with DPO and evaluation.

One base, several adapters (the base is the SFT model; 4-bit on a GPU):
    policy      LoRA adapter "policy" and the base's lm_head; trained
    critic      LoRA adapter "critic" and a value head; trained. Initialised from the reward model when the
                reward model shares the base (same LoRA weights, value head = score head), else fresh.
                With --critic shared there is no critic adapter: a fresh value head reads the policy's last
                hidden state, and the policy's pass is trained on pg_loss + vf_coef * vf_loss (TRL's design)
    reward      LoRA adapter "reward" and the score head of the reward recipe's output; frozen
    reference   the base with every adapter disabled
`adapter_phase` is the only way the engine switches between them: inside it exactly one adapter is
active (none for the reference) and only a trainable phase's own parameters have requires_grad.

The reward can also be a separate reward model (another checkpoint, even another tokenizer: responses
are decoded to text and re-encoded with its tokenizer) or a Python function
`fn(prompt_records, responses) -> list[float]`; the built-in verifier (align.evaluation.verifier) is one.

Each update (PPOTrainer.run_update) runs five phases; the math is a call into those pure functions:
    1. generate              one sampled response per prompt (pure sampling at `temperature`)
    2. score                 old and reference log-probs and values once per rollout (no grad); reward
    3. estimate advantages   KL-penalised rewards, GAE, whitening over the global batch
    4. update                `ppo_epochs` epochs of shuffled minibatches, gradient accumulation, clipping
    5. log                   metrics.jsonl, TensorBoard, health checks, checkpoints

Sampling. Each response is a function of (seed, update, its index in the global batch) alone:
`GumbelSampler` draws every row's next token as argmax(logits / T + Gumbel noise) with that row's own
generator, which samples exactly from softmax(logits / T) (the Gumbel-max trick). A batch split across
two processes therefore samples the same tokens as one process, and resuming needs no sampler state. A row
stops computing once it has written EOS (align.models.generation.decode_ids; only its own generator advances, so
its draws are the ones model.generate would make with the sampler as its logits processor).

Several processes (`accelerate launch --multi_gpu --num_processes N`, gloo on CPU). Each process rolls out
rollout_batch_size / N prompts. Advantages are whitened over the global batch (all_gather); minibatches
are drawn from one global permutation and each process works on the rows it holds; every loss is a sum
over tokens divided by the minibatch's global token count and gradients are summed across processes. An
update therefore equals the one-process update up to float summation order (OpenRLHF's invariant:
per-rank token sums over the global token count add up to the global token mean).
"""

