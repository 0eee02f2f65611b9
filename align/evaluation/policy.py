"""The policy to evaluate and its reference: a run directory, a model directory or `base`, loaded for inference."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml

from align.errors import AlignError
from align.evaluation.args import EvalArgs
from align.log import get_logger

logger = get_logger(__name__, tag="eval")


@dataclass
class Policy:
    """A model to evaluate and how to get its reference.

    kind: "model" (base or a model directory: its own reference), "adapter" (the reference is the PEFT
    model with the adapter disabled: `reference` when `model` is a merged copy of it, else `model` itself)
    or "merged" (the reference is `reference`, a separate model, or None when unknown).
    """

    model: Any
    tokenizer: Any
    kind: Literal["model", "adapter", "merged"]
    path: str
    reference: Any = None
    reference_name: str | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    method: str = "base"

    @property
    def has_reference(self) -> bool:
        return self.kind in ("model", "adapter") or self.reference is not None

    @property
    def is_own_reference(self) -> bool:
        return self.kind == "model"


@contextlib.contextmanager
def reference_of(policy: Policy) -> Iterator[Any]:
    """Yield the reference model: the policy with its adapter disabled, or the separate reference."""
    if policy.kind == "adapter":
        peft_model = policy.reference if policy.reference is not None else policy.model
        with peft_model.disable_adapter():
            yield peft_model
    elif policy.kind == "merged" and policy.reference is not None:
        yield policy.reference
    else:
        raise RuntimeError(f"reference_of: policy {policy.path} ({policy.kind}) has no separate reference")


def _read_run_file(run: Path, name: str) -> dict[str, Any]:
    path = run / name
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if name.endswith(".yaml") else json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError) as err:
        raise AlignError(f"{path}: cannot be read ({err})") from None
    return data if isinstance(data, dict) else {}


def merged_for_eval(cfg: EvalArgs, model):
    """`model` with its adapter folded into a copy of the weights (align.models.loading.merged_copy) when
    cfg.merge_adapter says so (auto = on a CPU); None when not merged."""
    from align.models.loading import merged_copy

    on_cpu = next(model.parameters()).device.type == "cpu"
    if cfg.merge_adapter == "true" or (cfg.merge_adapter == "auto" and on_cpu):
        return merged_copy(model)
    return None


def is_run_dir(path: Path) -> bool:
    """A directory a recipe wrote: an adapter at its root or in adapter/, or a full model in merged/."""
    return (path / "adapter_config.json").is_file() or (path / "adapter" / "adapter_config.json").is_file() or (
        path / "merged" / "config.json"
    ).is_file()


def default_out_dir(run: str) -> Path:
    return Path("outputs/base/eval") if run == "base" else Path(run) / "eval"


def load_run(run: str, dtype: str = "auto") -> tuple[Any, Any, Literal["model", "adapter", "merged"], str]:
    """(model, tokenizer, kind, path) of `run`, unquantized, in eval mode: `base` (the embedded default), a Hub id in
    the local cache, a model directory (kind "model"), or a run directory (kind "adapter": the PeftModel, or
    "merged": the full model a recipe saved). What `align eval` and `align chat` accept as RUN."""
    from align.models.loading import DEFAULT_MODEL, ModelArgs, load_model, load_trained

    root = Path(run)
    if run == "base" or not root.exists():
        name = DEFAULT_MODEL if run == "base" else run
        if name != DEFAULT_MODEL and "/" not in run:
            raise AlignError(f"{run}: no such run directory or model (expected a run directory, a model directory or 'base')")
    elif is_run_dir(root):
        model, tokenizer = load_trained(str(root), dtype=dtype)
        return model, tokenizer, "adapter" if hasattr(model, "disable_adapter") else "merged", str(root)
    elif not (root / "config.json").is_file():
        raise AlignError(f"{run}: not a run directory (no adapter/ or merged/) and not a model directory (no config.json)")
    else:
        name = str(root)
    model, tokenizer = load_model(ModelArgs(model_name_or_path=name, dtype=dtype, quantization="none"), lora=False)
    model.eval()
    return model, tokenizer, "model", name


def load_policy(run: str, cfg: EvalArgs) -> Policy:
    """Load `run` (base, a model directory or a run directory) with its reference; see the module docstring."""
    from align.models.loading import ModelArgs, load_model

    model, tokenizer, kind, path = load_run(run, cfg.dtype)
    if kind == "model":
        return Policy(model, tokenizer, "model", path, method="base")
    root = Path(run)
    run_config = _read_run_file(root, "config.yaml")
    method = _read_run_file(root, "summary.json").get("method") or run_config.get("method") or "base"
    if kind == "adapter":
        merged = merged_for_eval(cfg, model)
        return Policy(merged if merged is not None else model, tokenizer, "adapter", str(root),
                      reference=model if merged is not None else None,
                      reference_name="the base model with the adapter disabled", run_config=run_config, method=method)
    ref_name = cfg.ref_model or run_config.get("model_name_or_path")
    reference = None
    if ref_name:
        reference, _ = load_model(ModelArgs(model_name_or_path=str(ref_name), dtype=cfg.dtype, quantization="none"), lora=False)
        reference.eval()
    else:
        logger.warning(f"{run}: merged model with no --ref_model and no model_name_or_path in config.yaml: "
                       "KL and implicit rewards are not computed")
    return Policy(model, tokenizer, "merged", str(root), reference=reference, reference_name=ref_name,
                  run_config=run_config, method=method)


