"""The trl-ppo arm's run: TRL 0.11's PPOTrainer on our PPO arm's model, prompts, batch, LoRA and verifier reward.

Runs inside the arm's venv (bench/trl_ppo/venv.py), as `run_child` of bench/harness/runs.py calls it: align is imported
from the checkout (it imports under transformers 4.46 and trl 0.11), TRL from the venv. See bench/trl_ppo/__init__.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace


def load_old_tokenizer(path: str):
    """The model's tokenizer under transformers 4.46: a folder saved by transformers 5 names the class
    TokenizersBackend and keeps its chat template in chat_template.jinja, which 4.46 reads neither of."""
    from transformers import PreTrainedTokenizerFast

    from align.models.loading import load_tokenizer

    try:
        return load_tokenizer(path)
    except ValueError:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        template = Path(path) / "chat_template.jinja"
        if tokenizer.chat_template is None and template.exists():
            tokenizer.chat_template = template.read_text()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer


def load_old_config(path: str):
    """The model's config under transformers 4.46: transformers 5 writes RoPE's settings as `rope_parameters`,
    which 4.46 would keep as an unused attribute and run with its default rope_theta (10,000; SmolLM2 uses 100,000)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    rope = getattr(config, "rope_parameters", None)
    if rope:
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"trl-ppo: {path}: RoPE type {rope['rope_type']!r} is not mapped to transformers 4.46's rope_scaling")
        config.rope_theta = rope["rope_theta"]
    return config


