"""Compare evaluated runs (align.evaluation outputs) in one report: report.md, a self-contained
report.html (plots embedded as base64 PNG, no external resources) and summary.json.

    from align.report.build import ReportArgs, build_report
    from align.report.results import load_eval
    results = [load_eval("outputs/sft"), load_eval("outputs/dpo"), load_eval("outputs/ppo")]
    build_report(results, "outputs/report", ReportArgs())

What it holds, each number computed from the JSON lines whose paths the report names:

- which method: paired differences (same prompts) between PPO and DPO runs and against their SFT start,
  with CIs, a plain reading, and how many prompts would resolve a difference of 0.05; coherent strict
  (strict AND not degenerate, align.evaluation.degeneration) first, then IFEval strict and the degenerate share;
- a metrics table per sampling mode with percentile-bootstrap 95% confidence intervals over prompts
  (Efron & Tibshirani 1993, ch. 13), seeded, so that small differences are not over-read;
- pairwise win rates judged by the verifier and by the reward model, ties counted apart;
- reward against KL from the reference, one point per run (or per checkpoint), the picture in which the
  DPO paper compares DPO with PPO (Rafailov et al. 2023, arXiv:2305.18290, Figure 2);
- training curves from each run's metrics.jsonl and each run's cost from its summary.json;
- sample replies to the same prompts side by side;
- reward-hacking warnings: a run whose training reward rose while coherent strict fell or the degenerate
  share rose; a run whose reward-model score rises over the baseline while the verifier score falls, or
  replies grow much longer, repeat themselves more, or stop ending.

Runs are compared only when they were evaluated on the same prompts with the same sampling settings
(`check_comparable`); otherwise the comparison stops with an error naming the setting and the runs.

The modules: results.py (loading evaluations, comparability), stats.py (intervals, paired differences, win rates,
hacking checks), plots.py, render.py (Markdown and HTML), build.py (one report from loaded results) and compare.py
(`align compare`: evaluates the runs that need it, then builds the report).
"""
