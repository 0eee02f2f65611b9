"""A PPO run on disk: the adapters it saves, and checkpoints to resume from.

checkpoints/update-NNNNNN/ holds policy/ and critic/ (standard PEFT adapter directories, the critic with
value_head.safetensors), state.pt (optimizer, scheduler, KL controller, counters, history) and
rng-rank*.pt; it is written to a temporary directory and renamed, so a kill leaves the previous one intact.
Everything is read back through safetensors and torch.load(weights_only=True) only.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from align.io import atomic_dir, atomic_write_text
from align.rl.ppo.config import CRITIC, POLICY
from align.rl.ppo.models import PPOModels

CHECKPOINT_PREFIX = "update-"


def export_adapter(models: PPOModels, name: str, directory: Path) -> None:
    """Adapter `name` as a standard PEFT adapter directory (loads with PeftModel.from_pretrained); the critic's
    with value_head.safetensors beside it, or that file alone for a shared critic (no adapter of its own)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    if name == CRITIC and models.shared_critic:
        save_file(_value_head_state(models), str(directory / "value_head.safetensors"))
        return
    state = get_peft_model_state_dict(models.model, adapter_name=name)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / "adapter_model.safetensors"))
    config = copy.deepcopy(models.model.peft_config[name])
    config.base_model_name_or_path = models.base.name
    config.inference_mode = True
    config.save_pretrained(str(directory))
    if name == CRITIC:
        save_file(_value_head_state(models), str(directory / "value_head.safetensors"))


def _value_head_state(models: PPOModels) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in models.value_head.state_dict().items()}


def load_adapter_weights(models: PPOModels, name: str, directory: Path) -> None:
    """Adapter `name`'s weights (and the critic's value head) from a directory `export_adapter` wrote."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not (name == CRITIC and models.shared_critic):
        state = load_file(str(directory / "adapter_model.safetensors"), device=str(models.device))
        set_peft_model_state_dict(models.model, state, adapter_name=name)
    if name == CRITIC:
        models.value_head.load_state_dict(load_file(str(directory / "value_head.safetensors"), device=str(models.device)))


def rng_state() -> dict[str, Any]:
    """This process's torch, Python, NumPy (and CUDA) generator states, as tensors and numbers torch.load(weights_only=True) reads."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """output_dir/checkpoints/update-N directories, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def write_checkpoint(path: Path, models: PPOModels, state: dict[str, Any], rng_states: list[dict[str, Any]],
                     last_good: Path | None) -> None:
    """policy/, critic/ (+ value head), state.pt and one rng-rank<r>.pt per process in `path`, atomically.

    A full disk or an I/O error raises the message of align.runs.checkpoint_write_error, which names
    `last_good`, the checkpoint left intact.
    """
    try:
        with atomic_dir(path) as tmp:
            export_adapter(models, POLICY, tmp / "policy")
            export_adapter(models, CRITIC, tmp / "critic")
            torch.save(state, tmp / "state.pt")
            for rank, rng in enumerate(rng_states):
                torch.save(rng, tmp / f"rng-rank{rank}.pt")
    except (OSError, RuntimeError) as err:  # a full disk, an I/O error (torch.save says RuntimeError)
        # atomic_dir removed the partial copy; the previous checkpoint was never touched
        from align.runs import checkpoint_write_error

        raise checkpoint_write_error(path, err, last_good) from err


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(path: Path, models: PPOModels, rank: int) -> dict[str, Any]:
    """Load the adapters and this process's RNG state from `path`; returns state.pt for the trainer."""
    load_adapter_weights(models, POLICY, path / "policy")
    load_adapter_weights(models, CRITIC, path / "critic")
    state = torch.load(path / "state.pt", map_location=models.device, weights_only=True)
    rng_file = path / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def truncate_metrics(output_dir: Path, update: int) -> None:
    """Drop metric lines an interrupted run wrote after its checkpoint at `update`: the file reads as one run."""
    path = output_dir / "metrics.jsonl"
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= update]
        atomic_write_text(path, "".join(line + "\n" for line in kept))
