"""Atomic writes: a failure mid-write leaves the old content; run info records config and versions."""

import dataclasses
import json

import pytest
import yaml

from align.errors import AlignError
from align.io import atomic_dir, atomic_write_json, atomic_write_text, check_writable, write_run_info


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_dir_failure_keeps_old(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "w").write_text("new, half")
            raise RuntimeError("killed mid-save")
    assert (target / "w").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("new")
    assert (target / "w").read_text() == "new"


def test_check_writable(tmp_path):
    assert check_writable(tmp_path / "out").is_dir()
    blocker = tmp_path / "file"
    atomic_write_text(blocker, "x")
    with pytest.raises(AlignError, match="cannot write there"):
        check_writable(blocker / "out")
    with pytest.raises(AlignError, match="GB free"):
        check_writable(tmp_path / "out2", min_free_gb=1e9)


def test_run_info(tmp_path):
    @dataclasses.dataclass
    class C:
        lr: float = 0.1
        name: str = "x"

    write_run_info(C(), tmp_path, {"stage": "t"})
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {"lr": 0.1, "name": "x"}
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["stage"] == "t" and "torch" in info["versions"] and info["git_revision"]
    from align.models.loading import cpu_description

    assert info["cpu"] == cpu_description() and " cores, " in info["cpu"]
