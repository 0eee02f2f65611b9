"""build_report: the report's sections, each computing its numbers into summary.json and returning
its blocks; report.md, report.html, summary.json and the PNGs written last."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from align.config import arg
from align.errors import AlignError, ConfigError
from align.evaluation.metrics import pass_rates_by_constraint
from align.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from align.report.plots import plot_reward_vs_kl, plot_training_curves, reward_vs_kl_points
from align.report.render import Heading, Image, Para, Table, fmt, fmt_ci, to_html, to_markdown
from align.report.results import EvalResult, check_comparable
from align.report.stats import (EOS_DROP, GENERATION_METRICS, LENGTH_RATIO, REPETITION_RISE, TRAINING_REWARD_KEYS, decision_table,
                                degeneration_warnings, generation_table, hacking_warnings, preference_table, win_rate)


@dataclass
class ReportArgs:
    baseline: str | None = arg(None, "run the others are checked against for reward hacking (its name or directory); none = the first")
    n_bootstrap: int = arg(1000, "bootstrap resamples for the 95% confidence intervals")
    bootstrap_seed: int = arg(0, "seed of the bootstrap resampling")
    n_samples: int = arg(5, "prompts whose replies are shown side by side")

    def validate(self) -> None:
        if self.n_bootstrap < 100:
            raise ConfigError(f"config: n_bootstrap: expected at least 100 resamples, got {self.n_bootstrap}")
        if self.n_samples < 0:
            raise ConfigError(f"config: n_samples: expected 0 or more, got {self.n_samples}")


def _last_user_turn(prompt: list[dict[str, str]]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _pick_baseline(results: list[EvalResult], baseline: str | None) -> EvalResult:
    if baseline is None:
        return results[0]
    for r in results:
        if baseline in (r.name, str(r.run_dir), str(r.eval_dir)) or (r.run_dir and Path(baseline).resolve() == r.run_dir.resolve()):
            return r
    raise ConfigError(f"baseline: {baseline!r} is none of the runs ({', '.join(r.name for r in results)})")


@dataclass
class _Report:
    """What every section of the report reads (the runs, the baseline, the bootstrap settings) and what it adds:
    its numbers to `summary` (summary.json), its PNGs to `images` (written beside the report)."""

    results: list[EvalResult]
    baseline: EvalResult
    settings: dict[str, Any]
    modes: list[str]
    B: int
    seed: int
    n_samples: int
    summary: dict[str, Any]
    images: dict[str, bytes] = field(default_factory=dict)


def build_report(results: list[EvalResult], out_dir: str | Path, args: ReportArgs | None = None) -> dict[str, Any]:
    """Write report.md, report.html, summary.json and the plot PNGs to `out_dir`; return the summary.

    Each section below computes its numbers into the summary and returns its blocks; the files are written last."""
    args = args or ReportArgs()
    if not results:
        raise AlignError("no runs to compare")
    check_comparable(results)
    settings = results[0].summary["settings"]
    baseline = _pick_baseline(results, args.baseline)
    summary: dict[str, Any] = {
        "runs": [{"name": r.name, "method": r.method, "run_dir": str(r.run_dir) if r.run_dir else None,
                  "eval_dir": str(r.eval_dir), "files": {k: str(r.file(k)) for k in r.summary["files"]}} for r in results],
        "settings": settings,
        "bootstrap": {"resamples": args.n_bootstrap, "seed": args.bootstrap_seed, "level": 0.95, "method": "percentile"},
        "baseline": baseline.name,
    }
    report = _Report(results, baseline, settings, list(settings["modes"]), args.n_bootstrap, args.bootstrap_seed,
                     args.n_samples, summary)
    blocks: list[Any] = []
    for section in (_intro_section, _decision_section, _metrics_section, _constraints_section, _preferences_section,
                    _win_rates_section, _reward_vs_kl_section, _hacking_section, _cost_section, _samples_section,
                    _sources_section):
        blocks += section(report)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, png in report.images.items():
        atomic_write_bytes(out / name, png)
    title = "align report: " + ", ".join(r.name for r in results)
    atomic_write_text(out / "report.md", to_markdown(blocks))
    atomic_write_text(out / "report.html", to_html(blocks, title))
    atomic_write_json(out / "summary.json", summary)
    return summary


def _intro_section(report: _Report) -> list[Any]:
    results, settings, modes = report.results, report.settings, report.modes
    return [
        Heading("Policy comparison: " + ", ".join(f"{r.name} ({r.method})" for r in results), 1),
        Para(f"{len(results)} run{'s' if len(results) != 1 else ''} evaluated on the same {settings['n_prompts']} prompts from `{settings['prompts']}` "
             f"(fingerprint `{settings['prompts_sha256'][:12]}`), modes {', '.join(modes)}, at most "
             f"{settings['max_new_tokens']} new tokens; mode sample: temperature {settings['temperature']}, top-p "
             f"{settings['top_p']}, no top-k, seed {settings['seed']} (batch i seeded with seed + i, batch size "
             f"{settings.get('generate_batch_size', settings['batch_size'])}). Reward model: `{settings.get('reward_model') or 'none'}`."),
        Para(f"Intervals are 95% percentile-bootstrap confidence intervals over prompts ({report.B} resamples, seed {report.seed}). "
             "Every number below is computed from the JSON lines listed in Sources; summary.json holds them all."),
    ]


def _decision_section(report: _Report) -> list[Any]:
    """Which method: the paired differences first, since they are what a reader decides on."""
    decision = decision_table(report.results, report.baseline, report.modes, report.B, report.seed)
    report.summary["decision"] = decision
    if not decision:
        return []
    return [
        Heading("Which method? Paired differences"),
        Para("Decide on coherent strict: every constraint met (IFEval strict) AND the reply is not degenerate text (no "
             "repetition loop, no line three times, no sentence twice, no instruction copied back; align.evaluation.degeneration). The verifier's strict "
             "score and the degenerate share follow it, so that a verifier gain bought with degenerate text shows. "
             "Each row is one run against another on the same prompts: the mean over prompts of A's score minus B's, "
             "with its 95% bootstrap CI. An interval that contains 0 means this evaluation cannot tell the two apart, "
             "and its ends bound how large the true difference plausibly is; the last column is how many prompts "
             "(`--max_prompts`) would narrow a verifier interval to +-0.05. KL, cost and the reward-hacking checks "
             "below belong in the same decision: the same score at a lower KL or cost is the better trade."),
        Table(["A", "B", "measure", "mode", "n", "A", "B", "A - B", "reading", "prompts for +-0.05"],
              [[d["a"], d["b"], d["measure"], d["mode"], str(d["n"]), fmt(d["a_mean"]), fmt(d["b_mean"]), fmt_ci(d["difference"]),
                d["reading"], fmt(d["prompts_for_resolution"]) if d["resolution"] else "-"] for d in decision]),
    ]


def _metrics_section(report: _Report) -> list[Any]:
    """One metrics table per mode."""
    results, blocks = report.results, []
    tables: dict[str, Any] = {}
    for mode in report.modes:
        tables[mode] = {r.name: generation_table(r.rows(mode), report.B, report.seed) for r in results}
        keys = [(k, label) for k, label, _ in GENERATION_METRICS
                if any(tables[mode][r.name][k]["n"] for r in results)]
        blocks.append(Heading(f"Metrics, mode {mode}"))
        if mode == "greedy":
            blocks.append(Para("Greedy replies are not samples of the policy, so they carry no KL; see mode sample."))
        header = ["run", "method", "n"] + [label for _, label in keys]
        rows = [[r.name, r.method, str(len(r.rows(mode)))] + [fmt_ci(tables[mode][r.name][k]) for k, _ in keys] for r in results]
        blocks.append(Table(header, rows))
    report.summary["metrics"] = tables
    return blocks


def _constraints_section(report: _Report) -> list[Any]:
    """What was learned and what was not: pass rate per constraint type, greedy where evaluated."""
    results = report.results
    by_mode = "greedy" if "greedy" in report.modes else report.modes[0]
    by_constraint = {r.name: pass_rates_by_constraint(r.rows(by_mode)) for r in results}
    report.summary["by_constraint"] = {"mode": by_mode, "runs": by_constraint}
    types = list(dict.fromkeys(t for rates in by_constraint.values() for t in rates))
    if not types:
        return []
    return [
        Heading(f"Constraints met, by type (mode {by_mode})"),
        Para("Instances of each constraint type met / instances asked for, over the same prompts. A per-type "
             "count this small moves by chance too; read it for what changed by many, not by one or two."),
        Table(["type"] + [r.name for r in results],
              [[t] + [f"{by_constraint[r.name][t]['passed']}/{by_constraint[r.name][t]['total']}"
                      if t in by_constraint[r.name] else "-" for r in results] for t in types]),
    ]


def _preferences_section(report: _Report) -> list[Any]:
    results, settings = report.results, report.settings
    pref = {r.name: preference_table(r.prefs, r.ppl, report.B, report.seed) for r in results}
    report.summary["preferences_and_perplexity"] = pref
    if not any(r.prefs is not None or r.ppl is not None for r in results):
        return []
    return [
        Heading("Held-out preference accuracy and perplexity"),
        Para(f"Preference accuracy on `{settings.get('pref_data')}` (first {settings.get('max_pairs')} pairs): the share of "
             "pairs whose chosen reply scores strictly higher, by the reward model and by DPO's implicit reward "
             "beta * (log pi - log pi_ref); a tie counts as wrong and is counted in its own column (a policy that is its "
             f"own reference ties everywhere). Perplexity of the policy on the last reply of `{settings.get('ppl_data')}` "
             f"(first {settings.get('max_ppl_rows')} conversations), per token."),
        Table(["run", "RM accuracy", "RM ties", "implicit-reward accuracy", "implicit ties", "beta", "perplexity", "reply tokens"],
              [[r.name, fmt_ci(pref[r.name]["rm_accuracy"]), str(pref[r.name]["rm_accuracy"]["ties"]),
                fmt_ci(pref[r.name]["implicit_accuracy"]), str(pref[r.name]["implicit_accuracy"]["ties"]),
                fmt(r.summary.get("policy", {}).get("beta")), fmt_ci(pref[r.name]["perplexity"]),
                str(sum(x["tokens"] for x in r.ppl or []))] for r in results]),
    ]


def _win_rates_section(report: _Report) -> list[Any]:
    wins = []
    for a, b in itertools.combinations(report.results, 2):
        for mode in report.modes:
            for judge, key in (("verifier", "verifier_score"), ("reward model", "rm_score")):
                w = win_rate(a.rows(mode), b.rows(mode), key, report.B, report.seed)
                if w["n"]:
                    wins.append({"a": a.name, "b": b.name, "mode": mode, "judge": judge, **w})
    report.summary["win_rates"] = wins
    if not wins:
        return [Heading("Pairwise win rates"),
                Para("No pair of runs has scores on common prompts (one run, or no constraints and no reward model).")]
    return [
        Heading("Pairwise win rates"),
        Para("On each prompt both runs answered, A wins when its score is strictly higher; equal scores are "
             "ties. The verifier judges by the share of constraints met. The last column is the bootstrap "
             "CI of (A wins - B wins) / n."),
        Table(["A", "B", "mode", "judge", "n", "A wins", "B wins", "ties", "A win rate", "B win rate", "tie rate", "A - B"],
              [[w["a"], w["b"], w["mode"], w["judge"], str(w["n"]), str(w["a_wins"]), str(w["b_wins"]), str(w["ties"]),
                fmt(w["a_win_rate"]), fmt(w["b_win_rate"]), fmt(w["tie_rate"]), fmt_ci(w["a_minus_b"])] for w in wins]),
    ]


def _reward_vs_kl_section(report: _Report) -> list[Any]:
    blocks: list[Any] = [Heading("Reward versus KL from the reference")]
    if "sample" not in report.modes:
        return blocks + [Para("No sampled replies (mode sample), so no KL: evaluate with `--modes greedy,sample`.")]
    points = reward_vs_kl_points(report.results, "sample", report.B, report.seed)
    report.summary["reward_vs_kl"] = points
    png = plot_reward_vs_kl(points, "sample")
    blocks.append(Para("Each point is one run (or one checkpoint of a run, joined in training order), its mean score on "
                       "sampled replies against the mean KL of those replies from the reference, with 95% CIs on both "
                       "axes. This is the frontier on which the DPO paper compares DPO and PPO: more reward for the same "
                       "KL is better."))
    if png:
        blocks.append(Image("reward_vs_kl.png", png, "reward and verifier score against KL from the reference"))
        report.images["reward_vs_kl.png"] = png
    blocks.append(Table(["run", "step", "KL k1", "verifier score", "RM score"],
                        [[p["run"], fmt(p["step"]), fmt_ci(p["kl_k1"]), fmt_ci(p["verifier_score"]), fmt_ci(p["rm_score"])]
                         for p in points]))
    return blocks


def _hacking_section(report: _Report) -> list[Any]:
    """Reward hacking: degenerate text against the training reward, then the reward model's score against the rest."""
    baseline = report.baseline
    warnings: list[str] = []
    degenerate_lines: list[str] = []
    for r in report.results:
        if r is not baseline:
            for mode in report.modes:
                warnings.extend(hacking_warnings(baseline, r, mode, report.B, report.seed))
                degenerate_lines.extend(degeneration_warnings(baseline, r, mode))
    report.summary["warnings"] = degenerate_lines + warnings
    blocks: list[Any] = [
        Heading("Reward-hacking checks"),
        Para(f"Degenerate text, each run against the baseline {baseline.name}: a warning when the run's training "
             f"reward ({' or '.join(TRAINING_REWARD_KEYS)} in metrics.jsonl, last quarter against first) rose while "
             "coherent strict fell or the degenerate share rose by 0.05 or more."),
    ]
    blocks.extend(Para(f"Warning: {w}") for w in degenerate_lines)
    if not degenerate_lines:
        blocks.append(Para("No degeneration warnings."))
    if not any(r.get("rm_score") is not None for res in report.results for r in res.generations):
        blocks.append(Para("Reward model: not checked: no run has reward-model scores (evaluate with `--reward_model DIR`)."))
        return blocks
    blocks.append(Para(f"Each run against the baseline {baseline.name}: a warning when the RM score rises (95% CI above 0) "
                       f"while the verifier score falls, replies grow {LENGTH_RATIO}x longer, the repeated 4-gram share "
                       f"rises by {REPETITION_RISE} or more, or the EOS rate falls by {EOS_DROP} or more (each with 95% "
                       "confidence)."))
    blocks.extend(Para(f"Warning: {w}") for w in warnings)
    if not warnings:
        blocks.append(Para("No reward-model warnings."))
    return blocks


