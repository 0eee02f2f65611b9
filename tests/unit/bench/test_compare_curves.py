"""bench/compare_curves.py: learning curves side by side against training seconds."""

import json


def test_compare_curves_tabulates_and_plots_against_training_seconds(tmp_path):
    """bench/compare_curves.py: a row per checkpoint of every curve, with the paired difference and its interval;
    a plot is written; curves evaluated differently, or on another CPU, are refused with the reason."""
    from recipe_harness import run_cli

    def curve(name, prompts=320, cpu="cpu A", mean=0.1):
        metric = {"baseline_mean": 0.15, "run_mean": 0.15 + mean, "mean": mean, "lo": mean - 0.05, "hi": mean + 0.05, "n": prompts}
        points = [{"step": 300, "tokens": 9000, "train_seconds": 584.4,
                   "metrics": {"coherent_strict": metric, "degenerate": dict(metric, run_mean=0.2), "eos": dict(metric, run_mean=0.48)}}]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"eval_prompts": prompts, "decoding": "greedy, 128 new tokens", "cpu": cpu, "points": points}))
        return f"{name}={path}"

    png = tmp_path / "curves.png"
    proc = run_cli(["bench/compare_curves.py", "--out", str(png), "--budget_seconds", "600", curve("a"), curve("b", mean=-0.02)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| a | 300 | 584 | 0.250 (+0.100 [+0.050, +0.150]) | 0.200 | 0.480 |" in proc.stdout
    assert "| b | 300 | 584 | 0.130 (-0.020 [-0.070, +0.030]) |" in proc.stdout
    assert png.stat().st_size > 1000
    refused = run_cli(["bench/compare_curves.py", "--out", str(png), curve("a"), curve("c", prompts=128)])
    assert refused.returncode != 0 and "evaluated differently" in refused.stderr
    refused = run_cli(["bench/compare_curves.py", "--out", str(png), curve("a"), curve("d", cpu="cpu B")])
    assert refused.returncode != 0 and "different CPUs" in refused.stderr
