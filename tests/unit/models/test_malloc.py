"""align.models.activations: the glibc malloc settings of the training recipes (return_freed_memory_to_os) and of
inference after training (heap_for_inference), checked by what they are for: minor page faults.

Each case runs in a fresh interpreter (mallopt settings are process-wide and would leak into the other tests). A
4 MiB tensor allocated, written and freed 100 times: with the 1 MiB mmap threshold every allocation is a fresh mmap
whose 1,024 pages fault in again (~100,000 faults); with heap_for_inference's 32 MiB threshold the block comes back
from the heap, mostly already resident (7,168 faults measured against 102,500, AMD EPYC). The factor asserted (8x)
leaves room for allocator differences between machines and glibc versions.
"""

import json
import subprocess
import sys

import pytest

SCRIPT = """
import json, resource, torch
from align.models.activations import heap_for_inference, return_freed_memory_to_os
notes = [return_freed_memory_to_os()]
if {inference}:
    notes.append(heap_for_inference())
torch.empty(1 << 20).fill_(1.0)  # torch's own first-use allocations, outside the count
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    torch.empty(1 << 20).fill_(1.0)  # 4 MiB of float32, every page written
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({{"faults": faults, "notes": notes}}))
"""


def _faults(inference: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(inference=inference)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_heap_for_inference_stops_the_page_faults_of_training_threshold():
    training, inference = _faults(False), _faults(True)
    assert training["notes"] == ["malloc: mmap threshold 1 MiB, trim threshold 2 MiB"]
    assert inference["notes"][1] == "malloc: mmap threshold 32 MiB, trim threshold 64 MiB (inference)"
    assert training["faults"] > 100 * 1024 * 0.9  # every 4 MiB block faulted in anew: the setting took
    assert inference["faults"] * 8 < training["faults"]


THRESHOLD_SCRIPT = """
import json, resource, torch
from align.models.activations import FreedMemoryArgs
note = FreedMemoryArgs(freed_memory_mmap_mb={mb}).freed_memory_note()
torch.empty(1 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    torch.empty(1 << 20).fill_(1.0)  # 4 MiB blocks
print(json.dumps({{"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, "note": note}}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_mmap_mb_sets_which_blocks_go_back_to_the_os():
    """--freed_memory_mmap_mb sets the threshold: 4 MiB blocks are mmapped (and faulted in anew) under 1 MiB and come
    back from the heap under 8 MiB. That needs the trim threshold raised with it (to twice the mmap threshold): under
    glibc's 128 KiB a freed block at the heap's top was handed back at once, and the 8 MiB run faulted 99,232 times
    of about 102,500 in one suite run (under 12,800 in another, depending on the heap's layout)."""
    runs = {}
    for mb in (1, 8):
        out = subprocess.run([sys.executable, "-c", THRESHOLD_SCRIPT.format(mb=mb)], capture_output=True, text=True, check=True)
        runs[mb] = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs[1]["note"] == "malloc: mmap threshold 1 MiB, trim threshold 2 MiB"
    assert runs[8]["note"] == "malloc: mmap threshold 8 MiB, trim threshold 16 MiB"
    assert runs[1]["faults"] > 100 * 1024 * 0.9  # every 4 MiB block faulted in anew: the 1 MiB setting took
    assert runs[8]["faults"] * 8 < runs[1]["faults"]  # the same block back from the heap, already resident


def test_freed_memory_mmap_mb_below_one_is_a_config_error():
    from align.errors import ConfigError
    from align.models.activations import FreedMemoryArgs

    with pytest.raises(ConfigError, match="freed_memory_mmap_mb: expected a number of MiB >= 1, got 0"):
        FreedMemoryArgs(freed_memory_mmap_mb=0).freed_memory_note()
    assert FreedMemoryArgs(return_freed_memory=False).freed_memory_note() is None


def test_a_bad_threshold_fails_before_the_output_folder_is_written(tmp_path):
    from align.config import build_config
    from align.errors import ConfigError
    from align.trainers.common import start_run
    from bench.harness.trainers import load_recipe

    module = load_recipe("reward")
    cfg = build_config(module.RewardArgs, dict(output_dir=str(tmp_path / "out"), freed_memory_mmap_mb=0, report_to="none"))
    with pytest.raises(ConfigError, match="freed_memory_mmap_mb"):
        start_run(cfg, "reward", cpu_max_steps=1)
    assert not (tmp_path / "out").exists()
