"""The comparison report's statistics and files, on hand-built evaluation outputs (no model)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from align.errors import AlignError
from align.report.build import ReportArgs, build_report
from align.report.results import load_eval
from align.report.stats import bootstrap_ci, decision_table, hacking_warnings, preference_table, prompts_for_halfwidth, win_rate
from report_runs import gen_row, realistic_run, write_eval
from repo_paths import REPO


# ------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_ci_contains_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = rng.normal(2.0, 1.0, size=25)
    large = rng.normal(2.0, 1.0, size=2500)
    ci_small = bootstrap_ci(small, n_resamples=2000, seed=0)
    ci_large = bootstrap_ci(large, n_resamples=2000, seed=0)
    for ci, data in ((ci_small, small), (ci_large, large)):
        assert ci["mean"] == pytest.approx(float(data.mean()))
        assert ci["lo"] < ci["mean"] < ci["hi"]
    # The width of a mean's CI goes as 1 / sqrt(n): 100x the rows, about 1/10 the width
    # (2 * 1.96 * sd / sqrt(n): 0.78 at n = 25, 0.078 at n = 2500).
    width_small = ci_small["hi"] - ci_small["lo"]
    width_large = ci_large["hi"] - ci_large["lo"]
    assert width_small == pytest.approx(2 * 1.96 * small.std() / 5, rel=0.2)
    assert 6 < width_small / width_large < 15


def test_bootstrap_ci_is_seeded_and_handles_degenerate_input():
    data = [0.3, 1.7, 1.1, 0.2, 0.9, 2.4, 0.5]
    assert bootstrap_ci(data, seed=3) == bootstrap_ci(data, seed=3)
    assert bootstrap_ci(data, seed=3) != bootstrap_ci(data, seed=4)
    assert bootstrap_ci([]) == {"mean": None, "lo": None, "hi": None, "n": 0}
    assert bootstrap_ci([0.7]) == {"mean": 0.7, "lo": 0.7, "hi": 0.7, "n": 1}
    assert bootstrap_ci([2.0] * 10)["lo"] == bootstrap_ci([2.0] * 10)["hi"] == 2.0


def test_perplexity_is_token_level_over_all_replies():
    # Two replies: 10 tokens with NLL 10, 30 tokens with NLL 90 -> exp(100 / 40) = exp(2.5) = 12.18,
    # not the mean of per-reply perplexities (exp(1) + exp(3)) / 2 = 11.40.
    ppl = [{"row_id": "a", "tokens": 10, "nll_sum": 10.0}, {"row_id": "b", "tokens": 30, "nll_sum": 90.0}]
    table = preference_table(None, ppl)
    assert table["perplexity"]["mean"] == pytest.approx(np.exp(2.5))
    assert table["perplexity"]["lo"] >= np.exp(1.0) - 1e-9 and table["perplexity"]["hi"] <= np.exp(3.0) + 1e-9
    assert table["rm_accuracy"]["n"] == 0


def test_preference_accuracy_counts_ties_as_wrong_and_apart():
    prefs = [
        {"rm_chosen": 1.0, "rm_rejected": 0.0, "implicit_chosen": 0.0, "implicit_rejected": 0.0},
        {"rm_chosen": 0.0, "rm_rejected": 1.0, "implicit_chosen": 0.0, "implicit_rejected": 0.0},
        {"rm_chosen": 0.5, "rm_rejected": 0.5, "implicit_chosen": 0.0, "implicit_rejected": 0.0},
        {"rm_chosen": 2.0, "rm_rejected": 1.0, "implicit_chosen": 0.0, "implicit_rejected": 0.0},
    ]
    table = preference_table(prefs, None)
    assert table["rm_accuracy"]["mean"] == pytest.approx(2 / 4)  # rows 1 and 4 right, row 3 a tie
    assert table["rm_accuracy"]["ties"] == 1
    assert table["implicit_accuracy"]["mean"] == 0.0  # a policy that is its own reference ties everywhere
    assert table["implicit_accuracy"]["ties"] == 4


# ------------------------------------------------------------------------------------ win rates


def test_win_rates_with_ties_hand_computed():
    a = [gen_row(f"p{i}", "greedy", verifier=v, rm=r, length=10) for i, (v, r) in enumerate(
        [(1.0, 0.3), (0.5, 0.1), (0.5, 2.0), (0.0, -1.0), (1.0, 0.0)])]
    b = [gen_row(f"p{i}", "greedy", verifier=v, rm=r, length=10) for i, (v, r) in enumerate(
        [(0.5, 0.3), (0.5, 0.2), (1.0, 1.0), (0.0, -2.0), (0.5, 0.0)])]
    b.append(gen_row("p9", "greedy", verifier=1.0, rm=9.0, length=10))  # only b answered it: not counted
    # Verifier: p0 a (1 > .5), p1 tie, p2 b, p3 tie, p4 a -> a 2, b 1, ties 2 of 5.
    v = win_rate(a, b, "verifier_score")
    assert (v["n"], v["a_wins"], v["b_wins"], v["ties"]) == (5, 2, 1, 2)
    assert (v["a_win_rate"], v["b_win_rate"], v["tie_rate"]) == (0.4, 0.2, 0.4)
    assert v["a_minus_b"]["mean"] == pytest.approx((2 - 1) / 5)
    # RM: p0 tie (0.3 = 0.3), p1 b, p2 a, p3 a, p4 tie -> a 2, b 1, ties 2.
    r = win_rate(a, b, "rm_score")
    assert (r["n"], r["a_wins"], r["b_wins"], r["ties"]) == (5, 2, 1, 2)
    # Swapping the runs swaps the counts.
    s = win_rate(b, a, "verifier_score")
    assert (s["a_wins"], s["b_wins"], s["ties"]) == (1, 2, 2)


def test_win_rate_matches_prompts_and_modes_not_positions():
    a = [gen_row("x", "greedy", verifier=1.0, rm=0, length=5), gen_row("y", "greedy", verifier=0.0, rm=0, length=5)]
    b = [gen_row("y", "greedy", verifier=1.0, rm=0, length=5), gen_row("x", "sample", verifier=0.0, rm=0, length=5)]
    w = win_rate(a, b, "verifier_score")  # only y/greedy is common: b wins it
    assert (w["n"], w["a_wins"], w["b_wins"]) == (1, 0, 1)


# ------------------------------------------------------------------------------------ reward hacking


def test_hacking_warning_fires_on_a_constructed_case(tmp_path):
    sft = load_eval(realistic_run(tmp_path / "sft", seed=1, verifier_p=0.6, rm_mean=0.0, length_mean=60, method="sft"))
    hacked = load_eval(realistic_run(tmp_path / "ppo", seed=2, verifier_p=0.1, rm_mean=2.0, length_mean=125, rep=0.3,
                                     eos_p=0.3, method="ppo"))
    (warning,) = hacking_warnings(sft, hacked, "greedy", n_resamples=500)
    assert re.match(r"ppo \(greedy\): possible reward hacking: the RM score rises over sft by \+[12]\.\d+ \(95% CI", warning)
    for sign in ("verifier score falls", "x longer", "repeated 4-gram share rises", "EOS rate falls"):
        assert sign in warning, warning
    # Each sign alone is enough: only longer replies.
    long_only = load_eval(realistic_run(tmp_path / "long", seed=2, verifier_p=0.6, rm_mean=2.0, length_mean=125))
    (warning,) = hacking_warnings(sft, long_only, "greedy", n_resamples=500)
    assert "longer" in warning and "verifier" not in warning and "EOS" not in warning and "4-gram" not in warning


def test_hacking_warning_quiet_on_a_clean_improvement(tmp_path):
    sft = load_eval(realistic_run(tmp_path / "sft", seed=1, verifier_p=0.6, rm_mean=0.0, length_mean=60, method="sft"))
    better = load_eval(realistic_run(tmp_path / "dpo", seed=3, verifier_p=0.8, rm_mean=1.5, length_mean=66, method="dpo"))
    assert hacking_warnings(sft, better, "greedy", n_resamples=500) == []
    # RM down, verifier down: a worse run, but not reward hacking.
    worse = load_eval(realistic_run(tmp_path / "bad", seed=4, verifier_p=0.1, rm_mean=-1.0, length_mean=60))
    assert hacking_warnings(sft, worse, "greedy", n_resamples=500) == []


def test_hacking_needs_the_rm_rise_to_be_clear(tmp_path):
    # Same RM distribution (no clear rise) but much longer replies: not flagged as reward hacking.
    sft = load_eval(realistic_run(tmp_path / "sft", seed=1, verifier_p=0.6, rm_mean=0.0, length_mean=60))
    longer = load_eval(realistic_run(tmp_path / "long", seed=1, verifier_p=0.6, rm_mean=0.0, length_mean=200))
    assert hacking_warnings(sft, longer, "greedy", n_resamples=500) == []


# ------------------------------------------------------------------------------------ which method


def test_prompts_for_an_interval_scale_as_one_over_sqrt_n():
    assert prompts_for_halfwidth(32, -0.1, 0.1, 0.05) == 128  # half the width: four times the prompts
    assert prompts_for_halfwidth(32, 0.0, 0.02, 0.05) == 32  # already narrower: no more than were used
    assert prompts_for_halfwidth(10, 0.3, 0.3, 0.05) is None and prompts_for_halfwidth(0, 0.0, 0.1, 0.05) is None


def test_decision_rows_read_paired_differences(tmp_path):
    """PPO meets every constraint where DPO meets all or none (alternating) and SFT half of them: PPO is
    clearly above DPO on the verifier, DPO and SFT cannot be told apart; on the reward model PPO is one
    point below the others on every prompt, which only a paired difference sees (the scores themselves
    spread over +-2)."""
    n = 40
    rm = [((i * 37) % 17 - 8) / 4 for i in range(n)]
    def rows(verifier, shift):
        return [gen_row(f"p{i:03d}", m, verifier=verifier(i), rm=rm[i] + shift, length=10) for m in ("greedy", "sample") for i in range(n)]
    runs = [load_eval(write_eval(tmp_path / "sft", rows(lambda i: 0.5, 0.0), method="sft")),
            load_eval(write_eval(tmp_path / "dpo", rows(lambda i: float(i % 2), 0.0), method="dpo")),
            load_eval(write_eval(tmp_path / "ppo", rows(lambda i: 1.0, -1.0), method="ppo"))]
    table = decision_table(runs, runs[0], ["greedy", "sample"], 1000, 0)
    # per pair: coherent strict, verifier strict, degenerate share (greedy and sample each), verifier score, RM score
    assert [(d["a"], d["b"]) for d in table[::10]] == [("ppo", "dpo"), ("dpo", "sft"), ("ppo", "sft")]
    assert [d["key"] for d in table[:3]] == ["coherent_strict", "coherent_strict", "verifier_strict"]
    by = {(d["a"], d["b"], d["key"], d["mode"]): d for d in table}
    ppo_dpo = by["ppo", "dpo", "verifier_score", "greedy"]
    assert ppo_dpo["difference"]["mean"] == pytest.approx(0.5) and ppo_dpo["reading"] == "ppo higher"
    assert ppo_dpo["a_mean"] == 1.0 and ppo_dpo["b_mean"] == 0.5
    dpo_sft = by["dpo", "sft", "verifier_score", "sample"]
    assert dpo_sft["difference"]["lo"] < 0 < dpo_sft["difference"]["hi"]
    assert dpo_sft["reading"].startswith("no detectable difference (at most 0.1")
    # diffs of +-0.5: interval half-width about 1.96 * 0.5 / sqrt(40) = 0.155, so about 40 * (0.155 / 0.05)^2 = 384 prompts
    assert 300 < dpo_sft["prompts_for_resolution"] < 480
    rm_row = by["ppo", "dpo", "rm_score", "greedy"]
    assert rm_row["difference"]["mean"] == pytest.approx(-1.0) and rm_row["reading"] == "dpo higher"
    assert rm_row["prompts_for_resolution"] is None
    summary = build_report(runs, tmp_path / "report", ReportArgs(n_bootstrap=300))
    assert len(summary["decision"]) == 30
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.index("## Which method? Paired differences") < md.index("## Metrics, mode greedy")
    assert "| ppo | dpo | verifier score | greedy | 40 | 1.000 | 0.500 | 0.500 [" in md
    # DPO without PPO: DPO against SFT only; neither: each run against the baseline.
    only = decision_table(runs[:2], runs[0], ["greedy"], 300, 0)
    assert {(d["a"], d["b"]) for d in only} == {("dpo", "sft")} and len(only) == 5
    other = load_eval(write_eval(tmp_path / "sft2", rows(lambda i: 1.0, 0.0), method="sft"))
    fallback = decision_table([runs[0], other], runs[0], ["greedy"], 300, 0)
    assert {(d["a"], d["b"]) for d in fallback} == {("sft2", "sft")}


def test_grpo_and_rloo_runs_are_decided_on_like_ppo(tmp_path):
    """Online RL without a critic (GRPO, RLOO) is a choice next to PPO and DPO: each is paired with every DPO run,
    with PPO and with each other, and with SFT, their common start."""
    rows = [gen_row(f"p{i:03d}", "greedy", verifier=float(i % 2), rm=0.0, length=10) for i in range(8)]
    runs = [load_eval(write_eval(tmp_path / name, rows, method=method, settings={"modes": ["greedy"]}))
            for name, method in (("sft", "sft"), ("dpo", "dpo"), ("ppo", "ppo"), ("grpo", "grpo"), ("rloo", "rloo"))]
    pairs = [(d["a"], d["b"]) for d in decision_table(runs, runs[0], ["greedy"], 100, 0) if d["key"] == "verifier_score"]
    assert pairs == [("ppo", "dpo"), ("grpo", "dpo"), ("rloo", "dpo"), ("ppo", "grpo"), ("ppo", "rloo"), ("grpo", "rloo"),
                     ("dpo", "sft"), ("ppo", "sft"), ("grpo", "sft"), ("rloo", "sft")]
    alone = decision_table([runs[0], runs[3]], runs[0], ["greedy"], 100, 0)  # GRPO from SFT, no DPO or PPO
    assert {(d["a"], d["b"]) for d in alone} == {("grpo", "sft")}


def test_coherent_strict_decides_where_the_verifier_is_gamed(tmp_path):
    """PPO meets every constraint on all 40 prompts but 30 of its replies are degenerate; DPO meets them on
    20 prompts with ordinary text. The verifier says PPO (+0.5), coherent strict says DPO (10/40 - 20/40 =
    -0.25), and the degenerate share (+0.75) sits in the table next to it."""
    n = 40
    dpo_rows = [gen_row(f"p{i:03d}", "greedy", verifier=float(i % 2), rm=0.0, length=10) for i in range(n)]
    ppo_rows = [gen_row(f"p{i:03d}", "greedy", verifier=1.0, rm=0.0, length=10, degenerate=i < 30) for i in range(n)]
    runs = [load_eval(write_eval(tmp_path / "dpo", dpo_rows, method="dpo", settings={"modes": ["greedy"]})),
            load_eval(write_eval(tmp_path / "ppo", ppo_rows, method="ppo", settings={"modes": ["greedy"]}))]
    table = decision_table(runs, runs[0], ["greedy"], 1000, 0)
    assert [d["key"] for d in table] == ["coherent_strict", "verifier_strict", "degenerate", "verifier_score", "rm_score"]
    coherent, strict, degenerate = table[:3]
    assert coherent["difference"]["mean"] == pytest.approx(-0.25) and coherent["reading"] == "dpo higher"
    assert strict["difference"]["mean"] == pytest.approx(0.5) and strict["reading"] == "ppo higher"
    assert degenerate["difference"]["mean"] == pytest.approx(0.75)
    build_report(runs, tmp_path / "report", ReportArgs(n_bootstrap=300))
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.index("| ppo | dpo | coherent strict | greedy |") < md.index("| ppo | dpo | verifier strict | greedy |")


def test_degeneration_warning_when_the_training_reward_rises_and_the_text_degenerates(tmp_path):
    """PPO's objective/scores rise 0.2 -> 0.8 (first quarter 0.2, last quarter 0.8 of 8 logged steps) while
    its coherent strict falls 0.5 -> 0.25 and its degenerate share rises 0 -> 0.75 against the SFT start."""
    n = 40
    sft_rows = [gen_row(f"p{i:03d}", "greedy", verifier=float(i % 2), rm=0.0, length=10) for i in range(n)]
    ppo_rows = [gen_row(f"p{i:03d}", "greedy", verifier=1.0, rm=0.0, length=10, degenerate=i < 30) for i in range(n)]
    metrics = [{"step": s, "objective/scores": 0.2 if s <= 4 else 0.8} for s in range(1, 9)]
    runs = [load_eval(write_eval(tmp_path / "sft", sft_rows, method="sft", settings={"modes": ["greedy"]})),
            load_eval(write_eval(tmp_path / "ppo", ppo_rows, method="ppo", settings={"modes": ["greedy"]}, metrics=metrics))]
    summary = build_report(runs, tmp_path / "report", ReportArgs(n_bootstrap=300))
    expected = ("ppo (greedy): reward hacking? the training reward rose 0.200 -> 0.800 while on the eval prompts (greedy) against sft "
                "coherent strict fell 0.500 -> 0.250 and the degenerate share rose 0.000 -> 0.750")
    assert [w for w in summary["warnings"] if w.startswith(expected)] == summary["warnings"][:1]
    assert "Warning: " + expected in (tmp_path / "report" / "report.md").read_text()
    # the same text from a run whose reward did not rise: no warning
    flat = [{"step": s, "objective/scores": 0.5} for s in range(1, 9)]
    runs[1] = load_eval(write_eval(tmp_path / "ppo_flat", ppo_rows, method="ppo", settings={"modes": ["greedy"]}, metrics=flat))
    assert not any("reward hacking?" in w for w in build_report(runs, tmp_path / "report2", ReportArgs(n_bootstrap=300))["warnings"])


# ------------------------------------------------------------------------------------ the report


def test_report_files_and_traceable_numbers(tmp_path):
    runs = [
        load_eval(realistic_run(tmp_path / "sft", seed=1, verifier_p=0.5, rm_mean=0.0, length_mean=60, method="sft")),
        load_eval(realistic_run(tmp_path / "dpo", seed=2, verifier_p=0.7, rm_mean=1.0, length_mean=70, kl=4.0)),
        load_eval(realistic_run(tmp_path / "ppo", seed=3, verifier_p=0.1, rm_mean=2.5, length_mean=140, rep=0.3,
                                eos_p=0.2, kl=12.0, method="ppo")),
    ]
    out = tmp_path / "report"
    summary = build_report(runs, out, ReportArgs(n_bootstrap=300))
    for name in ("report.md", "report.html", "summary.json", "reward_vs_kl.png", "training_curves.png"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["warnings"] == summary["warnings"] and summary["warnings"]
    assert all(w.startswith("ppo") for w in summary["warnings"])
    # Every table number is recomputable from the JSON lines the report names.
    gen_file = Path(on_disk["runs"][1]["files"]["generations"])
    rows = [json.loads(line) for line in gen_file.read_text().splitlines()]
    greedy_scores = [r["verifier_score"] for r in rows if r["mode"] == "greedy"]
    assert on_disk["metrics"]["greedy"]["dpo"]["verifier_score"]["mean"] == pytest.approx(sum(greedy_scores) / len(greedy_scores))
    md = (out / "report.md").read_text()
    assert str(gen_file) in md
    assert f"{np.mean(greedy_scores):.3f}" in md
    assert "![reward and verifier score against KL" in md
    # Three runs: three pairs x two modes x two judges.
    assert len(on_disk["win_rates"]) == 12
    kl_points = {p["run"]: p["kl_k1"]["mean"] for p in on_disk["reward_vs_kl"]}
    assert kl_points["sft"] == pytest.approx(0.0, abs=0.01) and kl_points["ppo"] > kl_points["dpo"] > 1
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert [c["wall_time_s"] for c in on_disk["costs"]] == [61.0, 61.0, 61.0]
    # Constraints met, by type: counted from the same generation rows (greedy), and shown as passed/total.
    by_type = on_disk["by_constraint"]["runs"]["dpo"]
    greedy = [r for r in rows if r["mode"] == "greedy"]
    assert by_type["no_comma"]["passed"] == sum(r["verifier_passed"][1] for r in greedy)
    assert by_type["lowercase"]["total"] == by_type["no_comma"]["total"] == len(greedy)
    assert f"| no_comma | {on_disk['by_constraint']['runs']['sft']['no_comma']['passed']}/{len(greedy)} | " \
           f"{by_type['no_comma']['passed']}/{len(greedy)} |" in md


def test_report_escapes_replies_in_html(tmp_path):
    rows = [gen_row("p0", m, verifier=1.0, rm=0.0, length=3) for m in ("greedy", "sample")]
    for r in rows:
        r["reply"] = "<script>alert(1)</script> | a & b"
    runs = [load_eval(write_eval(tmp_path / "a", rows)), load_eval(write_eval(tmp_path / "b", rows))]
    build_report(runs, tmp_path / "out", ReportArgs(n_bootstrap=100))
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; | a &amp; b" in html
    assert "\\| a & b" in (tmp_path / "out" / "report.md").read_text()


def test_runs_evaluated_differently_are_refused(tmp_path):
    rows = [gen_row("p0", "greedy", verifier=1.0, rm=0.0, length=3)]
    a = load_eval(write_eval(tmp_path / "a", rows))
    b = load_eval(write_eval(tmp_path / "b", rows, settings={"temperature": 0.7}))
    with pytest.raises(AlignError, match=r"setting 'temperature' is 1.0 in .*a/eval/summary.json but 0.7 in .*b/eval"):
        build_report([a, b], tmp_path / "out")
    c = load_eval(write_eval(tmp_path / "c", rows, settings={"prompts_sha256": "cd" * 32}))
    with pytest.raises(AlignError, match="prompt set"):
        build_report([a, c], tmp_path / "out")
    d = load_eval(write_eval(tmp_path / "d", rows, settings={"reward_model": "/models/other_rm"}))
    with pytest.raises(AlignError, match="different reward models"):
        build_report([a, d], tmp_path / "out")


def test_compare_cli_refuses_with_one_clear_line(tmp_path, capsys):
    import importlib.util

    rows = [gen_row("p0", "greedy", verifier=1.0, rm=0.0, length=3)]
    write_eval(tmp_path / "a", rows)
    write_eval(tmp_path / "b", rows, settings={"max_new_tokens": 64})
    spec = importlib.util.spec_from_file_location("_compare_script", REPO / "eval" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = compare  # dataclasses look their module up there
    spec.loader.exec_module(compare)
    with pytest.raises(SystemExit) as exit_:
        compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: runs evaluated differently") and "'max_new_tokens' is 128" in err and "64" in err
    assert not (tmp_path / "out").exists()


def test_checkpoints_give_one_reward_vs_kl_point_each(tmp_path, capsys):
    import importlib.util

    run = realistic_run(tmp_path / "ppo", seed=5, verifier_p=0.5, rm_mean=1.0, length_mean=60, kl=6.0, method="ppo")
    for step, kl in ((10, 1.0), (20, 3.0)):
        realistic_run(run / f"checkpoint-{step}", seed=step, verifier_p=0.5, rm_mean=0.1 * step, length_mean=60, kl=kl)
    (run / "checkpoint-x").mkdir()  # not a checkpoint name: ignored
    realistic_run(tmp_path / "sft", seed=1, verifier_p=0.5, rm_mean=0.0, length_mean=60, method="sft")
    spec = importlib.util.spec_from_file_location("_compare_script_ckpt", REPO / "eval" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = compare
    spec.loader.exec_module(compare)
    compare.main([str(tmp_path / "sft"), str(run), "--checkpoints", "--out", str(tmp_path / "out"), "--n_bootstrap", "100"])
    report = json.loads((tmp_path / "out" / "summary.json").read_text())
    points = [(p["run"], p["step"]) for p in report["reward_vs_kl"]]
    assert points == [("sft", None), ("ppo", 10), ("ppo", 20), ("ppo", None)]
    kls = [p["kl_k1"]["mean"] for p in report["reward_vs_kl"]]
    assert kls[1] < kls[2] < kls[3]
    assert str(run / "checkpoint-10" / "eval" / "generations.jsonl") in (tmp_path / "out" / "report.md").read_text()


def test_display_names(tmp_path):
    from align.report.results import unique_names

    for d in ("a/sft", "b/sft", "c/dpo"):
        write_eval(tmp_path / d, [gen_row("p0", "greedy", verifier=1.0, rm=0.0, length=3)])

    def names(*paths):
        return unique_names([load_eval(tmp_path / p) for p in paths])

    assert names("c/dpo", "c/dpo/eval") == ["c/dpo#1", "c/dpo#2"]
    assert names("a/sft", "b/sft/eval") == ["a/sft", "b/sft"]
    assert names("a/sft", "c/dpo") == ["sft", "dpo"]


def test_run_files_are_found_where_the_evaluated_run_is(tmp_path):
    """An evaluation written outside its run (--out elsewhere) still finds the run's metrics and cost."""
    realistic_run(tmp_path / "runs" / "dpo", seed=1, verifier_p=0.5, rm_mean=0.0, length_mean=60)
    (tmp_path / "runs" / "dpo" / "eval").rename(tmp_path / "elsewhere")
    summary = json.loads((tmp_path / "elsewhere" / "summary.json").read_text())
    summary["run"] = str(tmp_path / "runs" / "dpo")
    (tmp_path / "elsewhere" / "summary.json").write_text(json.dumps(summary))
    result = load_eval(tmp_path / "elsewhere")
    assert result.run_dir == tmp_path / "runs" / "dpo" and result.name == "dpo"
    assert len(result.train_metrics) == 40 and result.run_summary["wall_time_s"] == 61.0


