"""EvalArgs (the settings of one evaluation) and which of them must match for two evaluations to be compared."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


from align.config import arg
from align.errors import ConfigError


MODES = ("greedy", "sample")
DEFAULT_BETA = 0.1  # DPO's beta when the run's config.yaml names none (TRL's default)

# Settings that must be equal for two evaluations to be compared (align.report checks them).
COMPARABLE_SETTINGS = (
    "prompts", "max_prompts", "modes", "max_new_tokens", "temperature", "top_p", "seed",
    "pref_data", "max_pairs", "ppl_data", "max_ppl_rows",
    "top_k", "repetition_penalty", "no_repeat_ngram_size", "num_beams",
)
# What a summary.json written before these controls existed generated with (align.report compares with these).
SETTING_DEFAULTS = {"top_k": 0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "num_beams": 1}


@dataclass
class EvalArgs:
    prompts: str = arg("ifprefs:eval", "prompts to generate for: a prompt file, a preference test set, or a built-in NAME:SPLIT")
    out: str | None = arg(None, "output directory; none = RUN/eval (outputs/base/eval for base)")
    max_prompts: int = arg(100, "use the first N prompts")
    on_bad_rows: Literal["error", "skip"] = arg(
        "error", "a bad prompt row stops the evaluation with its file, line and field; skip = count, report and leave them out "
                 "(for an IFEval file: keep the prompts whose every instruction has a check here)")
    max_new_tokens: int = arg(128, "longest reply, in tokens")
    generate_batch_size: int = arg(64, "prompts generated for together (larger batches generate faster; mode sample seeds each batch)")
    batch_size: int = arg(16, "rows per scoring batch (log-probs, KL, reward model)")
    merge_adapter: Literal["auto", "true", "false"] = arg(
        "auto", "generate and score with the LoRA adapter folded into a copy of the weights (faster; the reference stays "
                "the base with the adapter off); auto = on a CPU, where it is 1.2x faster, not on a GPU, where the copy "
                "would double the weights' memory")
    modes: list[str] = arg(["greedy", "sample"], "sampling modes: greedy and/or sample (temperature, top_p, seed below)")
    temperature: float = arg(1.0, "sampling temperature of mode 'sample' (1 = the policy's own distribution)")
    top_p: float = arg(1.0, "nucleus sampling of mode 'sample' (1 = off; below 1 the KL estimate is biased)")
    top_k: int = arg(0, "mode 'sample': sample from the k most likely tokens only (0 = off; on, the KL estimate is biased)")
    repetition_penalty: float = arg(1.0, "both modes: divide a repeated token's positive logit by this (CTRL; 1 = off)")
    no_repeat_ngram_size: int = arg(0, "both modes: never generate an n-gram of this many tokens twice in one reply (0 = off)")
    num_beams: int = arg(1, "mode 'greedy': beam search over this many beams (1 = greedy decoding)")
    seed: int = arg(0, "sampling seed; batch i is sampled after torch.manual_seed(seed + i)")
    reward_model: str | None = arg(None, "a reward model directory (recipes/reward.py output) to score replies and pairs")
    ref_model: str | None = arg(None, "reference model for a merged run; none = the run's config.yaml model_name_or_path")
    pref_data: str | None = arg("ifprefs:prefs_test", "held-out preference pairs for preference accuracy; none = skip")
    max_pairs: int = arg(100, "use the first N pairs of pref_data")
    ppl_data: str | None = arg("ifprefs:sft_test", "held-out SFT conversations whose last reply's perplexity is measured; none = skip")
    max_ppl_rows: int = arg(50, "use the first N conversations of ppl_data")
    beta: float | None = arg(None, "DPO beta of the implicit reward; none = the run's config.yaml beta, else 0.1")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = arg("auto", "compute dtype; auto = bf16 where the hardware has it, else fp32")
    overwrite: bool = arg(False, "out holds an earlier evaluation (or report): move it aside to <out>.old-<time> first")

    def validate(self) -> None:
        for name in ("max_prompts", "max_new_tokens", "generate_batch_size", "batch_size", "max_pairs", "max_ppl_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config: {name}: expected a positive number, got {getattr(self, name)}")
        if not self.modes:
            raise ConfigError("config: modes: expected at least one of greedy, sample")
        for mode in self.modes:
            if mode not in MODES:
                raise ConfigError(f"config: modes: unknown mode {mode!r}; expected greedy and/or sample")
        if len(set(self.modes)) != len(self.modes):
            raise ConfigError(f"config: modes: {self.modes} names a mode twice")
        if not self.temperature > 0:
            raise ConfigError(f"config: temperature: expected a number > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"config: top_p: expected a number in (0, 1], got {self.top_p}")
        for name in ("top_k", "no_repeat_ngram_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config: {name}: expected 0 (off) or a positive number, got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"config: repetition_penalty: expected a number > 0 (1 = off), got {self.repetition_penalty}")
        if self.num_beams < 1:
            raise ConfigError(f"config: num_beams: expected 1 (greedy) or more beams, got {self.num_beams}")
        for name in ("prompts", "pref_data", "ppl_data", "reward_model", "ref_model"):
            if getattr(self, name) in ("none", "null", ""):
                setattr(self, name, None)
        if self.prompts is None:
            raise ConfigError("config: prompts: a prompt set is required")


