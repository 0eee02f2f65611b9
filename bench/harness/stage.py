"""Benchmark a training stage: wall time, tokens per second, peak memory and MFU, per step and per phase.

    python bench/run.py --stage dpo --steps 8                                   # the DPO recipe alone
    python bench/run.py --stage dpo --compare trl-baseline,align --steps 8 --repeats 2
    python bench/run.py --stage dpo --compare align,align:share_prompt=false:fast_logprobs=false
    python bench/run.py --stage sft --compare trl-baseline,align               # also: reward
    python bench/run.py --stage grpo --compare trl-baseline,align --steps 4    # GRPO, verifier reward, ifprefs prompts

Each run of an arm is a fresh subprocess (`bench/run.py --child SPEC RESULT`, runs.py), so peak memory never
mixes; arms alternate (A B A B ...) so that load from other processes hits them alike. Arms:

- `trl-baseline`: the stage's script from TRL's documentation with TRL's defaults (the model passed by
  name, `peft_config=LoraConfig(...)`, `DPOConfig`/`SFTConfig`/`RewardConfig` defaults: no precomputed
  reference log-probs, gradient checkpointing on, TRL's fused LM head). What it shares with `align` so
  that the two train the same thing: model, data rows and order, seed, LoRA (r, alpha, dropout, all
  linear), learning rate and schedule, batch size, max_length, steps, and for DPO the loss (loss_type,
  loss_weights, beta: the recipe's DPO + SFT term). One departure: on a CPU without
  native bf16, `bf16=False` (TRL's default would emulate bf16, several times slower). SFT: the recipe trains
  on assistant turns only, so the baseline sets `assistant_only_loss=True` and gets the recipe's marked chat
  template (align.models.chat.training_chat_template): both losses are the mean NLL of the same tokens.
- `align`: the recipe (`recipes/<stage>.py`) with its defaults; `align:field=value:...` overrides fields
  of the recipe's config (ablations of the DPO levers in align/trainers/dpo_fast.py).

Measured, per step: wall time (end of one optimizer step to the end of the next, data loading
included), tokens, tokens/s, peak memory, loss. Per phase (load, init, precompute_ref, train): time and
peak memory. The bench listens and replaces nothing in a trainer: steps and losses come from TRL's
callback events (a TrainerCallback: on_step_begin, on_step_end, on_log, whose `num_tokens` gives a step's
tokens), the phases inside a trainer from the events it reports (align.trainers.phases): the DPO recipe's
precompute_ref, the PPO trainer's generate, score and update, GRPO's generate and score (below).
Peak memory on CPU is the peak resident set size (VmHWM, reset per phase and step through
/proc/self/clear_refs) over the resident set size after imports; on CUDA it is
torch.cuda.max_memory_allocated.

Tokens are the non-padding tokens of the sequences the stage trains on, counted the same for every arm
from TRL's collated batch: for DPO each pair counts prompt + chosen plus prompt + rejected (the prompt
twice, even where align runs it once). MFU is model FLOPs per second over a float matmul peak measured
in the same invocation on the same device (best of several square matmuls). Model FLOPs per token
(see `stage_flops`): 6N for a trained token of full fine-tuning, 4N with LoRA (forward 2N, backward to
the activations 2N, no weight gradient for the frozen base), 2N for a forward-only token (reference or
reward-model scoring). N counts the parameters that take part in matmuls (`matmul_params`); attention's
sequence-squared FLOPs are left out, as in Kaplan et al. (2020); recomputation (gradient checkpointing)
is not counted as model FLOPs.

PPO (`--stage ppo --compare dpo-align,align`): `align` is the PPO engine (align.rl.ppo) with the PPO
recipe's defaults, the built-in verifier as the reward, on the same base; `dpo-align` is the DPO recipe on
that base, run for its peak memory. A PPO "step" is one update; its phases are timed and measured apart:
generate, score (policy, reference and critic forwards; the verifier costs no FLOPs) and update
(ppo_epochs x (policy + critic) forward and backward). Their FLOPs (`ppo_phase_flops`) split N into the
decoder and the LM head: every pass runs the decoder on every prompt and response token, but the LM head
only where a response token is predicted, and the critic has none. PPO's train tokens/s counts the tokens
of the update phase (ppo_epochs passes).

GRPO (`--stage grpo --compare trl-baseline,align`): `align` is recipes/grpo.py's build_trainer with the recipe's
defaults (`align:field=value` overrides them, `align:algorithm=rloo` runs RLOO); `trl-baseline` is TRL's
documented GRPO script, `GRPOTrainer(model=name, reward_funcs=..., args=GRPOConfig(...), peft_config=LoraConfig(...))`
with GRPOConfig's defaults (beta 0: no reference pass, temperature 1.0, gradient checkpointing on, LoRA dropout 0.05
left on) except what both arms share: model, prompts and their order, seed, LoRA, the reward functions (the recipe's
build_reward_funcs: the guarded verifier), replies per prompt, longest reply and learning rate (the recipe's
defaults), steps. `--batch_size` is prompts per step (per_device_train_batch_size = batch_size x num_generations
replies); prompts come from the recipe's train_data (ifprefs) unless --data names another source with constraints.
A step's phases, as both arms' trainers report them (align.trainers.phases.ReportGenerationMixin: the recipe's trainer
mixes it in, the baseline is TRL's GRPOTrainer with it and nothing else): generate (`_generate`: sampling with
transformers' generate and decoding), score (the rest of `_generate_and_score_completions`: forward-only passes
for the reference and old-policy log-probs, when TRL makes them, and the rewards) and update (the rest of the
step: the loss's forward and backward, the optimizer step).
Their FLOPs (`pass_flops`, with N split into the decoder D and the LM head as for PPO): generate 2D(P + R) +
2 n_head R, with P the prompt tokens of every reply (TRL repeats each prompt num_generations times) and R the
replies' tokens (up to and including EOS; padding left out); every pass through TRL's
`_get_per_token_logps_and_entropies` counted as it is made, on its real tokens T and the completion tokens C its
LM head scores: 2D T + 2 n_head C under no_grad (score), 4D T + 4 n_head C with gradients (update, LoRA). GRPO's
tokens are the update's (P + R per step), its train tokens/s those over the update's time; each step also records
the replies' tokens per second of generation and the mean reward TRL logs.

Writes OUTPUT/bench_<stage>.json (every run, every step) and prints a short table with the ratios of
each arm to the first one.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from align.config import arg, parse_config
from align.errors import ConfigError, cli_main

from . import REPO
from .process import ChildFailed, run_json_child
from .report import format_table, summarize

ARMS = ("trl-baseline", "align")
PPO_ARMS = ("dpo-align", "align", "trl-ppo")  # the DPO recipe on the same base (for memory), the PPO engine, TRL 0.11's PPO (bench/trl_ppo)
COMMAND = "bench/run.py"  # how a user runs it, from the checkout; every child runs the same file


@dataclass
class BenchArgs:
    stage: Literal["dpo", "sft", "reward", "ppo", "grpo"] = arg("dpo", "the stage to run: dpo, sft, reward, grpo, or ppo (arms dpo-align and align)")
    compare: list[str] = arg(["align"], "arms, run in this order and alternated: trl-baseline, align, align:field=value:... (ppo: dpo-align, align, trl-ppo[:field=value...])")
    steps: int = arg(8, "optimizer steps per run")
    repeats: int = arg(1, "runs of every arm (alternating A B A B ...)")
    warmup_steps: int = arg(1, "first steps left out of the per-step rates (allocator and thread-pool warm-up)")
    model_name_or_path: str = arg("SmolLM2-135M-Instruct", "the model every arm trains")
    data: str = arg("auto", "preference / SFT data: auto (built-in ifprefs if present, else synthetic), synthetic, or any data source; grpo: auto = the recipe's prompts")
    batch_size: int = arg(4, "pairs (dpo, reward), conversations (sft) or prompts (grpo, num_generations replies each) per optimizer step")
    max_length: int = arg(256, "tokens per sequence; longer rows are dropped from the slice")
    lora_r: int = arg(16, "LoRA rank (all linear layers, alpha = 2 r) in every arm; LoRA dropout: 0.05 in the baseline, which TRL's DPOTrainer sets to 0 at run time (disable_dropout), the recipe's own (0 for DPO) in align arms")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = arg("auto", "compute dtype; auto = bf16 where the hardware has it, else fp32")
    threads: int = arg(0, "torch threads in every run; 0 = torch's default")
    seed: int = arg(42, "seed of every run (LoRA init, data order, synthetic data)")
    output_dir: str = arg("outputs/bench", "where bench_<stage>.json and the run logs go")
    timeout_s: int = arg(7200, "a run that takes longer is stopped and reported as failed")

    def validate(self) -> None:
        for name in ("steps", "repeats", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config: {name}: expected a positive number, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise ConfigError(f"config: warmup_steps: expected 0 <= warmup_steps < steps ({self.steps}), got {self.warmup_steps}")
        if self.stage == "grpo" and self.data == "synthetic":
            raise ConfigError("config: data: synthetic pairs have no constraints for the verifier reward of stage grpo; "
                              "use auto (the recipe's prompts) or a prompt source with constraints")
        arms = PPO_ARMS if self.stage == "ppo" else ARMS
        for arm in self.compare:
            if arm.split(":")[0] not in arms:
                raise ConfigError(f"config: compare: unknown arm {arm!r} for stage {self.stage}; expected one of "
                                  f"{', '.join(arms)} (align[:field=value...] overrides the recipe's config)")
            if arm.startswith("trl-baseline:"):
                raise ConfigError(f"config: compare: {arm!r}: the baseline takes no overrides (it is TRL's defaults)")


def run_arm(spec: dict, log_path: Path, timeout_s: int) -> dict:
    """One run of one arm in a fresh process (its log in `log_path`): its record, or one with the error."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_path = f.name
    result_path = spec_path + ".result"
    env = {"TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    python = sys.executable
    if spec["arm"].split(":")[0] == "trl-ppo":  # TRL 0.11's own environment (built by main_parent)
        from bench.trl_ppo.venv import venv_python

        python = str(venv_python(Path(spec["output_dir"])))
    try:
        return run_json_child([python, str(REPO / COMMAND), "--child", spec_path, result_path], result_path,
                              timeout_s=timeout_s, env=env, log_path=log_path, tail=1500)
    except ChildFailed as err:
        return {"arm": spec["arm"], "run": spec["run"], "error": f"{err}; log {log_path}:\n{err.output}"}


def main_parent(cfg: BenchArgs) -> dict:
    import torch

    from align.models.loading import cpu_description, cpu_flags, resolve_dtype

    from .flops import machine_peak

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = cfg.dtype if cfg.dtype != "auto" else {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[resolve_dtype("auto")]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(arm.split(":")[0] == "trl-ppo" for arm in cfg.compare):
        from bench.trl_ppo.venv import ensure_venv

        ensure_venv(out)  # once: before any arm runs, so that a venv that cannot be built costs no run
    peak = machine_peak(device, dtype)
    runs = []
    for run in range(1, cfg.repeats + 1):
        for arm in cfg.compare:
            spec = {**asdict(cfg), "arm": arm, "run": run, "dtype": dtype}
            log = out / f"{cfg.stage}_{arm.replace(':', '_').replace('=', '-')}_run{run}.log"
            print(f"[bench] {cfg.stage} {arm} run {run}/{cfg.repeats} ...", file=sys.stderr, flush=True)
            started = time.time()
            result = run_arm(spec, log, cfg.timeout_s)
            runs.append(result)
            state = "FAILED" if "error" in result else f"{result['train_tokens_per_s']:.1f} train tok/s, peak {result['peak_mb']:.0f} MB"
            print(f"[bench]   {state} ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    peak = max(peak, machine_peak(device, dtype))  # measured before and after the runs; the better one
    ok = [r for r in runs if "error" not in r]
    report = {
        "setup": {**asdict(cfg), "device": device, "cpu": cpu_description(), "cpu_flags": cpu_flags(), "dtype": dtype, "threads": torch.get_num_threads(), "peak_flops": peak,
                  "data": ok[0]["data"] if ok else cfg.data, "command": " ".join([sys.executable, COMMAND] + sys.argv[1:])},
        "runs": runs,
        "summary": summarize(runs, cfg.compare),
    }
    for r in ok:
        r["mfu_train"] = r["train_flops_per_s"] / peak
        r["mfu_end_to_end"] = r["end_to_end_flops_per_s"] / peak
    path = out / f"bench_{cfg.stage}.json"
    path.write_text(json.dumps(report, indent=2))
    print(format_table(report))
    print(f"[bench] wrote {path}", file=sys.stderr)
    if len(ok) < len(runs):
        raise SystemExit(1)
    return report


@cli_main
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        from .runs import run_child

        spec = json.loads(Path(argv[1]).read_text())
        result = run_child(spec)
        Path(argv[2]).write_text(json.dumps(result))
        return
    main_parent(parse_config(BenchArgs, argv))
