"""Evaluation of one policy (align.evaluation, eval/evaluate.py) and the comparison (align.report.compare, eval/compare.py) on tiny models."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.evaluation.args import EvalArgs
from align.evaluation.generate import generate
from align.evaluation.logprobs import left_pad, encode_reply, last_token_logps, pad_rows, reply_logps
from align.evaluation.metrics import distinct_n, prompt_fingerprint, repeated_ngram_share, words
from align.evaluation.policy import load_policy
from align.evaluation.run import evaluate
from repo_paths import REPO

PROMPTS = [
    {"id": "p0", "prompt": "Describe a cat.", "constraints": [{"type": "lowercase"}]},
    {"id": "p1", "prompt": "Name three rivers.", "constraints": [{"type": "no_comma"}, {"type": "lowercase"}]},
    {"id": "p2", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]},
]
PAIRS = [
    {"id": "q0", "prompt": "Say yes.", "chosen": "yes", "rejected": "No, I will not."},
    {"id": "q1", "prompt": "Count to three.", "chosen": "1 2 3", "rejected": "one"},
]
SFT = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                  {"role": "user", "content": "c"}, {"role": "assistant", "content": "the last reply is scored"}]},
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, above all on a busy machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("eval_data")
    return {"prompts": write_jsonl(d / "prompts.jsonl", PROMPTS), "prefs": write_jsonl(d / "prefs.jsonl", PAIRS),
            "sft": write_jsonl(d / "sft.jsonl", SFT)}


def make_adapter_run(base_dir: str, run_dir: Path, *, zero: bool, method: str = "dpo") -> str:
    """A run directory as recipes/dpo.py leaves it: adapter/, config.yaml, summary.json, metrics.jsonl.

    zero=True: a freshly initialised LoRA (B = 0), so the policy equals its reference exactly.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (run_dir / "adapter").is_dir():
        return str(run_dir)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=zero))
    model.save_pretrained(run_dir / "adapter")
    (run_dir / "config.yaml").write_text(f"model_name_or_path: {base_dir}\nbeta: 0.2\n")
    (run_dir / "summary.json").write_text(json.dumps({"method": method, "wall_time_s": 3.5, "tokens_processed": 900, "peak_memory_mb": 700.0}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "time_s": s * 0.5, "train/loss": 0.7 - 0.01 * s}) + "\n" for s in range(1, 6)))
    return str(run_dir)


@pytest.fixture(scope="module")
def adapter_run(tiny_model_dir, tmp_path_factory) -> str:
    return make_adapter_run(tiny_model_dir, tmp_path_factory.mktemp("runs") / "dpo", zero=False)


@pytest.fixture(scope="module")
def zero_adapter_run(tiny_model_dir, tmp_path_factory) -> str:
    return make_adapter_run(tiny_model_dir, tmp_path_factory.mktemp("runs") / "fresh", zero=True)


def small_args(data_files, **overrides) -> EvalArgs:
    values = dict(prompts=data_files["prompts"], pref_data=data_files["prefs"], ppl_data=data_files["sft"],
                  max_new_tokens=6, generate_batch_size=2, batch_size=2, dtype="fp32")
    values.update(overrides)
    cfg = EvalArgs(**values)
    cfg.validate()
    return cfg


# ------------------------------------------------------------------------------------ text metrics


def test_distinct_and_repetition_hand_computed():
    tokens = words("The cat the CAT the cat")  # the cat the cat the cat
    assert tokens == ["the", "cat", "the", "cat", "the", "cat"]
    assert distinct_n(tokens, 1) == 2 / 6
    assert distinct_n(tokens, 2) == 2 / 5  # the-cat, cat-the
    # 4-grams: (the cat the cat), (cat the cat the), (the cat the cat): 2 unique of 3, 1 repeated.
    assert repeated_ngram_share(tokens) == pytest.approx(1 / 3)
    assert distinct_n(["one"], 2) is None and repeated_ngram_share(["a", "b", "c"]) is None
    assert distinct_n(words("a b c d e"), 2) == 1.0 and repeated_ngram_share(words("a b c d e")) == 0.0


def test_prompt_fingerprint_changes_with_ids_order_and_text():
    p = [[{"role": "user", "content": "x"}], [{"role": "user", "content": "y"}]]
    base = prompt_fingerprint(["a", "b"], p)
    assert base == prompt_fingerprint(["a", "b"], [list(m) for m in p])
    assert base != prompt_fingerprint(["b", "a"], p)
    assert base != prompt_fingerprint(["a", "b"], p[::-1])
    assert base != prompt_fingerprint(["a", "b"], [p[0], [{"role": "user", "content": "y "}]])


