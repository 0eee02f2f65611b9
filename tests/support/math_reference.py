"""The RL math tests' shared pieces: the reference numbers and the tensors they are compared as.

`ref` (a fixture) is support/reference/ppo_math.json, the repo's own copy of values computed by OpenRLHF, TRL
and DeepSpeed-Chat on one shared input; the tests read only that file.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from repo_paths import REFERENCE

ATOL = 1e-5  # the reference values are rounded to 6 decimals


@pytest.fixture(scope="session")
def ref() -> dict:
    return json.loads((REFERENCE / "ppo_math.json").read_text())


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(actual, expected) -> None:
    expected = expected if isinstance(expected, torch.Tensor) else t(expected)
    assert_close(actual, expected, atol=ATOL, rtol=0)


def prefix_mask(lengths: list[int], response_len: int) -> torch.Tensor:
    """(len(lengths), response_len) bool, row i True on its first lengths[i] positions (right padding)."""
    return torch.arange(response_len) < torch.tensor(lengths)[:, None]