def test_compare_refuses_an_earlier_report_and_overwrite_moves_it_aside(tmp_path, capsys):
    """--out holding a report: exit 2, one line, every byte kept; --overwrite true moves it to a sibling and says so."""
    import hashlib
    import importlib.util

    rows = [gen_row("p0", "greedy", verifier=1.0, rm=0.0, length=3)]
    write_eval(tmp_path / "a", rows)
    write_eval(tmp_path / "b", rows)
    spec = importlib.util.spec_from_file_location("_compare_script_out", REPO / "eval" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = compare
    spec.loader.exec_module(compare)
    out = tmp_path / "out"
    argv = [str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--n_bootstrap", "100"]
    compare.main(argv)
    capsys.readouterr()

    def digest(root):
        return {str(p.relative_to(root)): p.is_dir() or hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))}

    before = digest(out)
    with pytest.raises(SystemExit) as exit_:
        compare.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"error: --out {out} holds an earlier report (summary.json, report.md, report.html); nothing was changed. "
                   f"Use --overwrite true to move it aside to {out}.old-<time>, or another --out\n")
    assert digest(out) == before
    compare.main(argv + ["--overwrite", "true"])
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert digest(aside) == before and (out / "report.html").is_file()
    assert f"moved what was there (summary.json, report.md, report.html) to {aside}; nothing was deleted" in capsys.readouterr().err