def _cost_section(report: _Report) -> list[Any]:
    """Training curves and cost."""
    results = report.results
    blocks: list[Any] = [Heading("Training curves and cost")]
    curves = plot_training_curves(results)
    if curves:
        blocks.append(Image("training_curves.png", curves, "training curves from metrics.jsonl"))
        report.images["training_curves.png"] = curves
        blocks.append(Para("From each run's `metrics.jsonl`: " + ", ".join(f"`{r.run_dir / 'metrics.jsonl'}`" for r in results if r.train_metrics) + "."))
    else:
        blocks.append(Para("No run has a metrics.jsonl with numeric metrics."))
    costs = []
    for r in results:
        s = r.run_summary
        costs.append({"run": r.name, "method": r.method, "wall_time_s": s.get("wall_time_s"), "tokens_processed": s.get("tokens_processed"),
                      "peak_memory_mb": s.get("peak_memory_mb"), "eval_time_s": r.summary.get("timing", {}).get("total_s"),
                      "source": str(r.run_dir / "summary.json") if r.run_dir and s else None})
    report.summary["costs"] = costs
    blocks.append(Table(["run", "method", "train wall time (s)", "tokens processed", "peak memory (MB)", "eval time (s)", "source"],
                        [[c["run"], c["method"], fmt(c["wall_time_s"], 1), fmt(c["tokens_processed"]), fmt(c["peak_memory_mb"], 1),
                          fmt(c["eval_time_s"], 1), c["source"] or "-"] for c in costs]))
    return blocks


