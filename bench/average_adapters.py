"""Average the LoRA adapters of several checkpoints of one run into one adapter (a checkpoint soup).

    python bench/average_adapters.py OUT RUN/checkpoint-200 RUN/checkpoint-250 RUN/checkpoint-300
    python bench/average_adapters.py OUT CKPT... --mode factors

--mode exact (default): the mean of the checkpoints' weight deltas, exactly. Each delta is scale * B_i A_i, so the
mean is scale * [B_1 .. B_k] / k @ [A_1; ..; A_k]: an adapter of rank k*r (A stacked along the rank, B side by side
and divided by k; lora_alpha k times larger, so that alpha / r and with it the scale stay the same).
--mode factors: A and B averaged separately (rank r), what an exponential moving average of the factors during
training would keep; an approximation of the mean delta, whose relative error it prints.
OUT gets the adapter (adapter_config.json, adapter_model.safetensors) and the last checkpoint's tokenizer files,
so `python eval/evaluate.py OUT` evaluates it like any checkpoint. OUT must not exist (nothing is overwritten).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from align.errors import ConfigError, cli_main  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def average_exact(adapters: list[dict]) -> dict:
    """{name: tensor} of k rank-r adapters -> one rank-k*r adapter whose delta B @ A is the mean of theirs."""
    import torch

    k = len(adapters)
    out = {}
    for name in adapters[0]:
        if name.endswith("lora_A.weight"):  # (r, in) each -> (k*r, in)
            out[name] = torch.cat([a[name] for a in adapters], 0).contiguous()
        elif name.endswith("lora_B.weight"):  # (out, r) each -> (out, k*r), divided by k
            out[name] = (torch.cat([a[name] for a in adapters], 1) / k).contiguous()
        else:
            raise ConfigError(f"{name}: not a LoRA A or B weight; only plain LoRA adapters can be averaged exactly")
    return out


def average_factors(adapters: list[dict]) -> dict:
    """The mean of each tensor (A and B averaged separately: rank r, an approximation of the mean delta)."""
    return {name: (sum(a[name] for a in adapters) / len(adapters)).contiguous() for name in adapters[0]}


def delta_error(adapters: list[dict], averaged: dict) -> float:
    """Relative Frobenius error of the averaged adapter's deltas against the exact mean delta, over all layers."""
    num = den = 0.0
    for a_name in (n for n in averaged if n.endswith("lora_A.weight")):
        b_name = a_name.replace("lora_A", "lora_B")
        exact = sum(a[b_name] @ a[a_name] for a in adapters) / len(adapters)
        num += float((averaged[b_name] @ averaged[a_name] - exact).norm() ** 2)
        den += float(exact.norm() ** 2)
    return (num / den) ** 0.5 if den else 0.0


def read_adapter(checkpoint: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    config_path, weights_path = checkpoint / "adapter_config.json", checkpoint / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ConfigError(f"{path}: missing; expected a LoRA adapter checkpoint")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise ConfigError(f"{config_path}: expected a plain LoRA adapter (not DoRA or rsLoRA)")
    return config, load_file(str(weights_path))


@cli_main
def main() -> None:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="folder to write (must not exist)")
    parser.add_argument("checkpoints", nargs="+", help="checkpoint folders of one run, each with a LoRA adapter")
    parser.add_argument("--mode", choices=("exact", "factors"), default="exact")
    args = parser.parse_args()
    out, checkpoints = Path(args.out), [Path(c) for c in args.checkpoints]
    if out.exists():
        raise ConfigError(f"{out}: exists; choose a new folder (nothing is overwritten)")
    read = [read_adapter(c) for c in checkpoints]
    configs, adapters = [c for c, _ in read], [a for _, a in read]
    keys = [(c["r"], c["lora_alpha"], sorted(a)) for c, a in read]
    if any(k != keys[0] for k in keys):
        raise ConfigError("the checkpoints' adapters differ in rank, alpha or layers; expected checkpoints of one run")
    averaged = average_exact(adapters) if args.mode == "exact" else average_factors(adapters)
    config = dict(configs[-1])
    if args.mode == "exact":
        config["r"], config["lora_alpha"] = config["r"] * len(adapters), config["lora_alpha"] * len(adapters)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(averaged, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (checkpoints[-1] / name).is_file():
            shutil.copy(checkpoints[-1] / name, tmp / name)
    tmp.rename(out)
    print(f"wrote {out}: {args.mode} average of {len(adapters)} adapters, rank {config['r']}, "
          f"relative error of the mean delta {delta_error(adapters, averaged):.4f}")


if __name__ == "__main__":
    main()