def test_eval_args_are_checked():
    from align.config import parse_config
    from align.errors import ConfigError

    assert parse_config(EvalArgs, ["--modes", "greedy"]).modes == ["greedy"]
    with pytest.raises(ConfigError, match="unknown mode 'beam'"):
        parse_config(EvalArgs, ["--modes", "greedy,beam"])
    with pytest.raises(ConfigError, match="top_p"):
        parse_config(EvalArgs, ["--top_p", "0"])
    assert parse_config(EvalArgs, ["--pref_data", "none"]).pref_data is None


# ------------------------------------------------------------------------------------ log-probs


def test_reply_ids_are_what_the_policy_emits(tiny_model_dir):
    from align.models.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    prompt = [{"role": "user", "content": "hi"}]
    prefix, reply = encode_reply(tokenizer, prompt, "hello")
    assert tokenizer.decode(prefix).endswith("<|im_start|>assistant\n")
    assert reply[-1] == tokenizer.eos_token_id  # the template's newline after <|im_end|> is cut
    assert tokenizer.decode(reply[:-1]) == "hello"


def test_pad_rows_puts_padding_on_the_side_asked():
    rows = [[5, 6, 7], [8]]
    ids, mask = pad_rows(rows, 0, "left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_rows(rows, 0, "right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="side"):
        pad_rows(rows, 0, "middle")


def test_reply_logps_do_not_depend_on_batching_or_padding(adapter_run):
    policy = load_policy(adapter_run, EvalArgs(dtype="fp32"))
    prompts = [[{"role": "user", "content": "a much longer prompt than the others"}], [{"role": "user", "content": "b"}],
               [{"role": "user", "content": "cc"}]]
    replies = ["short", "a considerably longer reply", "mid length"]
    batched = reply_logps(policy.model, policy.tokenizer, prompts, replies, batch_size=3)
    single = reply_logps(policy.model, policy.tokenizer, prompts, replies, batch_size=1)
    pairs_of_two = reply_logps(policy.model, policy.tokenizer, prompts, replies, batch_size=2)  # sorted by length
    for (lb, nb), (ls, ns), (l2, n2) in zip(batched, single, pairs_of_two):
        assert nb == ns == n2 and lb == pytest.approx(ls, abs=1e-4) and l2 == pytest.approx(ls, abs=1e-4)
    # The sum over reply tokens of log softmax, computed directly on the unpadded sequence.
    prefix, reply = encode_reply(policy.tokenizer, prompts[1], replies[1])
    ids = torch.tensor([prefix + reply])
    with torch.no_grad():
        logp = torch.log_softmax(policy.model(input_ids=ids).logits[0, :-1].float(), -1)
    direct = sum(float(logp[len(prefix) - 1 + i, t]) for i, t in enumerate(reply))
    assert batched[1][0] == pytest.approx(direct, abs=1e-4) and batched[1][1] == len(reply)


def test_pair_logps_run_each_prompt_once_and_equal_reply_logps(adapter_run, tiny_model_dir):
    """Prompts of different lengths in one batch (left padding in the cache), replies of different lengths in
    one continuation (right padding), a one-token reply: the same numbers as reply_logps, and a virtual-token
    adapter (peft prepends its tokens to every call, so no shared cache) takes reply_logps itself."""
    from align.evaluation.logprobs import pair_logps
    from align.models.loading import ModelArgs, load_model

    policy = load_policy(adapter_run, EvalArgs(dtype="fp32", merge_adapter="false"))
    prompts = [[{"role": "user", "content": "a much longer prompt than the others"}], [{"role": "user", "content": "b"}],
               [{"role": "user", "content": "cc"}], [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "d"}]]
    chosen = ["short", "a considerably longer reply", "mid length", ""]
    rejected = ["a much longer rejected reply here", "no", "", "x y z"]
    for model in (policy.model, load_model(ModelArgs(model_name_or_path=tiny_model_dir, dtype="fp32", peft="prompt_tuning"))[0]):
        for batch_size in (8, 4, 2):
            c, r = pair_logps(model, policy.tokenizer, prompts, chosen, rejected, batch_size=batch_size)
            for got, want in ((c, reply_logps(model, policy.tokenizer, prompts, chosen, 1)),
                              (r, reply_logps(model, policy.tokenizer, prompts, rejected, 1))):
                assert [n for _, n in got] == [n for _, n in want]
                assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], rel=2e-5, abs=1e-4)  # float32 sums
    assert min(n for _, n in c + r) == 1  # the empty reply is its EOS alone