def _samples_section(report: _Report) -> list[Any]:
    """Sample replies side by side: the first n_samples prompts every run answered."""
    results, sample_mode = report.results, report.modes[0]
    common = [r["prompt_id"] for r in results[0].rows(sample_mode)]
    for r in results[1:]:
        ids = {x["prompt_id"] for x in r.rows(sample_mode)}
        common = [i for i in common if i in ids]
    samples = []
    for pid in common[: report.n_samples]:
        entry = {"prompt_id": pid, "mode": sample_mode, "replies": {}}
        for r in results:
            row = next(x for x in r.rows(sample_mode) if x["prompt_id"] == pid)
            entry["prompt"] = _last_user_turn(row["prompt"])
            entry["replies"][r.name] = {"reply": row["reply"], "verifier_score": row.get("verifier_score"), "rm_score": row.get("rm_score")}
        samples.append(entry)
    report.summary["samples"] = samples
    if not samples:
        return []
    rows = []
    for s in samples:
        cells = [f"[{s['prompt_id']}] {_shorten(s['prompt'], 600)}"]
        for r in results:
            rep = s["replies"][r.name]
            cells.append(f"{_shorten(rep['reply'], 1200)}\n\n(verifier {fmt(rep['verifier_score'])}, RM {fmt(rep['rm_score'])})")
        rows.append(cells)
    return [
        Heading(f"Sample replies ({sample_mode})"),
        Para(f"The first {len(samples)} prompts; replies as generated (cut at 1200 characters here; in full "
             "in generations.jsonl), with the verifier score and RM score of each."),
        Table(["prompt"] + [r.name for r in results], rows, wide_text=True),
    ]


def _sources_section(report: _Report) -> list[Any]:
    source_rows = []
    for r in report.results:
        for key in r.summary["files"]:
            source_rows.append([r.name, key, str(r.file(key))])
        source_rows.append([r.name, "eval summary", str(r.eval_dir / "summary.json")])
        for step, c in r.checkpoints:
            source_rows.append([r.name, f"checkpoint {step}", str(c.file("generations"))])
    return [Heading("Sources"), Table(["run", "what", "file"], source_rows)]
