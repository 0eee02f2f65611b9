"""The whole comparison in one command: SFT, then a reward model, DPO and PPO (and GRPO or RLOO, on request)
from the same SFT base, then evaluation of every policy and the PPO-vs-DPO report.

    python recipes/pipeline.py                                       # embedded default on CPU (about 55 min on 2 bf16 cores)
    python recipes/pipeline.py --config recipes/configs/pipeline_qlora_8b.yaml   # 7-8B QLoRA on a 24 GB GPU
    python recipes/pipeline.py --resume                              # skip stages that already finished
    python recipes/pipeline.py --overwrite true                      # start over; the earlier outputs are moved aside
    python recipes/pipeline.py --stages sft,reward,dpo,ppo,grpo,compare   # GRPO too (--grpo_args '--algorithm rloo': RLOO)

Each stage is its own recipe process (launched with `launcher`), reading what the previous one wrote:
  sft     -> {root}/sft/merged           the base of every later stage
  reward  -> {root}/reward               Bradley-Terry reward model on the SFT base
  dpo     -> {root}/dpo                  DPO adapter on the SFT base
  ppo     -> {root}/ppo                  PPO adapter on the SFT base, rewarded by {root}/reward
  grpo    -> {root}/grpo                 GRPO (or RLOO) adapter on the SFT base, rewarded by {root}/reward like PPO
  compare -> {root}/report               eval/evaluate.py on base, sft, dpo, ppo, grpo, then eval/compare.py

GRPO is not among the default stages: on a CPU it would add about as much time as PPO (it gets PPO's budget
in wall time) to a comparison that already takes over an hour.
"""

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from align.config import arg, parse_config
from align.errors import AlignError, ConfigError, cli_main
from align.log import LogArgs
from align.runs import check_folder, take_folder

STAGES = ("sft", "reward", "dpo", "ppo", "grpo", "compare")
DEFAULT_STAGES = ["sft", "reward", "dpo", "ppo", "compare"]
POLICY_STAGES = ("sft", "dpo", "ppo", "grpo")  # the stages whose model is evaluated and compared
# On a CPU every policy answers all 320 held-out prompts greedily (a quarter of the pipeline's time on 2 cores),
# the only size at which a change of 0.10 has an interval clear of 0; sampled replies (the reward-vs-KL plots) and
# most preference pairs and perplexity rows are left out: --eval_args '... --modes greedy,sample' brings them back.
CPU_EVAL = "--max_prompts 320 --max_pairs 32 --max_ppl_rows 16 --modes greedy"
# On a CPU the training stages are sized by the learning curves (docs/alignment_on_cpu.md): SFT gets the 300 steps at
# lr 1e-3 that carry coherent strict up by +0.10 (learning_curve_sft.json), the later stages stay short. They go
# before the user's --<stage>_args, which override them (the last flag wins). SFT writes no summary block here: the
# pipeline evaluates the SFT model on its own eval prompts. The reward model gets 24 steps at its CPU learning rate
# (1e-3: 0.86 held-out accuracy where 1e-4 gave 0.58). DPO from the SFT model runs 112 steps of the main job's DPO
# phase (DPO + SFT term) at a constant 1e-3 (--max_steps turns the main job's own SFT phase off: the SFT stage did it):
# over the SFT model +0.125 [+0.072, +0.178] coherent strict on all 320 eval prompts with fewer degenerate replies, where
# 56 cosine steps added -0.028 on the same SFT model (docs/alignment_on_cpu.md, "The pipeline's DPO stage"). GRPO's
# 24 steps are about PPO's 12 updates in wall time (a step, 2 prompts x 4 replies of up to 64 tokens, took 36-47 s;
# PPO's 12 updates 974 s). PPO writes no held-out summary either (its
# 128 greedy prompts before and after training were 202 of the stage's 500 s on a bf16 CPU, and its training is the
# same to the bit without them): the pipeline's own evaluation answers all 320 eval prompts.
CPU_STAGE_ARGS = {"sft": "--max_steps 300 --learning_rate 1e-3 --lr_scheduler_type constant --summary_prompts 0",
                  "reward": "--max_steps 24",
                  "dpo": "--max_steps 112 --lr_scheduler_type constant --summary_prompts 16",
                  "ppo": "--total_updates 12 --num_eval_prompts 0", "grpo": "--max_steps 24 --summary_prompts 0"}
GPU_EVAL = "--max_prompts 100 --max_pairs 100 --max_ppl_rows 50 --modes greedy,sample"


@dataclass
class PipelineArgs(LogArgs):
    output_root: str = arg("outputs", "folder that receives one subfolder per stage")
    stages: list[str] = arg(list(DEFAULT_STAGES), f"stages to run, in order (any of {', '.join(STAGES)})")
    launcher: str = arg("accelerate launch", "how training recipes are started (e.g. 'python', or accelerate with --config_file)")
    sft_args: str = arg("", "extra flags for recipes/sft.py (e.g. '--config recipes/configs/sft_400.yaml'); on a CPU they follow "
                            "(and override) the shortened defaults " + ", ".join(f"{k}: '{v}'" for k, v in CPU_STAGE_ARGS.items()))
    reward_args: str = arg("", "extra flags for recipes/reward.py")
    dpo_args: str = arg("", "extra flags for recipes/dpo.py")
    ppo_args: str = arg("", "extra flags for recipes/ppo.py")
    grpo_args: str = arg("", "extra flags for recipes/grpo.py (e.g. '--algorithm rloo', '--reward verifier')")
    eval_args: str = arg("auto", "flags for eval/evaluate.py (same for every policy); auto = CPU: "
                                 f"'{CPU_EVAL}', GPU: '{GPU_EVAL}'")
    resume: bool = arg(False, "skip stages whose summary.json exists; resume interrupted ones from their checkpoints (each "
                              "stage checks its settings against its checkpoint's)")
    overwrite: bool = arg(False, "output_root holds an earlier pipeline: move it aside to <output_root>.old-<time> and start over")

    def validate(self) -> None:
        for stage in self.stages:
            if stage not in STAGES:
                raise ConfigError(f"config: stages: unknown stage {stage!r}; expected some of {', '.join(STAGES)}")


