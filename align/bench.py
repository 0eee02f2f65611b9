"""Benchmark a training stage: wall time, tokens per second, peak memory and MFU, per step and per phase.

    python -m align.bench --stage dpo --steps 8                                   # the DPO recipe alone
    python -m align.bench --stage dpo --compare trl-baseline,align --steps 8 --repeats 2
    python -m align.bench --stage dpo --compare align,align:share_prompt=false:fast_logprobs=false
    python -m align.bench --stage sft --compare trl-baseline,align               # also: reward
    python -m align.bench --stage grpo --compare trl-baseline,align --steps 4    # GRPO, verifier reward, ifprefs prompts

Each run of an arm is a fresh subprocess (`python -m align.bench --child SPEC`), so peak memory never
mixes; arms alternate (A B A B ...) so that load from other processes hits them alike. Arms:

- `trl-baseline`: the stage's script from TRL's documentation with TRL's defaults (the model passed by
  name, `peft_config=LoraConfig(...)`, `DPOConfig`/`SFTConfig`/`RewardConfig` defaults: no precomputed
  reference log-probs, gradient checkpointing on, TRL's fused LM head). What it shares with `align` so
  that the two train the same thing: model, data rows and order, seed, LoRA (r, alpha, dropout, all
  linear), learning rate and schedule, batch size, max_length, steps. One departure: on a CPU without
  native bf16, `bf16=False` (TRL's default would emulate bf16, several times slower). SFT: the recipe trains
  on assistant turns only, so the baseline sets `assistant_only_loss=True` and gets the recipe's marked chat
  template (align.chat.training_chat_template): both losses are the mean NLL of the same tokens.
- `align`: the recipe (`recipes/<stage>.py`) with its defaults; `align:field=value:...` overrides fields
  of the recipe's config (ablations of the DPO levers in align/dpo_fast.py).

Measured, per step: wall time (end of one optimizer step to the end of the next, data loading
included), tokens, tokens/s, peak memory, loss. Per phase (load, init, precompute_ref, train): time and
peak memory. The bench listens and replaces nothing in a trainer: steps and losses come from TRL's
callback events (a TrainerCallback: on_step_begin, on_step_end, on_log, whose `num_tokens` gives a step's
tokens), the phases inside a trainer from the events it reports (align.phases): the DPO recipe's
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
A step's phases, as both arms' trainers report them (align.phases.ReportGenerationMixin: the recipe's trainer
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

import contextlib
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from align.config import arg, parse_config
from align.errors import ConfigError, cli_main

REPO = Path(__file__).resolve().parent.parent
STAGES = ("dpo", "sft", "reward", "ppo", "grpo")
ARMS = ("trl-baseline", "align")
PPO_ARMS = ("dpo-align", "align")  # the DPO recipe on the same base (for memory), the PPO engine


@dataclass
class BenchArgs:
    stage: Literal["dpo", "sft", "reward", "ppo", "grpo"] = arg("dpo", "the stage to run: dpo, sft, reward, grpo, or ppo (arms dpo-align and align)")
    compare: list[str] = arg(["align"], "arms, run in this order and alternated: trl-baseline, align, align:field=value:... (ppo: dpo-align, align)")
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


# ------------------------------------------------------------------------------------------ FLOPs


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


def ppo_phase_flops(n_params: int, n_head: int, prompt_tokens: int, new_tokens: int, ppo_epochs: int) -> dict[str, float]:
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

    >>> ppo_phase_flops(1100, 100, prompt_tokens=8, new_tokens=2, ppo_epochs=1)["update"]  # 8*1000*10 + 4*100*2
    80800
    """
    decoder, seq = n_params - n_head, prompt_tokens + new_tokens
    forward, trained = FLOPS_PER_TOKEN["forward"], FLOPS_PER_TOKEN["lora"]
    return {
        "generate": forward * (decoder * seq + n_head * new_tokens),
        "score": 3 * forward * decoder * seq + 2 * forward * n_head * new_tokens,
        "update": ppo_epochs * (2 * trained * decoder * seq + trained * n_head * new_tokens),
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
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _machine_peak(device: str, dtype: str) -> float:
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


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ memory


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


class MemoryMeter:
    """Peak memory (MiB) since the last `reset`, plus running peaks for any number of open spans.

    CPU: VmHWM, which writing "5" to /proc/self/clear_refs resets to the current RSS (Linux >= 4.0); where
    that is not allowed, a thread samples VmRSS every 5 ms instead. CUDA: max_memory_allocated.
    """

    def __init__(self, device: str):
        self.device = device
        self.spans: list[dict] = []
        self.method = "cuda.max_memory_allocated" if device == "cuda" else "VmHWM"
        self._sampled = 0.0
        if device != "cuda":
            try:
                self._clear()
            except OSError:
                self.method = "VmRSS sampled every 5 ms"
                import threading

                threading.Thread(target=self._sample, daemon=True).start()

    def current_mb(self) -> float:
        if self.device == "cuda":
            import torch

            return torch.cuda.memory_allocated() / 2**20
        return _proc_status_kb("VmRSS") / 1024

    def _sample(self) -> None:
        while True:
            self._sampled = max(self._sampled, self.current_mb())
            time.sleep(0.005)

    def _clear(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        elif self.method == "VmHWM":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self._sampled = self.current_mb()

    def peak_mb(self) -> float:
        """Peak since the last reset."""
        if self.device == "cuda":
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        if self.method == "VmHWM":
            return _proc_status_kb("VmHWM") / 1024
        return max(self._sampled, self.current_mb())

    def reset(self) -> None:
        peak = self.peak_mb()
        for span in self.spans:
            span["peak"] = max(span["peak"], peak)
        self._clear()

    @contextlib.contextmanager
    def span(self):
        """Yields a dict whose "peak" is the peak memory over the `with` block, resets inside included."""
        span = {"peak": 0.0}
        self.reset()
        self.spans.append(span)
        try:
            yield span
        finally:
            span["peak"] = max(span["peak"], self.peak_mb())
            # by identity: list.remove compares dicts by value, and a nested span whose peak equals its
            # parent's would remove the parent instead
            self.spans = [s for s in self.spans if s is not span]


class Phases:
    """Time and peak memory of named phases; a phase opened inside another pauses the outer one's clock.

    Open a phase with `with phases(name):`, or let a trainer report it: Phases is a phase listener
    (align.phases), so `on_phase_start(name)` / `on_phase_end(name)` open and close the same phase.
    """

    def __init__(self, meter: MemoryMeter, device: str):
        self.meter, self.device = meter, device
        self.result: dict[str, dict[str, float]] = {}
        self._open: list[str] = []
        self._reported: list[tuple[str, contextlib.ExitStack]] = []

    def on_phase_start(self, name: str) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(self(name))
        self._reported.append((name, stack))

    def on_phase_end(self, name: str) -> None:
        opened, stack = self._reported.pop()
        if opened != name:
            raise RuntimeError(f"phase {name!r} ended while {opened!r} was open")
        stack.close()

    @contextlib.contextmanager
    def __call__(self, name: str):
        _sync(self.device)
        start = time.perf_counter()
        self._open.append(name)
        try:
            with self.meter.span() as span:
                yield
        finally:
            _sync(self.device)
            self._open.pop()
            elapsed = time.perf_counter() - start
            nested = sum(v["time_s"] for v in self.result.values() if v["inside"] == name)
            self.result[name] = {"time_s": elapsed - nested, "peak_mb": span["peak"], "inside": self._open[-1] if self._open else None}

    def table(self) -> dict[str, dict[str, float]]:
        return {k: {"time_s": round(v["time_s"], 3), "peak_mb": round(v["peak_mb"], 1)} for k, v in self.result.items()}


# ------------------------------------------------------------------------------------------ data


_TOPICS = [
    "the ocean tides", "city bicycles", "coffee roasting", "volcanoes", "public libraries", "honeybees",
    "the night sky", "baking bread", "chess openings", "rain forests", "electric cars", "the moon",
    "jazz music", "mountain hiking", "recycling plastic", "a good night's sleep", "night trains",
    "vegetable gardens", "the human heart", "making paper", "desert plants", "old lighthouses",
]
_ASKS = [
    "Write {n} sentences about {topic}.",
    "Explain {topic} to a ten-year-old in fewer than {w} words.",
    "Give me a short list of facts about {topic}, with exactly {n} bullet points.",
    "Describe {topic} and end your answer with the word 'Done'.",
    "Write a short paragraph about {topic} and use the word '{kw}' at least twice.",
    "Tell me why people care about {topic}. Answer in {n} sentences, all in lowercase.",
]
_CONTEXT = [
    "I am preparing a lesson for my students next week.",
    "My grandmother asked me about this yesterday and I did not know what to say.",
    "Please keep it friendly and simple.",
    "I only need the main ideas, nothing too technical.",
    "This is for a newsletter that goes out on Friday.",
]
_OPENERS = ["Here is what I know.", "Sure.", "Good question.", "Of course, here you go.", "Let me explain."]
_SENTENCES = [
    "{Topic} can teach us a lot about patience and care.",
    "Many people first notice {topic} when they are young, and the interest often stays for life.",
    "Scientists have studied {topic} for more than a hundred years, and they still find surprises.",
    "One simple way to learn about {topic} is to watch closely and write down what you see.",
    "It is easy to forget how much work goes into {topic} behind the scenes.",
    "Some of the best stories about {topic} come from ordinary people, not experts.",
    "If you want to go further, a local library will have several good books on {topic}.",
    "The most important thing about {topic} is that it changes slowly over time.",
    "People who care about {topic} often meet to share tips and small discoveries.",
    "A common mistake is to think that {topic} is simple, when it is full of small details.",
    "You do not need expensive tools to enjoy {topic}; curiosity is enough.",
    "In many places, {topic} is part of everyday life, and nobody thinks twice about it.",
]
_KEYWORDS = ["bright", "gentle", "careful", "steady", "simple"]


def synthetic_pairs(n: int, seed: int = 0):
    """`n` natural-ish preference pairs (instruction prompts with a constraint, replies of 1-9 sentences),
    the same for the same seed: the stand-in while the built-in data is missing."""
    from align.records import PreferencePair

    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        topic = rng.choice(_TOPICS)
        k = rng.randint(2, 6)
        ask = rng.choice(_ASKS).format(n=k, topic=topic, w=10 * k + 20, kw=rng.choice(_KEYWORDS))
        context = " ".join(rng.sample(_CONTEXT, rng.randint(0, 3)))
        prompt = (context + " " + ask).strip()

        def reply(sentences: int) -> str:
            body = [s.format(topic=topic, Topic=topic[0].upper() + topic[1:]) for s in rng.sample(_SENTENCES, sentences)]
            return " ".join([rng.choice(_OPENERS)] + body)

        chosen, rejected = reply(k), reply(rng.randint(1, 9))
        if chosen == rejected:
            rejected = rejected + " That is all."
        pairs.append(PreferencePair(prompt=[{"role": "user", "content": prompt}], chosen=chosen, rejected=rejected, source=f"synthetic:{i}"))
    return pairs


def load_slice(kind: str, source: str, rows: int, tokenizer, max_length: int, seed: int) -> tuple[list, str]:
    """`rows` training records of `kind` ("prefs" or "sft") no longer than max_length, and where they came from."""
    from align.data.load import check_lengths, load_preferences, load_sft
    from align.data.sources import datasets_dir
    from align.records import SFTExample

    if source == "auto":
        source = "ifprefs:prefs_train" if (datasets_dir() / "ifprefs").is_dir() else "synthetic"
    if source == "synthetic":
        records = []
        for attempt in range(8):  # overlong rows are dropped; draw more until there are enough
            pairs = synthetic_pairs(rows * (attempt + 2), seed)
            records = check_lengths(pairs, tokenizer, max_length, on_too_long="skip")
            if len(records) >= rows:
                break
        if kind == "sft":
            records = [SFTExample(messages=p.prompt + [{"role": "assistant", "content": p.chosen}], source=p.source) for p in records]
    else:
        if kind == "sft" and source == "ifprefs:prefs_train":
            source = "ifprefs:sft"
        loader = load_preferences if kind == "prefs" else load_sft
        records = check_lengths(loader(source, max_rows=rows * 4), tokenizer, max_length, on_too_long="skip")
    if len(records) < rows:
        raise ConfigError(f"data {source}: {len(records)} rows of at most {max_length} tokens; the run needs {rows}")
    return records[:rows], source


# ------------------------------------------------------------------------------------------ one run (child)


def _load_recipe(stage: str):
    """recipes/<stage>.py as a module (its main() is not run)."""
    import importlib.util

    path = REPO / "recipes" / f"{stage}.py"
    spec = importlib.util.spec_from_file_location(f"align_recipe_{stage}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recipe_config(stage: str, module, spec: dict, out_dir: str, overrides: dict[str, str]):
    from align.config import build_config

    cls = {"dpo": "DPOArgs", "sft": "SFTArgs", "reward": "RewardArgs", "grpo": "GRPOArgs"}[stage]
    values: dict[str, Any] = dict(
        model_name_or_path=spec["model_path"], output_dir=out_dir, seed=spec["seed"], max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"], max_length=spec["max_length"], lora_r=spec["lora_r"],
        lora_alpha=2 * spec["lora_r"], dtype=spec["dtype"], quantization="none", report_to="none",
        logging_steps=1, save_steps=spec["steps"] + 1000, eval_data=None,
    )
    if stage == "dpo" and spec["threads"]:
        values["cpu_threads"] = spec["threads"]  # --threads holds for every arm; the recipe would choose its own
    if stage == "grpo":  # --batch_size counts prompts; the recipe's batch counts replies
        import dataclasses

        generations = overrides.get("num_generations", {f.name: f.default for f in dataclasses.fields(module.GRPOArgs)}["num_generations"])
        values["per_device_train_batch_size"] = spec["batch_size"] * int(generations)
    values.update(overrides)
    cfg = build_config(getattr(module, cls), values, where=f"align arm overrides ({stage})")
    if getattr(cfg, "gradient_checkpointing", False) is None:  # the recipe's hardware default
        from align.train import default_gradient_checkpointing

        cfg.gradient_checkpointing = default_gradient_checkpointing()
    return cfg


def _baseline_args(spec: dict, out_dir: str, learning_rate: float) -> dict:
    """The fields every baseline sets in its TRL config; the rest are the config's defaults."""
    import torch

    args = dict(output_dir=out_dir, seed=spec["seed"], max_steps=spec["steps"], learning_rate=learning_rate, logging_steps=1,
                save_strategy="no", report_to=[], model_init_kwargs={"dtype": spec["dtype_name_torch"]})
    if not torch.cuda.is_available():
        args.update(use_cpu=True, bf16=spec["dtype"] == "bf16")  # TRL's bf16 default would be emulated here
    return args


def _baseline_lora(spec: dict) -> dict:
    return dict(r=spec["lora_r"], lora_alpha=2 * spec["lora_r"], lora_dropout=0.05, target_modules="all-linear")


def _baseline_trainer(stage: str, spec: dict, dataset, tokenizer, out_dir: str, learning_rate: float):
    """The stage's TRL documentation script: the model by name, a LoraConfig, the config's defaults."""
    from peft import LoraConfig

    common = dict(_baseline_args(spec, out_dir, learning_rate), per_device_train_batch_size=spec["batch_size"],
                  max_length=spec["max_length"])
    lora = _baseline_lora(spec)
    if stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer(model=spec["model_path"], args=DPOConfig(**common), train_dataset=dataset,
                          processing_class=tokenizer, peft_config=LoraConfig(task_type="CAUSAL_LM", **lora))
    if stage == "sft":  # assistant_only_loss, as the recipe trains: both arms' losses are over the same tokens
        from trl import SFTConfig, SFTTrainer

        return SFTTrainer(model=spec["model_path"], args=SFTConfig(**common, assistant_only_loss=True), train_dataset=dataset,
                          processing_class=tokenizer, peft_config=LoraConfig(task_type="CAUSAL_LM", **lora))
    from trl import RewardConfig, RewardTrainer

    return RewardTrainer(model=spec["model_path"], args=RewardConfig(**common), train_dataset=dataset,
                         processing_class=tokenizer, peft_config=LoraConfig(task_type="SEQ_CLS", **lora))


def _align_trainer(stage: str, cfg, module, model, tokenizer, dataset, callbacks):
    """The recipe's own trainer: recipes/<stage>.py's build_trainer."""
    if stage == "sft":
        return module.build_trainer(cfg, model, tokenizer, dataset, None, callbacks)
    return module.build_trainer(cfg, model, tokenizer, dataset, callbacks)


def run_child(spec: dict) -> dict:
    """One run of one arm, in this (fresh) process; returns the result record."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    import datasets  # noqa: F401  (imported before the start RSS is taken, like everything else the arms use)
    import peft  # noqa: F401
    import transformers
    from trl import DPOTrainer, RewardTrainer, SFTTrainer  # noqa: F401

    import align.train  # noqa: F401
    from align.models import resolve_model_path

    if spec["stage"] == "ppo":
        import align.rl.ppo.trainer  # noqa: F401
    if spec["stage"] == "grpo":
        from trl import GRPOTrainer, RLOOTrainer  # noqa: F401

    transformers.logging.set_verbosity_error()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meter = MemoryMeter(device)
    start_mb = meter.current_mb()
    phases = Phases(meter, device)
    out_dir = tempfile.mkdtemp(prefix=f"align-bench-{spec['stage']}-")
    spec = {**spec, "model_path": resolve_model_path(spec["model_name_or_path"], verbose=False),
            "dtype_name_torch": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[spec["dtype"]]}
    try:
        if spec["stage"] == "ppo" and spec["arm"].split(":")[0] == "align":
            run = _ppo_run(spec, phases, meter, device, out_dir)
        elif spec["stage"] == "grpo":
            run = _grpo_run(spec, phases, meter, device, out_dir)
        else:
            run = _trainer_run(spec, phases, meter, device, out_dir)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    steps = run.pop("steps")
    timed = steps[spec["warmup_steps"]:]
    train_time = sum(s["train_time_s"] for s in timed)
    train_tokens = sum(s["tokens"] for s in timed)
    all_tokens = sum(s["tokens"] for s in steps)
    e2e_time = run.pop("extra_time_s") + sum(s["time_s"] for s in steps)
    e2e_flops = run.pop("extra_flops") + sum(s["flops"] for s in steps)
    phase_table = phases.table()
    over = start_mb if device == "cpu" else 0.0
    return {
        "stage": spec["stage"], "arm": spec["arm"], "run": spec["run"], "device": device, "dtype": spec["dtype"],
        "threads": torch.get_num_threads(), "model": spec["model_name_or_path"],
        "memory_method": meter.method, "start_mb": round(start_mb, 1), **run,
        "steps": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()} for s in steps],
        "phases": phase_table,
        "train_tokens_per_s": train_tokens / train_time,
        "end_to_end_tokens_per_s": all_tokens / e2e_time,
        "train_flops_per_s": sum(s["train_flops"] for s in timed) / train_time,
        "end_to_end_flops_per_s": e2e_flops / e2e_time,
        "step_time_s_median": statistics.median(s["time_s"] for s in timed),
        "peak_mb": round(max(p["peak_mb"] for p in phase_table.values()) - over, 1),
        "train_peak_mb": round(phase_table["train"]["peak_mb"] - over, 1),
        "losses": [s.get("loss") for s in steps],
        "tokens_total": all_tokens,
    }


def _trained_model(trainer) -> tuple[Any, bool, float | None]:
    """The trainer's base model (adapters aside), whether it trains LoRA adapters, and the sum of |LoRA A| (call it
    before training: two arms with equal sums start from the same adapters)."""
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    base_model = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    lora_a = [p for n, p in sorted(unwrapped.named_parameters()) if "lora_A" in n and ".default." in n]
    checksum = float(sum(p.detach().double().abs().sum() for p in lora_a)) if lora_a else None
    return base_model, hasattr(unwrapped, "peft_config"), checksum


def _step_clock(device: str, meter: MemoryMeter):
    """A TrainerCallback base that clocks optimizer steps: the memory peak is reset at each step's start and
    `lap()` (called at its end) gives the seconds since the previous step ended (the first: since training began)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            _sync(device)
            self.last = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            meter.reset()

        def lap(self) -> float:
            _sync(device)
            now = time.perf_counter()
            seconds, self.last = now - self.last, now
            return seconds

    return StepClock


def _trainer_run(spec: dict, phases: Phases, meter: MemoryMeter, device: str, out_dir: str) -> dict:
    """A stage that is a TRL trainer (the DPO, SFT and reward recipes, and TRL's baselines)."""
    import transformers

    from align.data.load import to_hf_dataset
    from align.models import load_model, load_tokenizer

    name, *override_items = spec["arm"].split(":")
    overrides = dict(item.split("=", 1) for item in override_items)
    stage = "dpo" if spec["stage"] == "ppo" else spec["stage"]  # ppo's dpo-align arm: the DPO recipe
    name = "align" if name == "dpo-align" else name

    steps: list[dict] = []

    class Recorder(_step_clock(device, meter)):
        """TRL's step events, and the phases the recipe's trainer reports (align.phases: DPO's precompute_ref,
        which TRL runs inside DPOTrainer.__init__) timed as phases of their own."""

        tokens_seen = 0

        def on_phase_start(self, name: str) -> None:
            phases.on_phase_start(name)

        def on_phase_end(self, name: str) -> None:
            phases.on_phase_end(name)

        def on_step_end(self, args, state, control, **kwargs):
            steps.append({"step": state.global_step, "time_s": self.lap(), "peak_mb": meter.peak_mb()})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not (logs and steps and steps[-1]["step"] == state.global_step):
                return
            if "loss" in logs:
                steps[-1]["loss"] = float(logs["loss"])
            # TRL's num_tokens: the non-padding tokens trained on so far (the attention mask's sum; a padding-free
            # batch's length), counted the same for every arm
            if "num_tokens" in logs:
                steps[-1]["tokens"] = int(logs["num_tokens"]) - self.tokens_seen
                self.tokens_seen = int(logs["num_tokens"])

    kind = "sft" if stage == "sft" else "prefs"
    with phases("load"):
        tokenizer = load_tokenizer(spec["model_path"])
        records, source = load_slice(kind, spec["data"], spec["steps"] * spec["batch_size"], tokenizer, spec["max_length"], spec["seed"])
        dataset = to_hf_dataset(records)
        if name == "align":
            module = _load_recipe(stage)
            cfg = _recipe_config(stage, module, spec, out_dir, overrides)
            transformers.set_seed(cfg.seed)
            model, tokenizer = load_model(cfg, task="reward" if stage == "reward" else "causal_lm")
        if stage == "sft" and (name != "align" or cfg.assistant_only_loss):
            from align.chat import training_chat_template

            # the recipe's marked template in both arms (TRL would swap in its own), so that the same tokens carry labels
            tokenizer.chat_template = training_chat_template(tokenizer)
    with phases("init"):
        if name == "align":
            from align.train import guard_callbacks

            trainer = _align_trainer(stage, cfg, module, model, tokenizer, dataset, guard_callbacks(out_dir) + [Recorder()])
            trainer.args.save_strategy = "no"  # the recipe would also save at the end; no arm saves here
        else:
            learning_rate = _recipe_config(stage, _load_recipe(stage), spec, out_dir, {}).learning_rate  # as align trains
            trainer = _baseline_trainer(stage, spec, dataset, tokenizer, out_dir, learning_rate)
            trainer.add_callback(Recorder())

    base_model, lora, lora_checksum = _trained_model(trainer)
    n_params = matmul_params(base_model)
    with phases("train"):
        trainer.train()
    unlogged = [s["step"] for s in steps if "tokens" not in s]
    if unlogged:
        raise RuntimeError(f"steps {unlogged}: the trainer logged no num_tokens (the bench logs every step: logging_steps 1)")
    if name == "align" and getattr(cfg, "precompute_ref_log_probs", False) and "precompute_ref" not in phases.result:
        raise RuntimeError("the DPO trainer precomputed reference log-probs without reporting the phase (align.phases)")

    precomputed = "precompute_ref" in phases.result
    ref_in_step = stage == "dpo" and not precomputed  # TRL's default: a reference forward every step
    for s in steps:
        s["tokens_per_s"] = s["tokens"] / s["time_s"]
        s["flops"] = s["train_flops"] = stage_flops(n_params, s["tokens"], s["tokens"] if ref_in_step else 0, lora)
        s["train_time_s"] = s["time_s"]
    all_tokens = sum(s["tokens"] for s in steps)
    return {
        "data": source, "n_params_matmul": n_params, "lora": lora,
        "lora_A_init_abs_sum": lora_checksum,
        "steps": steps,
        # precomputed reference log-probs: their time and FLOPs belong to the end-to-end figures
        "extra_time_s": phases.result.get("precompute_ref", {}).get("time_s", 0.0),
        "extra_flops": stage_flops(n_params, 0, all_tokens, lora) if precomputed else 0,
    }


class PPOSteps:
    """One step record per PPO update, built from the events the trainer reports (align.phases): its generate,
    score and update phases timed and measured by a `Phases` of their own, then `on_log` with the update's
    rollout. A phase the trainer did not report is an error, not a zero."""

    MEASURED = ("generate", "score", "update")

    def __init__(self, meter: MemoryMeter, device: str, n_params: int, n_head: int, ppo_epochs: int):
        self.phases = Phases(meter, device)
        self.n_params, self.n_head, self.ppo_epochs = n_params, n_head, ppo_epochs
        self.steps: list[dict] = []
        self.start = time.perf_counter()  # the end of the previous update's log (the caller resets it before training)

    def on_phase_start(self, name: str) -> None:
        self.phases.on_phase_start(name)

    def on_phase_end(self, name: str) -> None:
        self.phases.on_phase_end(name)

    def on_log(self, metrics: dict, rollout) -> None:
        missing = [p for p in self.MEASURED if p not in self.phases.result]
        if missing:
            raise RuntimeError(f"PPO update {len(self.steps) + 1}: the trainer reported no {', '.join(missing)} phase (align.phases)")
        gen, score, update = (self.phases.result[p] for p in self.MEASURED)
        self.phases.result.clear()  # the next update must report its own
        prompt_tokens, new_tokens = int(rollout.query_mask.sum()), int(rollout.response_mask.sum())
        flops = ppo_phase_flops(self.n_params, self.n_head, prompt_tokens, new_tokens, self.ppo_epochs)
        step = {
            "step": len(self.steps) + 1, "time_s": time.perf_counter() - self.start,
            "tokens": self.ppo_epochs * (prompt_tokens + new_tokens), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "peak_mb": max(gen["peak_mb"], score["peak_mb"], update["peak_mb"]),
            "generate_s": gen["time_s"], "score_s": score["time_s"], "update_s": update["time_s"],
            "generate_peak_mb": gen["peak_mb"], "score_peak_mb": score["peak_mb"], "update_peak_mb": update["peak_mb"],
            "generate_flops": flops["generate"], "score_flops": flops["score"], "update_flops": flops["update"],
            "flops": sum(flops.values()), "train_flops": flops["update"], "train_time_s": update["time_s"],
            "loss": float(metrics.get("ppo/policy_loss", float("nan"))),
        }
        step["tokens_per_s"] = step["tokens"] / step["update_s"]
        self.steps.append(step)
        self.start = time.perf_counter()


def _ppo_run(spec: dict, phases: Phases, meter: MemoryMeter, device: str, out_dir: str) -> dict:
    """The PPO engine (align.rl.ppo) with the PPO recipe's defaults and the verifier as the reward; every
    update's generate, score and update phases timed and measured through the trainer's phase events
    (`PPOSteps`; see the module docstring)."""
    from align.config import build_config
    from align.data.load import check_lengths, load_prompts
    from align.rl.ppo.config import PPOArgs
    from align.rl.ppo.models import build_models
    from align.rl.ppo.trainer import PPOTrainer
    from align.verifier import verifier_reward

    overrides = dict(item.split("=", 1) for item in spec["arm"].split(":")[1:])
    values = dict(model_name_or_path=spec["model_path"], sft_dir=None, reward="verifier", total_updates=spec["steps"],
                  output_dir=out_dir, report_to="none", seed=spec["seed"], dtype=spec["dtype"], quantization="none",
                  lora_r=spec["lora_r"], lora_alpha=2 * spec["lora_r"], eval_prompts=None, num_eval_prompts=0,
                  save_steps=spec["steps"] + 1000)
    values.update(overrides)
    cfg = build_config(PPOArgs, values, where="ppo arm overrides")
    if cfg.return_freed_memory:  # as recipes/ppo.py does (the DPO arm's build_trainer does the same)
        from align.dpo_fast import return_freed_memory_to_os

        return_freed_memory_to_os()
    with phases("load"):
        models, plan = build_models(cfg)
        prompts = check_lengths(load_prompts(cfg.prompts, max_rows=spec["steps"] * cfg.rollout_batch_size * 4),
                                models.tokenizer, cfg.max_prompt_length, on_too_long="skip")
        prompts = [p for p in prompts if p.constraints][: spec["steps"] * cfg.rollout_batch_size]
    n_params = matmul_params(models.model.get_base_model())
    n_head = models.lm_head.weight.numel()
    recorder = PPOSteps(meter, device, n_params, n_head, cfg.ppo_epochs)
    with phases("init"):
        trainer = PPOTrainer(cfg, models, prompts, verifier_reward, verifier_fn=verifier_reward,
                             reward_is_verifier=True, reward_description="verifier", callbacks=[recorder])
    recorder.start = time.perf_counter()
    with phases("train"):
        trainer.train()
    ppo_config = {k: getattr(cfg, k) for k in ("rollout_batch_size", "response_length", "ppo_epochs", "minibatch_size",
                                               "micro_batch_size", "forward_batch_size", "gradient_checkpointing")}
    return {"data": cfg.prompts, "n_params_matmul": n_params, "n_params_lm_head": n_head, "lora": True, "lora_A_init_abs_sum": None,
            "steps": recorder.steps, "extra_time_s": 0.0, "extra_flops": 0, "ppo_config": ppo_config}


def _grpo_baseline_trainer(spec: dict, cfg, dataset, tokenizer, reward_funcs, out_dir: str):
    """TRL's documented GRPO script with GRPOConfig's defaults, sharing with the align arms what the module docstring
    lists (`cfg` is the recipe's config with its defaults: replies per prompt, longest reply, learning rate)."""
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from align.phases import ReportGenerationMixin

    class TRLGRPOTrainer(ReportGenerationMixin, GRPOTrainer):
        """TRL's GRPOTrainer, unchanged but for the phase events the bench listens to (align.phases)."""

    args = GRPOConfig(**_baseline_args(spec, out_dir, cfg.learning_rate), per_device_train_batch_size=cfg.per_device_train_batch_size,
                      num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length)
    return TRLGRPOTrainer(model=spec["model_path"], reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                       processing_class=tokenizer, peft_config=LoraConfig(task_type="CAUSAL_LM", **_baseline_lora(spec)))


def _grpo_recorder(device: str, meter: MemoryMeter):
    """The TrainerCallback class that records a GRPO step (a class made here: transformers is imported late)."""

    class GRPOSteps(_step_clock(device, meter)):
        """TRL's step events, and what the trainer reports inside a step (align.phases.ReportGenerationMixin):
        generate, nested in generate_and_score (whose rest is the score phase), the tokens generated, and
        every log-prob pass (no grad: score; with grad: the loss's, in update). Set n_params, n_head and
        trained_per_token (FLOPS_PER_TOKEN) before training."""

        def __init__(self):
            self.step: dict[str, float] = {}
            self.steps: list[dict] = []
            self.started: dict[str, float] = {}
            self.n_params = self.n_head = self.trained_per_token = 0

        def on_step_begin(self, args, state, control, **kwargs):
            super().on_step_begin(args, state, control, **kwargs)
            self.step.update(generate_s=0.0, score_s=0.0, generate_peak_mb=0.0, score_peak_mb=0.0, prompt_tokens=0, new_tokens=0,
                             tokens=0, forward_passes=0, generate_flops=0, score_flops=0, update_flops=0)

        def on_phase_start(self, name: str) -> None:
            _sync(device)
            self.started[name] = time.perf_counter()
            if name == "generate":
                self.span_stack = contextlib.ExitStack()
                self.span = self.span_stack.enter_context(meter.span())
            elif name == "generate_and_score":
                self.generated_before = self.step["generate_s"]

        def on_phase_end(self, name: str) -> None:
            if name == "generate":
                self.span_stack.close()
                _sync(device)
                self.step["generate_s"] += time.perf_counter() - self.started.pop(name)
                self.step["generate_peak_mb"] = max(self.step["generate_peak_mb"], self.span["peak"])
                meter.reset()  # the scoring's peak starts here
            elif name == "generate_and_score":
                _sync(device)
                self.step["score_s"] += time.perf_counter() - self.started.pop(name) - (self.step["generate_s"] - self.generated_before)
                self.step["score_peak_mb"] = max(self.step["score_peak_mb"], meter.peak_mb())
                meter.reset()  # the update's peak starts here

        def on_generated(self, prompt_tokens: int, new_tokens: int) -> None:
            self.step["prompt_tokens"] += prompt_tokens
            self.step["new_tokens"] += new_tokens
            self.step["generate_flops"] += pass_flops(self.n_params, self.n_head, prompt_tokens + new_tokens, new_tokens,
                                                      FLOPS_PER_TOKEN["forward"])

        def on_forward(self, tokens: int, head_tokens: int, with_grad: bool) -> None:
            if with_grad:  # the loss's pass; TRL makes the reference and old-policy passes under no_grad
                self.step["tokens"] += tokens
                self.step["update_flops"] += pass_flops(self.n_params, self.n_head, tokens, head_tokens, self.trained_per_token)
            else:
                self.step["forward_passes"] += 1
                self.step["score_flops"] += pass_flops(self.n_params, self.n_head, tokens, head_tokens, FLOPS_PER_TOKEN["forward"])

        def on_step_end(self, args, state, control, **kwargs):
            record = {"step": state.global_step, "time_s": self.lap(), **self.step, "update_peak_mb": meter.peak_mb()}
            record["update_s"] = record["time_s"] - record["generate_s"] - record["score_s"]
            record["peak_mb"] = max(record["generate_peak_mb"], record["score_peak_mb"], record["update_peak_mb"])
            record["flops"] = record["generate_flops"] + record["score_flops"] + record["update_flops"]
            record["train_flops"], record["train_time_s"] = record["update_flops"], record["update_s"]
            record["tokens_per_s"] = record["tokens"] / record["update_s"]
            record["generate_tokens_per_s"] = record["new_tokens"] / record["generate_s"] if record["generate_s"] else None
            self.steps.append(record)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and self.steps and self.steps[-1]["step"] == state.global_step:
                for key in ("loss", "reward"):
                    if logs.get(key) is not None:
                        self.steps[-1][key] = float(logs[key])

    return GRPOSteps


def _grpo_run(spec: dict, phases: Phases, meter: MemoryMeter, device: str, out_dir: str) -> dict:
    """GRPO through TRL: the grpo recipe's build_trainer (align arms) or TRL's documented script (trl-baseline), the
    recipe's reward functions in both; every step's generate, score and update timed and measured from the events
    the trainer reports (align.phases.ReportGenerationMixin; see the module docstring)."""
    import transformers

    from align.data.load import check_lengths, load_prompts
    from align.grpo import check_constraints_present, parse_rewards, prompt_dataset
    from align.models import load_model, load_tokenizer
    from align.train import guard_callbacks

    name, *override_items = spec["arm"].split(":")
    module = _load_recipe("grpo")
    cfg = _recipe_config("grpo", module, spec, out_dir, dict(item.split("=", 1) for item in override_items))
    with phases("load"):
        tokenizer = load_tokenizer(spec["model_path"])
        source = cfg.train_data if spec["data"] == "auto" else spec["data"]
        rows = spec["steps"] * spec["batch_size"]
        rewards = parse_rewards(cfg.reward)
        records = load_prompts(source, max_rows=rows * 4)
        if any(r.kind == "verifier" for r in rewards):
            check_constraints_present(records, source)
        records = check_lengths(records, tokenizer, cfg.max_length - cfg.max_completion_length, on_too_long="skip")[:rows]
        if len(records) < rows:
            raise ConfigError(f"data {source}: {len(records)} prompts of at most {cfg.max_length - cfg.max_completion_length} "
                              f"tokens in the first {rows * 4} rows; the run needs {rows}")
        dataset = prompt_dataset(records)
        reward_funcs = module.build_reward_funcs(cfg, rewards, records)
        transformers.set_seed(cfg.seed)  # TRL adds the LoRA before Trainer.__init__ seeds: seed both arms here
        if name == "align":
            model, tokenizer = load_model(cfg, lora=False)

    recorder = _grpo_recorder(device, meter)()
    with phases("init"):
        if name == "align":
            trainer = module.build_trainer(cfg, model, tokenizer, dataset, reward_funcs, guard_callbacks(out_dir) + [recorder])
            trainer.args.save_strategy = "no"  # the recipe would also save at the end; no arm saves here
        else:
            trainer = _grpo_baseline_trainer(spec, cfg, dataset, tokenizer, reward_funcs, out_dir)
            trainer.add_callback(recorder)
    base_model, lora, lora_checksum = _trained_model(trainer)
    n_params, n_head = matmul_params(base_model), base_model.get_output_embeddings().weight.numel()
    recorder.n_params, recorder.n_head, recorder.trained_per_token = n_params, n_head, FLOPS_PER_TOKEN["lora" if lora else "full"]
    with phases("train"):
        trainer.train()
    steps = recorder.steps
    if not any(s["new_tokens"] for s in steps):
        raise RuntimeError("the GRPO trainer reported no generation (align.phases.ReportGenerationMixin)")
    config_keys = ("per_device_train_batch_size", "num_generations", "max_completion_length", "temperature", "beta",
                   "loss_type", "learning_rate", "gradient_checkpointing")
    return {"data": source, "n_params_matmul": n_params, "n_params_lm_head": n_head, "lora": lora, "lora_A_init_abs_sum": lora_checksum,
            "steps": steps, "extra_time_s": 0.0, "extra_flops": 0,
            "grpo_config": {"algorithm": cfg.algorithm if name == "align" else "grpo",
                            **{k: getattr(trainer.args, k, None) for k in config_keys}}}


# ------------------------------------------------------------------------------------------ the invocation (parent)


def _run_arm(spec: dict, log_path: Path, timeout_s: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_path = f.name
    result_path = spec_path + ".result"
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false",
           "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "align.bench", "--child", spec_path, result_path]
    started = time.time()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code != 0 or not os.path.exists(result_path):
        tail = Path(log_path).read_text(errors="replace")[-1500:]
        return {"arm": spec["arm"], "run": spec["run"], "error": f"exit {code} after {time.time() - started:.0f} s; log {log_path}:\n{tail}"}
    with open(result_path) as f:
        return json.load(f)


def summarize(runs: list[dict], arms: list[str]) -> dict:
    """Per arm: medians over its runs; per arm after the first: ratios to the first, and the loss gap."""
    ok = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {"arms": {}, "ratios": {}}
    for arm in arms:
        mine = [r for r in ok if r["arm"] == arm]
        if not mine:
            continue
        out["arms"][arm] = {key: statistics.median(r[key] for r in mine) for key in (
            "train_tokens_per_s", "end_to_end_tokens_per_s", "peak_mb", "train_peak_mb", "step_time_s_median",
            "train_flops_per_s", "end_to_end_flops_per_s")}
        out["arms"][arm]["runs"] = len(mine)
    base = arms[0]
    for arm in arms[1:]:
        base_runs = [r for r in ok if r["arm"] == base]
        arm_runs = [r for r in ok if r["arm"] == arm]
        if not base_runs or not arm_runs:
            continue
        # ratios within each repeat (the runs that ran next to each other), then the median
        pairs = [(b, a) for b in base_runs for a in arm_runs if a["run"] == b["run"]]

        def ratio(key: str) -> float:
            return statistics.median(a[key] / b[key] for b, a in pairs)

        losses_b, losses_a = base_runs[0]["losses"], arm_runs[0]["losses"]
        # PPO's policy loss is not DPO's loss; GRPO's arms sample different replies (temperature, beta: TRL's defaults
        # in the baseline) and so take their losses over different data
        same_loss = base_runs[0]["stage"] not in ("ppo", "grpo")
        inits = (base_runs[0]["lora_A_init_abs_sum"], arm_runs[0]["lora_A_init_abs_sum"])
        gaps = [abs(x - y) for x, y in zip(losses_b, losses_a) if x is not None and y is not None] if same_loss else []
        out["ratios"][arm] = {
            "vs": base,
            "train_tokens_per_s": ratio("train_tokens_per_s"),
            "end_to_end_tokens_per_s": ratio("end_to_end_tokens_per_s"),
            "peak_mb": ratio("peak_mb"),
            "train_peak_mb": ratio("train_peak_mb"),
            "per_repeat_train_tokens_per_s": [a["train_tokens_per_s"] / b["train_tokens_per_s"] for b, a in pairs],
            "loss_max_abs_diff": max(gaps) if gaps else None,
            "loss_steps_compared": len(gaps),
            # None where an arm has no LoRA A checksum (PPO: its adapters are not the DPO arm's)
            "same_lora_init": None if None in inits else inits[0] == inits[1],
        }
    return out


def format_table(report: dict) -> str:
    head = report["setup"]
    lines = [
        f"stage {head['stage']} | {head['model_name_or_path']} | data {head['data']} | {head['steps']} steps x {head['batch_size']} "
        f"| max_length {head['max_length']} | {head['device']} {head['dtype']}, {head['threads']} threads "
        f"| matmul peak {head['peak_flops'] / 1e9:.1f} GFLOP/s",
        *[f"  {r['arm']}: prompts {r['data']} | {r['ppo_config']['rollout_batch_size']} rollouts x up to "
          f"{r['ppo_config']['response_length']} new tokens per update | ppo_epochs {r['ppo_config']['ppo_epochs']} "
          f"| minibatch {r['ppo_config']['minibatch_size']}" for r in report["runs"][:2] if "ppo_config" in r],
        *[f"  {r['arm']}: {r['grpo_config']['algorithm']} on prompts {r['data']} | {r['grpo_config']['per_device_train_batch_size']} replies "
          f"({r['grpo_config']['num_generations']} per prompt) of up to {r['grpo_config']['max_completion_length']} tokens per step "
          f"| temperature {r['grpo_config']['temperature']} | beta {r['grpo_config']['beta']} | lr {r['grpo_config']['learning_rate']:g} "
          f"| gradient checkpointing {r['grpo_config']['gradient_checkpointing']}"
          for r in report["runs"][:len(set(head['compare']))] if "grpo_config" in r],
        f"{'arm':<34} {'run':>3} {'train tok/s':>11} {'e2e tok/s':>9} {'step s':>7} {'peak MB':>8} {'train MB':>8} "
        f"{'MFU':>6} {'e2e MFU':>7} {'precomp s':>9}",
    ]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"{r['arm']:<34} {r['run']:>3} FAILED: {r['error'].splitlines()[0]}")
            continue
        lines.append(
            f"{r['arm']:<34} {r['run']:>3} {r['train_tokens_per_s']:>11.1f} {r['end_to_end_tokens_per_s']:>9.1f} "
            f"{r['step_time_s_median']:>7.2f} {r['peak_mb']:>8.0f} {r['train_peak_mb']:>8.0f} "
            f"{r['train_flops_per_s'] / head['peak_flops']:>6.1%} {r['end_to_end_flops_per_s'] / head['peak_flops']:>7.1%} "
            f"{r['phases'].get('precompute_ref', {}).get('time_s', 0.0):>9.1f}"
        )
    for r in report["runs"]:
        if "generate_s" not in (r.get("steps") or [{}])[0]:
            continue
        timed = r["steps"][head["warmup_steps"]:]
        total = {k: sum(s[f"{k}_s"] for s in timed) for k in ("generate", "score", "update")}
        whole = sum(s["time_s"] for s in timed)
        parts = ", ".join(
            f"{k} {total[k] / len(timed):.1f} s ({total[k] / whole:.0%}, "
            f"MFU {sum(s[f'{k}_flops'] for s in timed) / total[k] / head['peak_flops'] if total[k] else 0:.1%}, "
            f"peak {max(s[f'{k}_peak_mb'] for s in timed) - (r['start_mb'] if r['device'] == 'cpu' else 0):.0f} MB)"
            for k in total)
        new_tokens = sum(s["new_tokens"] for s in timed)
        rate = f"{new_tokens / total['generate']:.1f}" if total["generate"] else "n/a"
        if r["stage"] == "ppo":
            lines.append(f"ppo run {r['run']}, per update: {parts}; other {(whole - sum(total.values())) / len(timed):.1f} s; "
                         f"generation {rate} new tokens/s")
        else:  # grpo: update is the rest of the step
            rewards = [s["reward"] for s in r["steps"] if s.get("reward") is not None]
            reward = f"{rewards[0]:.3f} -> {rewards[-1]:.3f}" if rewards else "n/a"
            lines.append(f"{r['stage']} {r['arm']} run {r['run']}, per step: {parts}; generation {rate} reply tokens/s "
                         f"({new_tokens / len(timed):.0f} per step); reward mean {reward}")
    for arm, q in report["summary"]["ratios"].items():
        loss = "n/a" if q["loss_max_abs_diff"] is None else f"{q['loss_max_abs_diff']:.4f} over {q['loss_steps_compared']} steps"
        lines.append(
            f"{arm} / {q['vs']}: train tok/s {q['train_tokens_per_s']:.2f}x, end-to-end tok/s {q['end_to_end_tokens_per_s']:.2f}x, "
            f"peak memory {q['peak_mb']:.2f}x (train phase {q['train_peak_mb']:.2f}x); "
            f"loss max |diff| {loss}; same LoRA init: {'n/a' if q['same_lora_init'] is None else q['same_lora_init']}"
        )
    return "\n".join(lines)


def main_parent(cfg: BenchArgs) -> dict:
    import torch

    from align.models import resolve_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = cfg.dtype if cfg.dtype != "auto" else {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[resolve_dtype("auto")]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    peak = _machine_peak(device, dtype)
    runs = []
    for run in range(1, cfg.repeats + 1):
        for arm in cfg.compare:
            spec = {**asdict(cfg), "arm": arm, "run": run, "dtype": dtype}
            log = out / f"{cfg.stage}_{arm.replace(':', '_').replace('=', '-')}_run{run}.log"
            print(f"[bench] {cfg.stage} {arm} run {run}/{cfg.repeats} ...", file=sys.stderr, flush=True)
            started = time.time()
            result = _run_arm(spec, log, cfg.timeout_s)
            runs.append(result)
            state = "FAILED" if "error" in result else f"{result['train_tokens_per_s']:.1f} train tok/s, peak {result['peak_mb']:.0f} MB"
            print(f"[bench]   {state} ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    peak = max(peak, _machine_peak(device, dtype))  # measured before and after the runs; the better one
    ok = [r for r in runs if "error" not in r]
    report = {
        "setup": {**asdict(cfg), "device": device, "dtype": dtype, "threads": torch.get_num_threads(), "peak_flops": peak,
                  "data": ok[0]["data"] if ok else cfg.data, "command": " ".join([sys.executable, "-m", "align.bench"] + sys.argv[1:])},
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
        spec = json.loads(Path(argv[1]).read_text())
        result = run_child(spec)
        Path(argv[2]).write_text(json.dumps(result))
        return
    main_parent(parse_config(BenchArgs, argv))


if __name__ == "__main__":
    main()
