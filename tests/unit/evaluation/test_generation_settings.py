"""Generation controls of eval/evaluate.py (align.evaluation.generate.GenerationSettings), the loop-to-limit share, and
bench/generation_settings.py on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from align.config import parse_config
from align.errors import ConfigError
from align.evaluation.args import EvalArgs
from align.evaluation.degeneration import check_reply
from align.evaluation.generate import GenerationSettings, settings_for
from align.evaluation.metrics import loops_to_limit
from align.evaluation.run import generation_summary
from repo_paths import REPO

PROMPTS = [
    {"id": "p0", "prompt": "Describe a cat.", "constraints": [{"type": "lowercase"}]},
    {"id": "p1", "prompt": "Name three rivers.", "constraints": [{"type": "no_comma"}]},
    {"id": "p2", "prompt": "Say hi."},
]


@pytest.fixture
def prompts_file(tmp_path) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return str(path)


def test_each_mode_has_one_settings_record():
    cfg = parse_config(EvalArgs, ["--temperature", "0.7", "--top_p", "0.9", "--top_k", "40", "--repetition_penalty", "1.2",
                                  "--no_repeat_ngram_size", "3", "--num_beams", "4", "--max_new_tokens", "32"])
    greedy, sample = settings_for("greedy", cfg), settings_for("sample", cfg)
    assert greedy == GenerationSettings("greedy", 32, repetition_penalty=1.2, no_repeat_ngram_size=3, num_beams=4)
    assert sample == GenerationSettings("sample", 32, repetition_penalty=1.2, no_repeat_ngram_size=3, num_beams=None,
                                        temperature=0.7, top_p=0.9, top_k=40)
    assert greedy.describe() == "beam search 4 + repetition_penalty 1.2 + no_repeat_ngram_size 3"
    assert sample.describe() == "sample (temperature 0.7, top_p 0.9, top_k 40) + repetition_penalty 1.2 + no_repeat_ngram_size 3"
    assert settings_for("greedy", EvalArgs()).describe() == "greedy" and settings_for("sample", EvalArgs()).describe() == "sample"

    class Tok:
        eos_token_id, pad_token_id = 2, 2

    beam = greedy.generation_config(Tok())
    assert (beam.do_sample, beam.num_beams, beam.repetition_penalty, beam.no_repeat_ngram_size, beam.max_new_tokens) == (False, 4, 1.2, 3, 32)
    sampled = sample.generation_config(Tok())
    assert (sampled.do_sample, sampled.temperature, sampled.top_p, sampled.top_k) == (True, 0.7, 0.9, 40)
    assert sampled.num_beams in (None, 1)  # no beams when sampling (transformers 5: None = 1)
    assert settings_for("sample", EvalArgs()).generation_config(Tok()).top_k == 0  # the whole distribution: unbiased KL


@pytest.mark.parametrize("flag,value,message", [
    ("--num_beams", "0", "num_beams: expected 1 (greedy) or more beams, got 0"),
    ("--repetition_penalty", "0", "repetition_penalty: expected a number > 0 (1 = off), got 0.0"),
    ("--no_repeat_ngram_size", "-1", "no_repeat_ngram_size: expected 0 (off) or a positive number, got -1"),
    ("--top_k", "-5", "top_k: expected 0 (off) or a positive number, got -5"),
])
def test_bad_generation_controls_are_one_clear_error(flag, value, message):
    with pytest.raises(ConfigError, match=f"^config: {message}$".replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_config(EvalArgs, [flag, value])


def test_loops_to_limit_needs_both_no_eos_and_degenerate_text():
    loop = "the cat sat down. " * 12  # one 4-gram cycle: degenerate (repetition loop)
    prose = "The river runs past the old mill and turns towards the sea, where the boats wait for the morning tide."
    assert check_reply(loop, "Describe a cat.").degenerate and not check_reply(prose, "Describe a river.").degenerate
    assert loops_to_limit(False, check_reply(loop, "Describe a cat."))
    assert not loops_to_limit(True, check_reply(loop, "Describe a cat."))  # it stopped: a loop, but not to the limit
    assert not loops_to_limit(False, check_reply(prose, "Describe a river."))  # cut off by the budget, not looping
    # The summary's share is the mean over replies: 1 of 2 -> 0.5
    rows = [{"loops_to_limit": True}, {"loops_to_limit": False}]
    keys = ("coherent_strict", "verifier_strict", "degenerate", "verifier_score", "rm_score", "length_tokens", "eos", "distinct_1",
            "distinct_2", "repeated_4gram_share", "kl_k1", "kl_k3")
    for row in rows:
        row.update({k: None for k in keys}, constraints=None, verifier_passed=None)
    assert generation_summary(rows)["loops_to_limit_share"] == 0.5


def test_no_repeat_ngram_size_is_applied_to_the_generation(tiny_model_dir, one_thread):
    """The tiny random model repeats token bigrams when greedy over 40 tokens; with no_repeat_ngram_size 2 from the
    eval settings, none of its replies does."""
    from align.models.loading import ModelArgs, load_model

    model, tok = load_model(ModelArgs(model_name_or_path=tiny_model_dir, quantization="none", dtype="fp32"), lora=False)
    model.eval()
    batch = tok(["Describe a cat.", "Name three rivers."], return_tensors="pt", padding=True, padding_side="left")

    def repeated_bigrams(cfg: EvalArgs) -> int:
        out = model.generate(**batch, generation_config=settings_for("greedy", cfg).generation_config(tok))
        count = 0
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            grams = list(zip(row, row[1:]))
            count += len(grams) - len(set(grams))
        return count

    assert repeated_bigrams(EvalArgs(max_new_tokens=40)) > 0
    assert repeated_bigrams(EvalArgs(max_new_tokens=40, no_repeat_ngram_size=2)) == 0


def _bench_module():
    spec = importlib.util.spec_from_file_location("_bench_generation_settings", REPO / "bench" / "generation_settings.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_two_settings_on_two_prompts(tiny_model_dir, prompts_file, tmp_path, capsys):
    """bench/generation_settings.py: one evaluation per setting (every row says how it was generated), the JSON and
    the markdown table; a second call reuses the evaluations."""
    bench = _bench_module()
    out = tmp_path / "bench"
    argv = [tiny_model_dir, "--settings", "greedy,greedy_rep1.2", "--prompts", prompts_file, "--max_prompts", "2",
            "--max_new_tokens", "12", "--generate_batch_size", "2", "--dtype", "fp32", "--out", str(out)]
    result = bench.main(argv)
    assert [r["setting"] for r in result["rows"]] == ["greedy", "greedy_rep1.2"]
    assert [r["generation"] for r in result["rows"]] == ["greedy", "greedy + repetition_penalty 1.2"]
    for row, penalty in zip(result["rows"], (1.0, 1.2)):
        assert row["n"] == 2 and row["seconds"] >= 0
        gens = [json.loads(line) for line in (out / row["setting"] / "generations.jsonl").read_text().splitlines()]
        assert [g["prompt_id"] for g in gens] == ["p0", "p1"]
        assert all(g["generation"] == {"mode": "greedy", "max_new_tokens": 12, "repetition_penalty": penalty, "no_repeat_ngram_size": 0,
                                       "num_beams": 1, "temperature": None, "top_p": None, "top_k": None} for g in gens)
        assert row["loops_to_limit_share"] == sum(g["loops_to_limit"] for g in gens) / 2
        assert row["eos_rate"] == sum(g["eos"] for g in gens) / 2
        assert all(g["loops_to_limit"] == (not g["eos"] and g["degenerate"]) for g in gens)
        summary = json.loads((out / row["setting"] / "summary.json").read_text())
        assert summary["settings"]["repetition_penalty"] == penalty and summary["metrics"]["greedy"]["generation"] == gens[0]["generation"]
    saved = json.loads((out / "generation_settings.json").read_text())
    assert saved["rows"] == result["rows"]
    table = (out / "generation_settings.md").read_text().splitlines()
    assert table[2].startswith("| setting | verifier score | coherent strict | degenerate | repeated 4-grams | distinct-2 | loops to limit")
    assert table[4].startswith("| greedy | ") and table[5].startswith("| greedy + repetition_penalty 1.2 | ")
    assert table[2].endswith("| coherent strict vs greedy | degenerate vs greedy | seconds |")
    assert result["rows"][0]["degenerate_vs_greedy"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "n": 2}  # greedy against itself
    assert set(result["rows"][1]["degenerate_vs_greedy"]) == {"mean", "lo", "hi", "n"}
    capsys.readouterr()
    again = bench.main(argv)
    assert "reusing" in capsys.readouterr().err and again["rows"] == result["rows"]


def test_bench_refuses_an_unknown_setting(capsys):
    bench = _bench_module()
    with pytest.raises(SystemExit) as exit_:
        bench.main(["base", "--settings", "greedy,beam_5"])
    assert exit_.value.code == 2
    assert "settings: unknown setting(s) ['beam_5']" in capsys.readouterr().err