def token_weighted(minibatches: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Policy and value loss over an update as align reports them: each minibatch's token mean weighted by its tokens
    (TRL reports the plain mean of the minibatches' token means).

    Args:
        minibatches: (tokens, policy loss, value loss) of each minibatch.
    >>> token_weighted([(30.0, 1.0, 2.0), (10.0, -1.0, 6.0)])   # (30 - 10) / 40, (60 + 60) / 40
    (0.5, 3.0)
    """
    tokens = sum(n for n, _, _ in minibatches)
    return sum(n * p for n, p, _ in minibatches) / tokens, sum(n * v for n, _, v in minibatches) / tokens


def load_policy_with_value_head(spec: dict, cfg):
    """The LoRA policy with TRL's value head on it, as LLaMA-Factory runs TRL's PPO: the reference is the same base
    with the adapter off, and the value head starts at 0 as align's critic does (align.rl.ppo.models)."""
    import torch
    from trl import AutoModelForCausalLMWithValueHead

    from align.models.loading import lora_config

    lora = lora_config(cfg, "causal_lm")
    lora.lora_dropout = 0.0  # as the align arm (dropout off everywhere)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        spec["model_path"], config=load_old_config(spec["model_path"]), torch_dtype=getattr(torch, spec["dtype_name_torch"]),
        peft_config=lora, summary_dropout_prob=0.0)
    with torch.no_grad():
        model.v_head.summary.weight.zero_()
        model.v_head.summary.bias.zero_()
    return model


def listening_trainer(cfg, steps: int, model, tokenizer):
    """TRL's PPOTrainer, unchanged but for keeping each minibatch's (tokens, policy loss, value loss) in `minibatches`."""
    from trl import PPOConfig, PPOTrainer

    from bench.trl_ppo.settings import trl_ppo_config

    class ListeningPPOTrainer(PPOTrainer):
        minibatches: list[tuple[float, float, float]] = []

        def train_minibatch(self, old_logprobs, values, logprobs, logits, vpreds, mask, advantages, returns):
            stats = super().train_minibatch(old_logprobs, values, logprobs, logits, vpreds, mask, advantages, returns)
            self.minibatches.append((float(mask.sum()), float(stats["loss/policy"]), float(stats["loss/value"])))
            return stats

    return ListeningPPOTrainer(PPOConfig(**trl_ppo_config(cfg, steps)), model, ref_model=None, tokenizer=tokenizer)


def sample_responses(trainer, tokenizer, cfg, records, rows, update: int, device: str):
    """Phase 1 of an update: one response per prompt with the align arm's sampler (per-row seeded Gumbel-max), so the
    first update samples the same responses as align does; one generate() for the whole batch, as align does.
    Returns the unpadded queries and TRL's responses (prompt removed)."""
    import torch
    from transformers import LogitsProcessorList

    from align.rl.ppo.rollout import GumbelSampler, encode_prompts, row_seed

    query, query_mask = encode_prompts(tokenizer, records, torch.device(device))
    queries = [q[m.bool()] for q, m in zip(query, query_mask)]
    sampler = GumbelSampler([row_seed(cfg.seed, update, int(i)) for i in rows], cfg.temperature)
    generation = dict(do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0, max_new_tokens=cfg.response_length,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    responses = trainer.generate(queries, batch_size=len(queries), return_prompt=False,
                                 logits_processor=LogitsProcessorList([sampler]), **generation)
    return queries, responses


def verify_and_step(trainer, tokenizer, records, queries, responses) -> tuple[list[float], dict, float]:
    """The verifier's scores, then TRL's step(queries, responses, scores): score, advantages and update in one call.
    Returns the scores, TRL's stats and the verifier's seconds; the minibatches' losses are left in trainer.minibatches."""
    import torch

    from align.evaluation.verifier import verifier_reward

    verifier_start = time.perf_counter()
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    scores = verifier_reward(records, texts)
    verifier_s = time.perf_counter() - verifier_start
    trainer.minibatches = []
    stats = trainer.step(queries, responses, [torch.tensor(float(s)) for s in scores])
    return scores, stats, verifier_s


def update_record(update: int, start: float, cfg, step_phases, queries, responses, scores, stats, verifier_s: float,
                  minibatches: list[tuple[float, float, float]], n_params: int, n_head: int) -> dict:
    """The update as a step record like the align arm's (bench.harness.recorders.ppo_step_record), with TRL's own
    loss figures beside align's token-weighted ones."""
    from bench.harness.recorders import ppo_step_record
    from bench.trl_ppo.settings import response_hashes, trl_phase_flops

    step_peak = step_phases.result["step"]["peak_mb"]
    measured = {
        "generate": step_phases.result["generate"],
        "score": {"time_s": verifier_s + stats["time/ppo/forward_pass"] + stats["time/ppo/compute_rewards"], "peak_mb": step_peak},
        "update": {"time_s": stats["time/ppo/optimize_step"], "peak_mb": step_peak},
    }
    prompt_tokens, new_tokens = sum(len(q) for q in queries), sum(len(r) for r in responses)
    policy_loss, value_loss = token_weighted(minibatches)
    metrics = {"ppo/policy_loss": policy_loss, "ppo/value_loss": value_loss,
               "objective/kl": float(stats["objective/kl"]), "objective/scores": sum(scores) / len(scores)}
    flops = trl_phase_flops(n_params, n_head, prompt_tokens, new_tokens, cfg.ppo_epochs)
    step = ppo_step_record(update + 1, time.perf_counter() - start, prompt_tokens, new_tokens, cfg.ppo_epochs, measured, flops, metrics)
    # TRL's own figures: the minibatches' unweighted mean, and the first minibatch's (ratio 1 exactly)
    step |= {"trl_policy_loss": float(stats["ppo/loss/policy"]), "trl_value_loss": float(stats["ppo/loss/value"]),
             "first_minibatch": list(minibatches[0])}
    if update == 0:
        step["response_hashes"] = response_hashes([r.tolist() for r in responses])
    return step


def trl_ppo_run(spec: dict, phases, meter, device: str, out_dir: str) -> dict:
    """`steps` PPO steps of TRL 0.11 (generate, then step(queries, responses, scores)), each a step record like
    the align arm's (bench.harness.recorders.ppo_step_record)."""
    # every import of the steps below happens here, before the first phase, so that no phase's time or memory holds one
    import torch  # noqa: F401
    from transformers import LogitsProcessorList  # noqa: F401
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer  # noqa: F401

    from bench.harness.flops import matmul_params
    from bench.harness.meter import Phases
    from bench.harness.recorders import ppo_step_record  # noqa: F401
    from bench.harness.runs import ppo_arm_config, ppo_arm_prompts, ppo_config_summary
    from align.evaluation.verifier import verifier_reward  # noqa: F401
    from align.models.loading import lora_config  # noqa: F401
    from align.rl.ppo.rollout import GumbelSampler  # noqa: F401
    from align.rl.ppo.trainer import PPOTrainer as AlignPPOTrainer
    from bench.trl_ppo.settings import trl_ppo_config

    # trl-ppo:field=value overrides the same PPOArgs fields as align:field=value
    cfg = ppo_arm_config({**spec, "arm": "align" + spec["arm"][len("trl-ppo"):]}, out_dir)
    # glibc's malloc left as TRL's users run it: align's mmap threshold (return_freed_memory) is one of align's levers
    steps = spec["steps"]
    with phases("load"):
        tokenizer = load_old_tokenizer(spec["model_path"])
        prompts = ppo_arm_prompts(cfg, tokenizer, steps)
        model = load_policy_with_value_head(spec, cfg)
    base = model.pretrained_model.get_base_model()
    n_params, n_head = matmul_params(base), base.get_output_embeddings().weight.numel()
    with phases("init"):
        trainer = listening_trainer(cfg, steps, model, tokenizer)
    # align's data order: update u rolls out the prompts align's trainer would (world of one process)
    order = SimpleNamespace(cfg=cfg, prompts=prompts, dist=SimpleNamespace(rank=0, world=1))
    records_out, step_phases = [], Phases(meter, device)
    with phases("train"):
        start = time.perf_counter()
        for update in range(steps):
            records, rows = AlignPPOTrainer.batch_records(order, update)
            with step_phases("generate"):
                queries, responses = sample_responses(trainer, tokenizer, cfg, records, rows, update, device)
            # TRL's step scores (policy-with-values and reference forwards), estimates advantages and optimizes in one
            # call: its own timers split it; its peak memory is the step's, for score and update alike
            with step_phases("step"):
                scores, stats, verifier_s = verify_and_step(trainer, tokenizer, records, queries, responses)
            records_out.append(update_record(update, start, cfg, step_phases, queries, responses, scores, stats, verifier_s,
                                             trainer.minibatches, n_params, n_head))
            start = time.perf_counter()
    return {"data": cfg.prompts, "n_params_matmul": n_params, "n_params_lm_head": n_head, "lora": True, "lora_A_init_abs_sum": None,
            "steps": records_out, "extra_time_s": 0.0, "extra_flops": 0, "ppo_config": ppo_config_summary(cfg),
            "trl_ppo_config": trl_ppo_config(cfg, steps), "trl_version": __import__("trl").__version__,
            "transformers_version": __import__("transformers").__version__}
