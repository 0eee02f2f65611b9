"""PPO: train a policy LoRA adapter against a reward model (or a reward function) with a KL penalty.

    python recipes/ppo.py                                  # SFT base; outputs/reward if it exists, else the verifier
    python recipes/ppo.py --reward verifier                # RL from verifiable rewards (the built-in verifier)
    python recipes/ppo.py --reward my_rewards.py:score     # any fn(prompt_records, responses) -> list[float]
    python recipes/ppo.py --ptx_data ifprefs:sft           # PPO-ptx: + the demonstrations' NLL in the policy's loss
    python recipes/ppo.py --ptx_data ifprefs:sft --sft_steps 300   # ... after 300 steps of that NLL alone (SFT in the run)
    python recipes/ppo.py --config recipes/configs/ppo_ptx_plain.yaml   # PPO-ptx from the plain model, no SFT run
    python recipes/ppo.py --config recipes/configs/ppo_qlora_8b.yaml --total_updates 40
    accelerate launch recipes/ppo.py --config recipes/configs/ppo_qlora_8b.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/ppo.py
    python recipes/ppo.py --resume                         # continue after SIGTERM, Ctrl-C or a crash

One base model carries the policy, the critic, the reward model and the reference (see align.rl.ppo); the
loop's phases (generate, score, estimate advantages, update) are PPOTrainer.run_update, and their math
is pure functions (align.ops; align.rl.ppo's advantages, losses, kl_control). Writes to output_dir: adapter/ (the policy; evaluate it with `align eval` or load it
with align.models.loading.load_trained), critic/ (adapter + value_head.safetensors), checkpoints/update-N/,
config.yaml, run_info.json, metrics.jsonl, tensorboard/, summary.json and the model card (README.md);
--push_to_hub user/name uploads the policy adapter, its card and the summary.
"""

import json
import random
import sys

import numpy as np
import torch

from align.config import parse_config
from align.data.load import check_lengths, load_prompts, load_sft
from align.errors import AlignError, ConfigError, cli_main
from align.evaluation.policy_report import before_after
from align.evaluation.verifier import verifier_reward
from align.io import write_run_info
from align.log import MAIN_ONLY, get_logger
from align.models.loading import compute_note, resolve_quantization
from align.publish.hub import check_push_target, publish_run
from align.rl.ppo.checkpoint import list_checkpoints
from align.rl.ppo.config import PPOArgs
from align.rl.ppo.dist import init_distributed
from align.rl.ppo.models import build_models
from align.rl.ppo.ptx import encode_demonstrations
from align.rl.ppo.rewards import reward_function
from align.rl.ppo.trainer import PPOTrainer
from align.runs import claim_output_dir
from align.trainers.common import set_cpu_threads

logger = get_logger(__name__, tag="ppo")

def hardware_notes(cfg: PPOArgs, world: int) -> list[str]:
    """What `auto` became on this machine (printed at start and kept in run_info.json)."""
    gpu = torch.cuda.is_available()
    return [
        f"device={'cuda' if gpu else 'cpu'} x {world} process(es)",
        f"quantization={resolve_quantization(cfg.quantization)} ({'CUDA GPU: 4-bit QLoRA base' if gpu else 'CPU: full-precision base'})",
        compute_note(cfg.dtype, cfg.quantization),
        f"{cfg.total_updates} updates x {cfg.rollout_batch_size} responses"
        + (f" ({cfg.prompts_per_update} prompts x {cfg.samples_per_prompt})" if cfg.samples_per_prompt > 1 else "")
        + f", responses <= {cfg.response_length} tokens",
    ]


def load_eval_prompts(cfg: PPOArgs) -> list:
    if not cfg.eval_prompts or cfg.num_eval_prompts < 1:
        return []
    try:
        return load_prompts(cfg.eval_prompts, max_rows=cfg.num_eval_prompts)
    except AlignError as err:
        logger.warning(f"held-out prompts {cfg.eval_prompts} not loaded ({err}); no before/after score", extra=MAIN_ONLY)
        return []


