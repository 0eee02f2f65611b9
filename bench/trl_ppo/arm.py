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

    from align.models import load_tokenizer

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


def trl_ppo_run(spec: dict, phases, meter, device: str, out_dir: str) -> dict:
    """`steps` PPO steps of TRL 0.11 (generate, then step(queries, responses, scores)), each a step record like
    the align arm's (bench.harness.recorders.ppo_step_record)."""
    import torch
    from transformers import LogitsProcessorList
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    from bench.harness.flops import matmul_params
    from bench.harness.meter import Phases
    from bench.harness.recorders import ppo_step_record
    from bench.harness.runs import ppo_arm_config, ppo_arm_prompts, ppo_config_summary
    from align.models import lora_config
    from align.rl.ppo.rollout import GumbelSampler, encode_prompts, row_seed
    from align.rl.ppo.trainer import PPOTrainer as AlignPPOTrainer
    from align.verifier import verifier_reward
    from bench.trl_ppo.settings import response_hashes, trl_phase_flops, trl_ppo_config

    # trl-ppo:field=value overrides the same PPOArgs fields as align:field=value
    cfg = ppo_arm_config({**spec, "arm": "align" + spec["arm"][len("trl-ppo"):]}, out_dir)
    # glibc's malloc left as TRL's users run it: align's mmap threshold (return_freed_memory) is one of align's levers
    steps = spec["steps"]
    with phases("load"):
        tokenizer = load_old_tokenizer(spec["model_path"])
        prompts = ppo_arm_prompts(cfg, tokenizer, steps)
        lora = lora_config(cfg, "causal_lm")
        lora.lora_dropout = 0.0  # as the align arm (dropout off everywhere)
        torch.manual_seed(cfg.seed)
        # as LLaMA-Factory: the value head on the LoRA policy, the reference = the same base with the adapter off
        model = AutoModelForCausalLMWithValueHead.from_pretrained(
            spec["model_path"], config=load_old_config(spec["model_path"]), torch_dtype=getattr(torch, spec["dtype_name_torch"]),
            peft_config=lora, summary_dropout_prob=0.0)
        with torch.no_grad():  # align's critic starts at 0 (align.rl.ppo.models); so does this one
            model.v_head.summary.weight.zero_()
            model.v_head.summary.bias.zero_()
    base = model.pretrained_model.get_base_model()
    n_params, n_head = matmul_params(base), base.get_output_embeddings().weight.numel()
    class ListeningPPOTrainer(PPOTrainer):
        """TRL's trainer, unchanged, that keeps each minibatch's token count and losses."""

        minibatches: list[tuple[float, float, float]] = []

        def train_minibatch(self, old_logprobs, values, logprobs, logits, vpreds, mask, advantages, returns):
            stats = super().train_minibatch(old_logprobs, values, logprobs, logits, vpreds, mask, advantages, returns)
            self.minibatches.append((float(mask.sum()), float(stats["loss/policy"]), float(stats["loss/value"])))
            return stats

    with phases("init"):
        trainer = ListeningPPOTrainer(PPOConfig(**trl_ppo_config(cfg, steps)), model, ref_model=None, tokenizer=tokenizer)
    # align's data order: update u rolls out the prompts align's trainer would (world of one process)
    order = SimpleNamespace(cfg=cfg, prompts=prompts, dist=SimpleNamespace(rank=0, world=1))
    generation = dict(do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0, max_new_tokens=cfg.response_length,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    records_out, step_phases = [], Phases(meter, device)
    with phases("train"):
        start = time.perf_counter()
        for update in range(steps):
            records, rows = AlignPPOTrainer.batch_records(order, update)
            with step_phases("generate"):
                query, query_mask = encode_prompts(tokenizer, records, torch.device(device))
                queries = [q[m.bool()] for q, m in zip(query, query_mask)]
                # the align arm's sampler (per-row seeded Gumbel-max), so the first update samples the same responses;
                # one generate() for the whole batch, as align does
                sampler = GumbelSampler([row_seed(cfg.seed, update, int(i)) for i in rows], cfg.temperature)
                responses = trainer.generate(queries, batch_size=len(queries), return_prompt=False,
                                             logits_processor=LogitsProcessorList([sampler]), **generation)
            # TRL's step scores (policy-with-values and reference forwards), estimates advantages and optimizes in one
            # call: its own timers split it; its peak memory is the step's, for score and update alike
            with step_phases("step"):
                verifier_start = time.perf_counter()
                texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
                scores = verifier_reward(records, texts)
                verifier_s = time.perf_counter() - verifier_start
                trainer.minibatches = []
                stats = trainer.step(queries, responses, [torch.tensor(float(s)) for s in scores])
            step_peak = step_phases.result["step"]["peak_mb"]
            measured = {
                "generate": step_phases.result["generate"],
                "score": {"time_s": verifier_s + stats["time/ppo/forward_pass"] + stats["time/ppo/compute_rewards"], "peak_mb": step_peak},
                "update": {"time_s": stats["time/ppo/optimize_step"], "peak_mb": step_peak},
            }
            prompt_tokens, new_tokens = sum(len(q) for q in queries), sum(len(r) for r in responses)
            policy_loss, value_loss = token_weighted(trainer.minibatches)
            metrics = {"ppo/policy_loss": policy_loss, "ppo/value_loss": value_loss,
                       "objective/kl": float(stats["objective/kl"]), "objective/scores": sum(scores) / len(scores)}
            flops = trl_phase_flops(n_params, n_head, prompt_tokens, new_tokens, cfg.ppo_epochs)
            step = ppo_step_record(update + 1, time.perf_counter() - start, prompt_tokens, new_tokens, cfg.ppo_epochs, measured, flops, metrics)
            # TRL's own figures: the minibatches' unweighted mean, and the first minibatch's (ratio 1 exactly)
            step |= {"trl_policy_loss": float(stats["ppo/loss/policy"]), "trl_value_loss": float(stats["ppo/loss/value"]),
                     "first_minibatch": list(trainer.minibatches[0])}
            if update == 0:
                step["response_hashes"] = response_hashes([r.tolist() for r in responses])
            records_out.append(step)
            start = time.perf_counter()
    trl_config = trl_ppo_config(cfg, steps)
    return {"data": cfg.prompts, "n_params_matmul": n_params, "n_params_lm_head": n_head, "lora": True, "lora_A_init_abs_sum": None,
            "steps": records_out, "extra_time_s": 0.0, "extra_flops": 0, "ppo_config": ppo_config_summary(cfg),
            "trl_ppo_config": trl_config, "trl_version": __import__("trl").__version__,
            "transformers_version": __import__("transformers").__version__}