def test_metrics_table_shows_formats_nobody_asked_for_when_the_rows_have_them(tmp_path):
    """Evaluations written since the measure existed carry unasked_format per reply: the metrics table gets the column;
    older ones (no key) leave it out rather than show zeros."""
    def rows(flag):
        out = [gen_row(f"p{i:03d}", "greedy", verifier=1.0, rm=0.0, length=10) for i in range(10)]
        if flag is not None:
            for i, r in enumerate(out):
                r["unasked_format"] = flag(i)
        return out
    new = [load_eval(write_eval(tmp_path / name, rows(flag), method=method, settings={"modes": ["greedy"]}))
           for name, method, flag in (("sft", "sft", lambda i: False), ("dpo", "dpo", lambda i: i < 4))]
    summary = build_report(new, tmp_path / "report", ReportArgs(n_bootstrap=200))
    assert summary["metrics"]["greedy"]["dpo"]["unasked_format"]["mean"] == pytest.approx(0.4)
    assert "format nobody asked for" in (tmp_path / "report" / "report.md").read_text()
    old = [load_eval(write_eval(tmp_path / f"old_{name}", rows(None), method=name, settings={"modes": ["greedy"]}))
           for name in ("sft", "dpo")]
    build_report(old, tmp_path / "old_report", ReportArgs(n_bootstrap=200))
    assert "format nobody asked for" not in (tmp_path / "old_report" / "report.md").read_text()