@cli_main
def main() -> None:
    cfg = parse_config(PPOArgs)
    check_push_target(cfg)  # an upload that could not happen fails now, not after training
    cfg.check_freed_memory()
    dist = init_distributed()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    notes = [set_cpu_threads(cfg.cpu_threads)] + ([cfg.freed_memory_note()] if cfg.return_freed_memory else [])
    notes += hardware_notes(cfg, dist.world)
    if dist.is_main:  # an earlier run refused or moved aside, --resume's settings checked, the folder locked
        claimed, extra = claim_output_dir(cfg, cfg.min_free_gb)
        for line in claimed:
            logger.info(line)
    dist.barrier()  # the other processes touch output_dir once it is claimed (when refused, the launcher stops them)
    logger.info("; ".join(notes))
    if dist.is_main:
        write_run_info(cfg, cfg.output_dir, {"stage": "ppo", "hardware_defaults": notes, **extra})

    # Prompts: the prompt part of any supported data (read before the models: bad data fails fast)
    prompts = load_prompts(cfg.prompts, max_rows=cfg.max_prompts)
    eval_prompts = load_eval_prompts(cfg)
    ptx_examples = load_sft(cfg.ptx_data) if cfg.ptx_data is not None else []

    # Models: the base once, with the policy, critic and reward adapters on it
    models, plan = build_models(cfg, dist=dist)
    logger.info(f"reward: {plan.description}")
    reward_fn = reward_function(cfg, plan, models)
    prompts = check_lengths(prompts, models.tokenizer, cfg.max_prompt_length, on_too_long="skip")
    reward_is_verifier = plan.function == "verifier"
    if reward_is_verifier:
        missing = next((p for p in prompts if not p.constraints), None)
        if missing is not None:
            raise ConfigError(f"reward: the verifier scores prompts by their constraints, and {missing.source} has none "
                              "(use --reward model or a reward function, or prompts with constraints)")
        eval_prompts = [p for p in eval_prompts if p.constraints]
    logger.info(f"data: {len(prompts)} training prompts from {cfg.prompts}; {len(eval_prompts)} held-out prompts")
    demonstrations, too_long = encode_demonstrations(models.tokenizer, ptx_examples, cfg.ptx_max_length)
    if cfg.ptx_data is not None:
        logger.info(f"ptx: {len(demonstrations)} demonstrations from {cfg.ptx_data}, {cfg.ptx_batch_size} an optimizer step, "
                    f"their NLL x {cfg.ptx_coef} in the policy's loss"
                    + (f", after {cfg.sft_steps} steps of that NLL alone (the SFT phase)" if cfg.sft_steps else "")
                    + (f"; {too_long} longer than ptx_max_length={cfg.ptx_max_length} tokens skipped" if too_long else ""))

    # The verifier is logged next to any reward (objective/verifier) where the prompts carry constraints.
    trainer = PPOTrainer(cfg, models, prompts, reward_fn, dist=dist, verifier_fn=verifier_reward, reward_is_verifier=reward_is_verifier,
                         eval_prompts=eval_prompts, reward_description=plan.description, demonstrations=demonstrations)
    checkpoints = list_checkpoints(cfg.output_dir)
    if cfg.resume and checkpoints:
        logger.info(f"resuming from {checkpoints[-1]}")
        trainer.load_checkpoint(checkpoints[-1])
    else:  # without --resume there are no checkpoints here: claim_output_dir refused them or moved them aside
        if cfg.resume:
            logger.warning(f"--resume: no checkpoint in {cfg.output_dir}/checkpoints; starting from scratch", extra=MAIN_ONLY)
        if dist.is_main:  # a run stopped before its first checkpoint: its records would mix with this run's
            (trainer.out / "metrics.jsonl").unlink(missing_ok=True)
        dist.barrier()

    trainer.train()
    trainer.save_final()
    summary = trainer.write_summary()
    if dist.is_main:
        shown = {k: {n: v for n, v in block.items() if n != "rows"} if k.startswith("heldout_") and block else block
                 for k, block in summary.items()}  # per-prompt rows: in summary.json
        print(json.dumps(shown, indent=2), flush=True)
        before, after = summary["heldout_before"], summary["heldout_after"]
        if before and after:  # greedy, the same block as the other recipes' summaries (align.evaluation.policy_report)
            logger.info(before_after(before, after))
        publish_run(cfg)  # the model card (with the held-out numbers), then the upload when --push_to_hub asks
        logger.info(f"done: policy adapter in {cfg.output_dir}/adapter (evaluate: align eval {cfg.output_dir}; talk to it: align chat {cfg.output_dir})")


if __name__ == "__main__":
    sys.exit(main())