def test_sampled_logprobs_match_generate_with_left_padding(adapter_run, data_files):
    """The log-probs behind the KL are those of the distribution generate() sampled from, with our sampling
    settings: same positions under left padding, same temperature, and no hidden top-k (generate()'s
    default top_k=50 would set most of the 259-token vocabulary to -inf in the processed scores)."""
    from align.evaluation.generate import settings_for

    cfg = small_args(data_files, temperature=0.7)
    policy = load_policy(adapter_run, cfg)
    tok = policy.tokenizer
    prefixes = [tok(tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"] for c in ("a long prompt to pad the other", "b")]
    ids, mask = left_pad(prefixes, tok.pad_token_id)
    torch.manual_seed(0)
    gen_config = settings_for("sample", cfg).generation_config(tok)
    gen_config.output_scores = gen_config.return_dict_in_generate = True
    out = policy.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)
    response = out.sequences[:, ids.shape[1]:]
    scores = torch.stack(out.scores, dim=1).float()  # after temperature and any top-k / top-p filtering
    assert torch.isfinite(scores).all()
    expected = torch.log_softmax(scores, -1).gather(-1, response[..., None]).squeeze(-1)
    got = last_token_logps(policy.model, out.sequences, torch.cat([mask, torch.ones_like(response)], 1), response.shape[1], 0.7)
    assert torch.allclose(got, expected, atol=1e-4), (got, expected)


# ------------------------------------------------------------------------------------ KL


def test_kl_is_zero_when_the_adapter_is_fresh(zero_adapter_run, data_files):
    """Identity: B = 0 leaves the model unchanged, so every k1 and k3 sum is 0 and implicit rewards are 0."""
    cfg = small_args(data_files, modes=["sample"])
    policy = load_policy(zero_adapter_run, cfg)
    assert policy.kind == "adapter" and not policy.is_own_reference
    gens = generate(policy, [[{"role": "user", "content": p}] for p in ("x", "yy", "zzz")], "sample", cfg)
    for g in gens:
        assert g.kl_k1 == pytest.approx(0.0, abs=1e-5) and g.kl_k3 == pytest.approx(0.0, abs=1e-5)


def test_sampling_is_reproducible_and_kl_is_positive(adapter_run, data_files):
    cfg = small_args(data_files, modes=["sample"], seed=7)
    policy = load_policy(adapter_run, cfg)
    prompts = [[{"role": "user", "content": p}] for p in ("x", "yy", "zzz")]
    first = generate(policy, prompts, "sample", cfg)
    again = generate(policy, prompts, "sample", cfg)
    assert [g.reply for g in first] == [g.reply for g in again]
    assert [g.seed for g in first] == [7, 7, 8]  # batch i seeded with seed + i (batch size 2)
    other = generate(policy, prompts, "sample", small_args(data_files, modes=["sample"], seed=8))
    assert [g.reply for g in other] != [g.reply for g in first]
    # A random adapter moves the policy: k3 >= 0 per reply, and its mean over replies is clearly positive.
    assert all(g.kl_k3 >= 0 for g in first)
    assert sum(g.kl_k3 for g in first) / 3 > 1e-3 and all(math.isfinite(g.kl_k1) for g in first)
    greedy = generate(policy, prompts, "greedy", cfg)
    assert all(g.kl_k1 is None and g.seed is None for g in greedy)


# ------------------------------------------------------------------------------------ end to end


def test_evaluate_script_on_a_tiny_model(tiny_model_dir, tiny_reward_dir, data_files, tmp_path, capsys):
    out = tmp_path / "eval"
    code, err = run_script("evaluate", [
        tiny_model_dir, "--prompts", data_files["prompts"], "--pref_data", data_files["prefs"], "--ppl_data", data_files["sft"],
        "--reward_model", tiny_reward_dir, "--max_new_tokens", "6", "--generate_batch_size", "2", "--batch_size", "2", "--dtype", "fp32",
        "--out", str(out),
    ], capsys)
    assert code == 0, err[-3000:]
    assert "generate greedy: 2/3 prompts" in err and "generate sample: 3/3 prompts" in err
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [(r["prompt_id"], r["mode"]) for r in rows] == [(p, m) for m in ("greedy", "sample") for p in ("p0", "p1", "p2")]
    for r in rows:
        assert 0 <= r["length_tokens"] <= 6 and isinstance(r["eos"], bool) and math.isfinite(r["rm_score"])
        assert (r["verifier_score"] is None) == (r["prompt_id"] == "p2")
        assert r["kl_k1"] == (0.0 if r["mode"] == "sample" else None)  # a model directory is its own reference
    p1 = next(r for r in rows if r["prompt_id"] == "p1")
    assert len(p1["verifier_passed"]) == 2 and p1["verifier_score"] == sum(p1["verifier_passed"]) / 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["n_prompts"] == 3 and summary["settings"]["top_k"] == 0
    assert summary["metrics"]["greedy"]["n"] == 3
    prefs = [json.loads(line) for line in (out / "prefs.jsonl").read_text().splitlines()]
    assert len(prefs) == 2 and all(p["implicit_chosen"] == 0.0 == p["implicit_rejected"] for p in prefs)
    assert all(math.isfinite(p["rm_chosen"]) and math.isfinite(p["rm_rejected"]) for p in prefs)
    assert summary["metrics"]["preferences"]["implicit_ties"] == 2
    ppl = summary["metrics"]["perplexity"]
    assert ppl["n"] == 2 and math.isfinite(ppl["perplexity"]) and ppl["perplexity"] > 1


def test_evaluate_an_adapter_run(adapter_run, tiny_reward_dir, data_files, tmp_path):
    cfg = small_args(data_files, reward_model=tiny_reward_dir, out=str(tmp_path / "eval"), max_ppl_rows=1)
    summary = evaluate(adapter_run, cfg, log=lambda msg: None)
    assert summary["method"] == "dpo" and summary["policy"]["kind"] == "adapter" and summary["policy"]["beta"] == 0.2
    sample = summary["metrics"]["sample"]
    assert math.isfinite(sample["kl_k1"]) and sample["kl_k3"] > 0
    prefs = [json.loads(line) for line in (tmp_path / "eval" / "prefs.jsonl").read_text().splitlines()]
    for p in prefs:  # beta from the run's config.yaml
        assert p["implicit_chosen"] == pytest.approx(0.2 * (p["logp_chosen"] - p["ref_logp_chosen"]))
        assert p["implicit_chosen"] != 0.0
    assert summary["metrics"]["perplexity"]["n"] == 1
    # every reply carries the degeneration verdict, and coherent strict is strict AND not degenerate
    gens = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    for g in gens:
        assert g["degenerate"] == bool(g["degenerate_reasons"])
        assert g["unasked_format"] == bool(g["unasked_formats"]) and isinstance(g["unasked_formats"], list)
        assert g["coherent_strict"] == (None if g["verifier_strict"] is None else g["verifier_strict"] and not g["degenerate"])
    greedy = [g for g in gens if g["mode"] == "greedy"]
    assert summary["metrics"]["greedy"]["degenerate_share"] == pytest.approx(sum(g["degenerate"] for g in greedy) / len(greedy))
    assert list(summary["metrics"]["greedy"])[1:4] == ["coherent_strict", "verifier_strict", "degenerate_share"]


def test_merging_the_adapter_changes_speed_only(adapter_run, tiny_reward_dir, data_files, tmp_path):
    """The default folds the LoRA into a copy of the weights; against the adapter as trained (and KL scored
    in one chunk instead of one row at a time): the same replies, and scores, KL, implicit rewards and
    perplexity equal within float rounding; the reference is still the base with the adapter off."""
    policy = load_policy(adapter_run, small_args(data_files))
    assert policy.kind == "adapter" and not hasattr(policy.model, "disable_adapter") and hasattr(policy.reference, "disable_adapter")
    rows = {}
    for merge, batch_size in (("true", 1), ("false", 3)):
        out = tmp_path / f"merge_{merge}"
        cfg = small_args(data_files, reward_model=tiny_reward_dir, out=str(out), merge_adapter=merge, generate_batch_size=3,
                         batch_size=batch_size)
        evaluate(adapter_run, cfg, log=lambda msg: None)
        rows[merge] = {name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
                       for name in ("generations", "prefs", "ppl")}
    merged, unmerged = rows["true"], rows["false"]
    assert [r["reply"] for r in merged["generations"]] == [r["reply"] for r in unmerged["generations"]]
    for a, b in zip(merged["generations"], unmerged["generations"]):
        for key in ("rm_score", "kl_k1", "kl_k3"):
            assert (a[key] is None) == (b[key] is None) and (a[key] is None or a[key] == pytest.approx(b[key], abs=1e-4)), key
    assert any(r["kl_k3"] and r["kl_k3"] > 1e-3 for r in merged["generations"])
    for a, b in zip(merged["prefs"], unmerged["prefs"]):
        for key in ("logp_chosen", "ref_logp_chosen", "implicit_rejected"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    for a, b in zip(merged["ppl"], unmerged["ppl"]):
        assert a["tokens"] == b["tokens"] and a["nll_sum"] == pytest.approx(b["nll_sum"], abs=1e-4)


def run_script(name: str, argv: list[str], capsys) -> tuple[int, str]:
    """Run eval/NAME.py's main in this process (no interpreter start-up); (exit code, stderr)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    capsys.readouterr()
    try:
        module.main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def test_evaluate_refuses_what_it_cannot_read(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run_script("evaluate", [str(tmp_path / "empty"), "--prompts", str(tmp_path / "x.jsonl")], capsys)
    assert code == 2 and err.startswith(f"error: {tmp_path / 'x.jsonl'}: no such file")
    bad = write_jsonl(tmp_path / "bad.jsonl", [PROMPTS[0], {"prompt": "x", "constraints": [{"type": "bullet_list"}]}])
    code, err = run_script("evaluate", [str(tmp_path / "empty"), "--prompts", bad], capsys)
    assert code == 2 and err.startswith(f"error: {bad} line 2: field 'constraints'[0]: unknown constraint type 'bullet_list'")
    code, err = run_script("evaluate", ["--max_prompts", "3"], capsys)
    assert code == 2 and "expected RUN first" in err
    code, err = run_script("evaluate", ["base", "--max_prompt", "3"], capsys)
    assert code == 2 and "unknown option 'max_prompt'; did you mean max_prompts" in err


def test_compare_script_on_two_tiny_runs(tiny_model_dir, adapter_run, data_files, tmp_path, capsys):
    """compare.py evaluates the run that has no eval/ with the settings of the one that has, then reports."""
    sft_run = make_adapter_run(tiny_model_dir, tmp_path / "sft", zero=True, method="sft")
    dpo_run = tmp_path / "dpo"
    dpo_run.mkdir()
    for name in ("adapter", "config.yaml", "summary.json", "metrics.jsonl"):
        src = Path(adapter_run) / name
        (dpo_run / name).symlink_to(src, target_is_directory=src.is_dir())
    cfg = small_args(data_files, max_new_tokens=5, max_prompts=2)
    evaluate(sft_run, cfg, log=lambda msg: None)
    code, err = run_script("compare", [sft_run, str(dpo_run), "--out", str(tmp_path / "report"), "--n_bootstrap", "200"], capsys)
    assert code == 0, err[-3000:]
    assert f"{dpo_run}: no evaluation yet" in err
    dpo_summary = json.loads((dpo_run / "eval" / "summary.json").read_text())
    assert dpo_summary["settings"]["max_new_tokens"] == 5 and dpo_summary["settings"]["n_prompts"] == 2
    report = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["sft", "dpo"] and [r["method"] for r in report["runs"]] == ["sft", "dpo"]
    kl = {p["run"]: p["kl_k1"]["mean"] for p in report["reward_vs_kl"]}
    assert kl["sft"] == pytest.approx(0.0, abs=1e-5) and math.isfinite(kl["dpo"])
    assert {(w["mode"], w["judge"]) for w in report["win_rates"]} == {("greedy", "verifier"), ("sample", "verifier")}
    md = (tmp_path / "report" / "report.md").read_text()
    assert str(dpo_run / "eval" / "generations.jsonl") in md and "training_curves.png" in md
    # A flag that contradicts the existing evaluations is refused before any work.
    (tmp_path / "third").mkdir()
    code, err = run_script("compare", [sft_run, str(tmp_path / "third"), "--max_new_tokens", "9"], capsys)
    assert code == 2 and err.startswith("error: --max_new_tokens 9 differs from 5")


def test_scripts_start_from_the_command_line():
    """`python eval/evaluate.py --help` works from any directory where the package is installed (PYTHONPATH stands
    in for the install: this checkout's code); the script is `align eval`, whose help it shows."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "evaluate.py"), "--help"], capture_output=True, text=True,
                          env=env, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "align eval outputs/dpo" in proc.stdout and "--max_new_tokens (int, default 128)" in proc.stdout


def test_policy_summary_reuses_the_starting_logps_as_the_reference(adapter_run):
    """The recipe's before/after summary: the adapter=True call reads the starting model's log-probs from the
    adapter=False call instead of recomputing them, and gets the same implicit-reward numbers."""
    from align.evaluation.policy_report import summarize_policy
    from align.records import PreferencePair

    policy = load_policy(adapter_run, EvalArgs(dtype="fp32", merge_adapter="false"))  # the recipe's PEFT model
    pairs = [PreferencePair(prompt=[{"role": "user", "content": p["prompt"]}], chosen=p["chosen"], rejected=p["rejected"])
             for p in PAIRS]
    model, tokenizer = policy.model, policy.tokenizer
    start: dict = {}
    before = summarize_policy(model, tokenizer, pairs, [], beta=0.2, adapter=False, start_logps=start)
    assert len(start["chosen"]) == len(start["rejected"]) == len(pairs)
    reused = summarize_policy(model, tokenizer, pairs, [], beta=0.2, adapter=True, start_logps=start)
    recomputed = summarize_policy(model, tokenizer, pairs, [], beta=0.2, adapter=True)
    # the starting model is its own reference: every pair ties, TRL's strict accuracy is 0
    assert before["pref/implicit_reward_accuracy"] == 0.0 and before["pref/implicit_ties"] == len(pairs)
    assert 0.0 <= before["pref/mean_logp_accuracy"] <= 1.0
    assert recomputed["pref/implicit_ties"] == 0
    assert reused["pref/implicit_reward_accuracy"] == recomputed["pref/implicit_reward_accuracy"]
    assert reused["pref/implicit_margin_mean"] == pytest.approx(recomputed["pref/implicit_margin_mean"], abs=1e-6)
    assert recomputed["pref/implicit_margin_mean"] != 0  # the adapter moved the policy: margins are not all 0


def test_policy_summary_runs_the_trained_policy_merged_and_leaves_it_as_it_was(adapter_run, monkeypatch, capsys):
    """adapter=True scores and generates with the adapter merged into the float32 base weights (faster), says so in
    its log, the same numbers as unmerged up to float32 rounding, and every parameter is bit for bit what it was
    afterwards."""
    import align.models.generation as generation
    from align.evaluation.policy_report import summarize_policy
    from align.records import PreferencePair

    policy = load_policy(adapter_run, EvalArgs(dtype="fp32", merge_adapter="false"))
    pairs = [PreferencePair(prompt=[{"role": "user", "content": p["prompt"]}], chosen=p["chosen"], rejected=p["rejected"])
             for p in PAIRS]
    model, tokenizer = policy.model, policy.tokenizer
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    merges = []
    real = generation.merged_adapter

    class Spy(real):
        def __enter__(self):
            out = super().__enter__()
            merges.append(self.merged)
            return out

    monkeypatch.setattr(generation, "merged_adapter", Spy)
    capsys.readouterr()
    merged = summarize_policy(model, tokenizer, pairs, [], beta=0.2, adapter=True)
    assert merges == [True]
    assert "[align] summary (trained policy): the adapter merged into the weights" in capsys.readouterr().err
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    class Unmerged(real):
        def __enter__(self):
            return self.model

    monkeypatch.setattr(generation, "merged_adapter", Unmerged)
    unmerged = summarize_policy(model, tokenizer, pairs, [], beta=0.2, adapter=True)
    assert merged["pref/implicit_margin_mean"] == pytest.approx(unmerged["pref/implicit_margin_mean"], abs=1e-4)
    assert merged["pref/mean_logp_accuracy"] == unmerged["pref/mean_logp_accuracy"]


def test_before_after_leads_with_coherent_strict_and_its_paired_interval():
    """4 prompts: coherent strict 1/4 -> 3/4 (+0.5; every bootstrap resample of the per-prompt differences
    (0, 1, 1, 0) lies in [0, 1]), strict 2/4 -> 4/4, degenerate 2/4 -> 1/4, formats nobody asked for 0/4 -> 2/4."""
    from align.evaluation.policy_report import before_after

    def rows(coherent, strict, degenerate, unasked):
        return [{"prompt_id": f"p{i}", "mode": "greedy", "coherent_strict": c, "verifier_strict": s, "degenerate": d,
                 "unasked_format": u} for i, (c, s, d, u) in enumerate(zip(coherent, strict, degenerate, unasked))]

    before = {"rows": rows([1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]), "verifier/score": 0.5, "verifier/prompts": 4}
    after = {"rows": rows([1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1], [0, 1, 1, 0]), "verifier/score": 0.9, "verifier/prompts": 4}
    lines = before_after(before, after).splitlines()
    assert lines[1].startswith("  coherent strict (strict and not degenerate): 0.250 -> 0.750 (+0.500, paired 95% CI [+")
    assert lines[1].endswith("4 prompts)")
    assert lines[2].startswith("  verifier strict (IFEval rules, every constraint met): 0.500 -> 1.000 (+0.500")
    assert lines[3].startswith("  degenerate replies (share): 0.500 -> 0.250 (-0.250")
    assert lines[4].startswith("  formats nobody asked for (share): 0.000 -> 0.500 (+0.500")
    assert lines[5] == "  verifier score on held-out eval prompts: 0.500 -> 0.900"
    before["verifier/by_constraint"] = {"capitals": {"passed": 0, "total": 4, "rate": 0.0}}
    after["verifier/by_constraint"] = {"capitals": {"passed": 3, "total": 4, "rate": 0.75}}
    assert before_after(before, after).splitlines()[-1] == "  constraints met, by type: capitals 0/4 -> 3/4"


def test_pass_rates_by_constraint_count_instances_per_type():
    from align.evaluation.metrics import pass_rates_by_constraint

    rows = [
        {"constraints": [{"type": "capitals"}, {"type": "end_phrase", "end_phrase": "Bye."}], "verifier_passed": [False, True]},
        {"constraints": [{"type": "capitals"}], "verifier_passed": [True]},
        {"constraints": None, "verifier_passed": None},  # nothing asked: not counted
        {"constraints": [{"type": "keyword_frequency"}, {"type": "keyword_frequency"}], "verifier_passed": [True, False]},
    ]
    assert pass_rates_by_constraint(rows) == {
        "capitals": {"passed": 1, "total": 2, "rate": 0.5}, "end_phrase": {"passed": 1, "total": 1, "rate": 1.0},
        "keyword_frequency": {"passed": 1, "total": 2, "rate": 0.5}}
    with pytest.raises(ValueError):  # a verdict per constraint, or the rows are broken
        pass_rates_by_constraint([{"constraints": [{"type": "capitals"}], "verifier_passed": [True, True]}])


def test_before_after_lists_constraint_types_biggest_change_first():
    from align.evaluation.policy_report import by_constraint_line

    before = {"capitals": {"passed": 0, "total": 15, "rate": 0.0}, "lowercase": {"passed": 1, "total": 18, "rate": 1 / 18},
              "json_format": {"passed": 1, "total": 5, "rate": 0.2}}
    after = {"capitals": {"passed": 9, "total": 15, "rate": 0.6}, "lowercase": {"passed": 1, "total": 18, "rate": 1 / 18},
             "json_format": {"passed": 0, "total": 5, "rate": 0.0}}
    assert by_constraint_line(before, after) == "capitals 0/15 -> 9/15, json_format 1/5 -> 0/5, lowercase 1/18 -> 1/18"


def test_evaluate_refuses_an_earlier_evaluation_before_loading_anything(tmp_path, capsys):
    """--out holding an evaluation: exit 2, one line, every byte kept, nothing loaded (the run does not even exist);
    with --overwrite true the earlier evaluation is moved aside before the (here failing) load."""
    out = tmp_path / "eval"
    out.mkdir()
    (out / "summary.json").write_text('{"metrics": {}}\n')
    (out / "generations.jsonl").write_text('{"reply": "x"}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = run_script("evaluate", [str(tmp_path / "no_such_run"), "--out", str(out)], capsys)
    assert code == 2
    assert err == (f"error: --out {out} holds an earlier evaluation (summary.json, generations.jsonl); nothing was changed. "
                   f"Use --overwrite true to move it aside to {out}.old-<time>, or another --out\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    code, err = run_script("evaluate", [str(tmp_path / "no_such_run"), "--out", str(out), "--overwrite", "true",
                                        "--prompts", str(tmp_path / "no_prompts.jsonl")], capsys)
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("eval.old-")]
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == before
    assert f"moved what was there (summary.json, generations.jsonl) to {aside}; nothing was deleted" in err
    assert code == 2 and "no_prompts.jsonl" in err


def test_rescore_judges_saved_replies_again_with_the_current_check(tmp_path):
    """eval/rescore.py: the stored `degenerate` flags are ignored and recomputed (a title alone is no answer now), and
    coherent strict is paired against the baseline over the same prompts."""
    from recipe_harness import run_cli

    def write(name, replies):
        d = tmp_path / name
        d.mkdir()
        rows = [{"prompt_id": f"p{i}", "mode": "greedy", "prompt": [{"role": "user", "content": "Write a fairy tale. Wrap it in quotes."}],
                 "constraints": [{"type": "quotation"}], "reply": reply, "eos": True, "verifier_strict": True, "degenerate": False,
                 "coherent_strict": True} for i, reply in enumerate(replies)]
        (d / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(d)

    story = '"Once upon a time a fox lived by the river. She told the moon her plans every night, and one night it answered."'
    base = write("base", [story, story])
    run = write("run", [story, '"The Night of the Moon"'])  # stored as coherent; a title alone is no answer
    proc = run_cli(["eval/rescore.py", base, run])
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["coherent_strict"]["baseline_mean"] == 1.0 and result["coherent_strict"]["run_mean"] == 0.5
    assert result["degenerate"]["mean"] == 0.5 and result["coherent_strict"]["n"] == 2
    assert result["unasked_format"]["run_mean"] == 0.0  # quotes, and only quotes, were asked for


def test_rows_and_summary_carry_formats_nobody_asked_for():
    """generation_summary's unasked_format_share is the share of rows with a format no constraint asked for; rows
    written before the measure existed (no key) are left out rather than counted as clean."""
    from align.evaluation.run import generation_summary

    def row(unasked):
        r = {"coherent_strict": True, "verifier_strict": True, "degenerate": False, "verifier_score": 1.0, "rm_score": None,
             "length_tokens": 5, "eos": True, "distinct_1": 1.0, "distinct_2": 1.0, "repeated_4gram_share": 0.0,
             "kl_k1": None, "kl_k3": None, "constraints": [{"type": "lowercase"}], "verifier_passed": [True]}
        return r if unasked is None else {**r, "unasked_format": unasked}

    assert generation_summary([row(True), row(False), row(False), row(None)])["unasked_format_share"] == pytest.approx(1 / 3)
    assert generation_summary([row(None)])["unasked_format_share"] is None


def test_keyword_rates_count_unrelated_and_topic_words_apart(tmp_path):
    """bench/keyword_rates.py: of the prompts that ask for keywords, the eval's unrelated words ("bright") and the
    topic's words are counted apart, case-insensitively, and a prompt with no keyword constraint is left out."""
    from recipe_harness import run_cli

    def write(name, replies):
        d = tmp_path / name
        d.mkdir()
        asks = [["bright"], ["kites", "bright"], []]
        rows = [{"prompt_id": f"p{i}", "mode": "greedy", "prompt": [{"role": "user", "content": "Write about kites."}],
                 "constraints": [{"type": "include_keywords", "keywords": k}] if k else [{"type": "no_comma"}],
                 "reply": reply, "eos": True, "verifier_strict": False} for i, (k, reply) in enumerate(zip(asks, replies))]
        (d / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(d)

    start = write("start", ["Kites fly high in the wind today.", "Kites fly high in the wind today.", "Bright kites."])
    run = write("run", ["A Bright kite flies high in the wind today.", "Kites are bright and fly high today.", "x"])
    proc = run_cli(["bench/keyword_rates.py", f"start={start}", f"run={run}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "2 prompts ask to include a keyword" in out
    assert "unrelated word written: start 0/2, run 2/2" in out and "topic word written: start 1/1, run 1/1" in out
    assert "start: include_keywords met 0/2" in out and "run: include_keywords met 2/2" in out



def test_evaluate_on_ifeval_prompts_skips_and_records_what_it_cannot_score(tiny_model_dir, tmp_path, capsys):
    """IFEval's own file format; a prompt with an instruction the verifier has no check for is an error naming its
    line, or with --on_bad_rows skip is left out and counted in summary.json."""
    prompts = tmp_path / "input_data.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in [
        {"key": 1001, "prompt": "Write an itinerary for a trip to Japan. You are not allowed to use any commas in your response.",
         "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
        {"key": 1012, "prompt": "Write a riddle about a mom laying out on a beach in Humboldt without using any commas.",
         "instruction_id_list": ["punctuation:no_comma", "language:response_language"], "kwargs": [{}, {"language": "kn"}]},
        {"key": 1019, "prompt": "Write a blog post about a trip to Japan, in lowercase letters only.",
         "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
    ]))
    common = [tiny_model_dir, "--prompts", str(prompts), "--modes", "greedy", "--max_new_tokens", "4", "--pref_data", "none",
              "--ppl_data", "none", "--dtype", "fp32"]
    code, err = run_script("evaluate", common + ["--out", str(tmp_path / "refused")], capsys)
    assert code != 0 and "input_data.jsonl line 2: field 'instruction_id_list[1]': IFEval instruction 'language:response_language'" in err
    code, err = run_script("evaluate", common + ["--on_bad_rows", "skip", "--out", str(tmp_path / "eval")], capsys)
    assert code == 0, err[-3000:]
    assert "2 prompts from" in err and "(1 row skipped as bad, on_bad_rows skip)" in err
    rows = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert [(r["prompt_id"], r["constraints"]) for r in rows] == [("1001", [{"type": "no_comma"}]), ("1019", [{"type": "lowercase"}])]
    settings = json.loads((tmp_path / "eval" / "summary.json").read_text())["settings"]
    assert settings["n_prompts"] == 2 and settings["on_bad_rows"] == "skip"
    [(reason, count)] = settings["prompt_rows_skipped"].items()
    assert count == 1 and "'language:response_language' has no check here" in reason
