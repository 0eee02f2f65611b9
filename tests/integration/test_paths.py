"""Runs write inside their output directory, and names read from input cannot lead a path out of it.

Where a path is built from a name that came from input, not from the user's own --output_dir / --out (audit of
recipes/, eval/, align/; align/plan.py and the developer tools in bench/ and tools/ are not covered):
- eval/compare.py --checkpoints writes RUN/checkpoint-N/eval/: `checkpoint-N` is found on disk and may be a
  symlink to elsewhere -> align.io.inside(run, name).
- align/report.load_eval reads the files named in an evaluation's summary.json (`files`) -> inside(eval_dir, name).
Everything else a recipe or script writes has a fixed name under its output directory (adapter/, merged/,
checkpoint-<step>/, checkpoints/update-<n>/, datasets/train/, eval/, metrics.jsonl, summary.json, report.*),
and removals (stale checkpoints) go through shutil.rmtree, which refuses symlinks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from align.errors import ConfigError
from align.io import inside
from recipe_harness import REPO, assert_no_traceback, recipe_args, tiny_data  # noqa: F401  (tiny_data is a fixture)
from repo_paths import SUPPORT


def test_inside_accepts_names_under_the_root_and_refuses_the_rest(tmp_path):
    root = tmp_path / "run"
    (root / "sub").mkdir(parents=True)
    assert inside(root, "sub", "eval", field="f") == root / "sub" / "eval"
    assert inside(root, "a/../b.jsonl", field="f") == root / "a/../b.jsonl"  # `..` that stays inside is fine
    for name in ("../x", "sub/../../x", "/etc/passwd", str(tmp_path)):
        with pytest.raises(ConfigError, match=r"^summary.json: files.generations: .* leads outside .*; refused$"):
            inside(root, name, field="summary.json: files.generations")
    (root / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ConfigError, match="'link' leads outside"):
        inside(root, "link", field="checkpoint")
    linked_root = tmp_path / "alias"
    linked_root.symlink_to(root, target_is_directory=True)
    assert inside(linked_root, "sub", field="f") == linked_root / "sub"  # a root that is itself a symlink


def fake_evaluation(eval_dir: Path, generations: str = "generations.jsonl") -> None:
    """An evaluation directory as eval/evaluate.py writes it, small enough for load_eval."""
    eval_dir.mkdir(parents=True)
    (eval_dir / "generations.jsonl").write_text(json.dumps({"prompt_id": "0", "mode": "greedy", "reply": "hi"}) + "\n")
    settings = {"prompts": "p.jsonl", "max_prompts": 1, "modes": ["greedy"], "max_new_tokens": 8, "temperature": 1.0,
                "top_p": 1.0, "seed": 0, "pref_data": None, "max_pairs": 0, "ppl_data": None, "max_ppl_rows": 0}
    summary = {"run": "x", "settings": settings, "metrics": {}, "files": {"generations": generations}}
    (eval_dir / "summary.json").write_text(json.dumps(summary))


def compare(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "eval/compare.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)


def test_compare_refuses_a_summary_naming_a_file_outside_its_evaluation(tmp_path):
    secret = tmp_path / "secret.jsonl"
    secret.write_text(json.dumps({"prompt_id": "0", "mode": "greedy", "reply": "private"}) + "\n")
    run = tmp_path / "run"
    fake_evaluation(run / "eval", generations="../../secret.jsonl")
    result = compare(str(run), "--out", str(tmp_path / "report"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert_no_traceback(result.stderr)
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {run / 'eval' / 'summary.json'}: files.generations: '../../secret.jsonl' leads outside {run / 'eval'} "
        f"(to {secret}); refused")
    assert not (tmp_path / "report").exists()


def test_compare_checkpoints_refuses_a_checkpoint_linked_outside_its_run(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    fake_evaluation(run / "eval")
    elsewhere.mkdir()
    (run / "checkpoint-1").symlink_to(elsewhere, target_is_directory=True)
    result = compare(str(run), "--checkpoints", "true", "--out", str(tmp_path / "report"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert_no_traceback(result.stderr)
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {run}: checkpoint: 'checkpoint-1' leads outside {run} (to {elsewhere}); refused")
    assert list(elsewhere.iterdir()) == [] and not (tmp_path / "report").exists()


@pytest.mark.slow
def test_a_recipe_run_writes_only_inside_its_output_dir(tiny_model_dir, tiny_data, tmp_path):
    """DPO on the tiny model, as a fresh `python recipes/dpo.py` (environment read at import, as a user's run),
    with HOME, TMPDIR, the XDG and Hugging Face caches and the working directory pointed at empty scratch
    directories, and every Python-level write recorded by an audit hook (tests/support/audit_writes.py).

    What is allowed outside output_dir, and why: /dev/null; temporary files in TMPDIR that the run removes
    before it exits (ctypes' find_library probe; the `datasets` cache of TRL's in-memory preprocessing, an
    hf_datasets-* directory deleted at exit); the empty torchinductor_<user> directory that importing torch
    makes in the temp directory (here or, when it already exists, /tmp: mkdir with exist_ok, nothing written); subprocesses `git rev-parse` and `git --no-optional-locks status` (run_info.json's revision; the
    flag keeps git from rewriting the repository's index) and `ldconfig -p`. Native writers the hook cannot see
    (safetensors, torch's zip writer, tokenizers) only write where Python hands them a path, and the scratch
    directories show nothing else was left anywhere a run could plausibly write."""
    scratch = {name: tmp_path / name for name in ("home", "tmp", "cwd")}
    for d in scratch.values():
        d.mkdir()
    out, events_log = tmp_path / "out", tmp_path / "events.jsonl"
    inputs = [Path(tiny_model_dir), Path(tiny_data["prefs"]).parent]
    before = {p: sorted((q.name, q.stat().st_mtime_ns) for q in p.iterdir()) for p in inputs}
    env = {**os.environ, "HOME": str(scratch["home"]), "TMPDIR": str(scratch["tmp"]), "HF_HOME": str(scratch["home"] / "hf"),
           "HF_DATASETS_CACHE": str(scratch["home"] / "hf_datasets"), "XDG_CACHE_HOME": str(scratch["home"] / ".cache"),
           "XDG_CONFIG_HOME": str(scratch["home"] / ".config"), "MPLCONFIGDIR": str(scratch["home"] / "mpl"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("TENSORBOARD_LOGGING_DIR", None)  # the recipe's default: output_dir/tensorboard
    argv = recipe_args("dpo", tiny_model_dir, tiny_data, out, max_steps=2, save_steps=1, report_to="tensorboard")
    result = subprocess.run([sys.executable, str(SUPPORT / "audit_writes.py"), str(events_log),
                             str(REPO / "recipes" / "dpo.py"), *argv], cwd=scratch["cwd"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and list((out / "tensorboard").iterdir())

    events = [json.loads(line) for line in events_log.read_text().splitlines()]
    commands = {tuple(e["args"][:2]) for e in events if e["event"] == "subprocess"}
    assert commands <= {("git", "rev-parse"), ("git", "--no-optional-locks"), ("/sbin/ldconfig", "-p")}, commands
    outside = []
    for e in events:
        if e["event"] == "subprocess":
            continue
        path = Path(os.path.normpath(e["path"]))
        if path == out or path.is_relative_to(out) or str(path) == "/dev/null" or path.is_relative_to(scratch["tmp"]):
            continue
        if e["event"] == "os.mkdir" and path.name.startswith("torchinductor_"):  # torch's import: an empty cache dir
            continue
        outside.append(e)
    assert not outside, outside
    leftovers = sorted(str(p.relative_to(scratch["tmp"])) for p in scratch["tmp"].rglob("*"))
    assert leftovers in ([], ["torchinductor_root"]), leftovers
    assert list(scratch["home"].rglob("*")) == [] and list(scratch["cwd"].rglob("*")) == []
    assert {p: sorted((q.name, q.stat().st_mtime_ns) for q in p.iterdir()) for p in inputs} == before  # inputs untouched