def run(cmd: list[str], stage: str) -> None:
    print(f"\n[pipeline] {stage}: {shlex.join(cmd)}", flush=True)
    started = time.time()
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise AlignError(f"stage {stage} failed (exit code {result.returncode}); fix it and rerun with --resume")
    print(f"[pipeline] {stage}: done in {time.time() - started:.0f} s", flush=True)


def starting_model(root: Path) -> str:
    """The model SFT started from (its config.yaml), evaluated as `base`: the embedded default unless the SFT
    stage was given another model."""
    import yaml

    config = root / "sft" / "config.yaml"
    if config.is_file():
        return str((yaml.safe_load(config.read_text()) or {}).get("model_name_or_path") or "base")
    return "base"


@cli_main
def main() -> None:
    cfg = parse_config(PipelineArgs)
    if cfg.log_level:  # each stage is a process of its own: it reads the level from the environment
        os.environ["ALIGN_LOG_LEVEL"] = cfg.log_level
    # What the stages to run would write over (an earlier pipeline's) is refused, continued (--resume) or moved
    # aside with the whole folder (--overwrite true) before any stage starts; one pipeline per folder (align.runs).
    # Each stage then claims its own subfolder the same way. Running later stages on a finished SFT is no overwrite.
    written = [s for s in cfg.stages if s != "compare"] + (["base", "report"] if "compare" in cfg.stages else [])
    found = check_folder(cfg.output_root, resume=cfg.resume, overwrite=cfg.overwrite, names=written, dir_flag="--output_root")
    for note in take_folder(cfg.output_root, found, overwrite=cfg.overwrite):
        print(f"[pipeline] {note}", flush=True)
    import torch

    on_cpu = not torch.cuda.is_available()
    if cfg.eval_args == "auto":
        cfg.eval_args = CPU_EVAL if on_cpu else GPU_EVAL
    stage_args = {stage: shlex.split(CPU_STAGE_ARGS[stage] if on_cpu else "") + shlex.split(extra) for stage, extra in
                  (("sft", cfg.sft_args), ("reward", cfg.reward_args), ("dpo", cfg.dpo_args), ("ppo", cfg.ppo_args),
                   ("grpo", cfg.grpo_args))}
    root = Path(cfg.output_root)
    sft_base = str(root / "sft" / "merged")
    recipes = Path(__file__).resolve().parent
    launch = shlex.split(cfg.launcher)
    resume = ["--resume"] if cfg.resume else []
    stage_cmds = {
        "sft": [*launch, str(recipes / "sft.py"), "--output_dir", str(root / "sft"), "--merge", "true", *stage_args["sft"]],
        "reward": [*launch, str(recipes / "reward.py"), "--model_name_or_path", sft_base, "--output_dir", str(root / "reward"), *stage_args["reward"]],
        "dpo": [*launch, str(recipes / "dpo.py"), "--model_name_or_path", sft_base, "--output_dir", str(root / "dpo"), *stage_args["dpo"]],
        "ppo": [*launch, str(recipes / "ppo.py"), "--sft_dir", str(root / "sft"), "--reward_model", str(root / "reward"),
                "--output_dir", str(root / "ppo"), *stage_args["ppo"]],
        "grpo": [*launch, str(recipes / "grpo.py"), "--model_name_or_path", sft_base, "--reward", str(root / "reward"),
                 "--output_dir", str(root / "grpo"), *stage_args["grpo"]],
    }
    for stage in cfg.stages:
        if stage == "compare":
            continue
        if cfg.resume and (root / stage / "summary.json").is_file():
            print(f"[pipeline] {stage}: {root / stage}/summary.json exists; skipped", flush=True)
            continue
        run(stage_cmds[stage] + resume, stage)

    if "compare" in cfg.stages:
        evaluate = str(recipes.parent / "eval" / "evaluate.py")
        runs = [starting_model(root)] + [str(root / s) for s in POLICY_STAGES if (root / s / "summary.json").is_file()]
        for run_dir in runs:
            eval_dir = root / "base" / "eval" if run_dir == runs[0] else Path(run_dir) / "eval"
            if cfg.resume and (eval_dir / "summary.json").is_file():
                print(f"[pipeline] evaluate {run_dir}: {eval_dir}/summary.json exists; skipped", flush=True)
                continue
            out = ["--out", str(eval_dir)] if run_dir == runs[0] else []
            extra = ["--reward_model", str(root / "reward")] if (root / "reward" / "adapter").is_dir() else []
            run([sys.executable, evaluate, run_dir, *out, *extra, *shlex.split(cfg.eval_args)], f"evaluate {run_dir}")
        eval_dirs = [str(root / "base")] + runs[1:]
        extra = ["--reward_model", str(root / "reward")] if (root / "reward" / "adapter").is_dir() else []
        # a resumed pipeline rebuilds its report from every evaluation: the earlier one is moved aside (compare says where)
        again = ["--overwrite", "true"] if cfg.resume and (root / "report" / "summary.json").is_file() else []
        run([sys.executable, str(recipes.parent / "eval" / "compare.py"), *eval_dirs, "--out", str(root / "report"), *extra, *again],
            "compare")
        print(f"\n[pipeline] report: {root / 'report' / 'report.html'}", flush=True)


if __name__ == "__main__":
    main()
