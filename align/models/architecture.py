"""The architecture numbers a memory estimate needs (align.plan): hidden size, layers, heads, vocabulary, from a
preset, a model directory's config.json, or a Hub id whose config.json is in the local cache. Nothing is
downloaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from align.errors import AlignError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Arch:
    """The numbers of a Llama-style decoder that memory depends on."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool = False
    max_positions: int = 8192
    checkpoint_bytes: int = 2  # bytes per weight in the checkpoint files (bf16 unless the config says otherwise)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of the seven projections of one layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    def linear_params_per_layer(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    def bias_params_per_layer(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0

    def embedding_params(self, with_lm_head: bool) -> int:
        untied_head = with_lm_head and not self.tied_embeddings
        return self.vocab * self.hidden * (2 if untied_head else 1)

    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    def total_params(self, with_lm_head: bool = True) -> int:
        per_layer = self.linear_params_per_layer() + self.bias_params_per_layer()
        return self.layers * per_layer + self.embedding_params(with_lm_head) + self.norm_params()


def _preset(name, hidden, layers, heads, kv_heads, intermediate, vocab, tied, qkv_bias=False, max_positions=8192, checkpoint_bytes=2):
    return Arch(name, hidden, layers, heads, kv_heads, hidden // heads, intermediate, vocab, tied, qkv_bias, max_positions,
                checkpoint_bytes)


# Numbers from each model's published config.json (Instruct variants share the base's architecture).
PRESETS: dict[str, Arch] = {
    # align.models.loading caches the embedded default as fp32 safetensors (dequantized from its GGUF)
    "SmolLM2-135M-Instruct": _preset("SmolLM2-135M-Instruct", 576, 30, 9, 3, 1536, 49152, True, checkpoint_bytes=4),
    "Llama-3.2-1B": _preset("Llama-3.2-1B", 2048, 16, 32, 8, 8192, 128256, True, max_positions=131072),
    "Llama-3.2-3B": _preset("Llama-3.2-3B", 3072, 28, 24, 8, 8192, 128256, True, max_positions=131072),
    "Llama-3.1-8B": _preset("Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256, False, max_positions=131072),
    "Mistral-7B": _preset("Mistral-7B", 4096, 32, 32, 8, 14336, 32768, False, max_positions=32768),
    "Qwen2.5-7B": _preset("Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152064, False, qkv_bias=True, max_positions=32768),
}
_PRESET_ALIASES = {
    "smollm2-135m": "SmolLM2-135M-Instruct",
    "llama-3.1-8b": "Llama-3.1-8B", "meta-llama-3.1-8b": "Llama-3.1-8B", "llama-3-8b": "Llama-3.1-8B",
    "meta-llama-3-8b": "Llama-3.1-8B", "mistral-7b-v0.3": "Mistral-7B", "mistral-7b-v0.1": "Mistral-7B",
}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3")


def _preset_key(name: str) -> str | None:
    short = name.rstrip("/").split("/")[-1].lower()
    for suffix in ("-instruct", "-chat", "-it"):
        if short.endswith(suffix):
            short = short[: -len(suffix)]
            break
    short = short.replace("-instruct-v0.3", "").replace("-instruct-v0.2", "")
    for key in PRESETS:
        if key.lower() in (short, name.lower()) or key.lower().removesuffix("-instruct") == short:
            return key
    return _PRESET_ALIASES.get(short)


def arch_from_config(config: dict, name: str, where: str) -> Arch:
    """An Arch from a Hugging Face config.json mapping; `where` names the file in errors."""
    config = config.get("text_config", config) if "hidden_size" not in config else config
    model_type = config.get("model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise AlignError(
            f"{where}: model_type {model_type!r} is not one the planner knows; it handles Llama-style decoders "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return Arch(
            name=name,
            hidden=hidden,
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate=int(config["intermediate_size"]),
            vocab=int(config["vocab_size"]),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("attention_bias", model_type == "qwen2")),
            max_positions=int(config.get("max_position_embeddings") or 8192),
            checkpoint_bytes=4 if str(config.get("torch_dtype") or config.get("dtype")) == "float32" else 2,
        )
    except KeyError as err:
        raise AlignError(f"{where}: missing field {err.args[0]!r}") from None
    except (TypeError, ValueError) as err:
        raise AlignError(f"{where}: a size field is not an integer ({err})") from None


def _read_config(path: Path, name: str) -> Arch:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise AlignError(f"{path}: cannot read it as JSON ({err})") from None
    return arch_from_config(config, name, str(path))


def resolve_arch(model: str) -> Arch:
    """A directory with config.json, a preset, or a Hub id whose config.json is in the local HF cache."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AlignError(f"--model {model}: the directory has no config.json")
        return _read_config(path / "config.json", path.name)
    if path.suffix == ".json" and path.is_file():
        return _read_config(path, path.parent.name)
    key = _preset_key(model)
    if key is not None:
        return PRESETS[key]
    if "/" in model:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")  # local lookup only, never the network
        except Exception:  # noqa: BLE001 - a malformed id or cache is the same answer: not cached
            cached = None
        if isinstance(cached, str) and Path(cached).is_file():
            return _read_config(Path(cached), model.split("/")[-1])
    raise AlignError(
        f"--model {model}: not a preset, not a directory with config.json, and its config.json is not in the "
        "local Hugging Face cache (the planner never downloads). Pass a directory holding the model's "
        f"config.json (only that file is needed) or one of the presets: {', '.join(PRESETS)}"
    )
