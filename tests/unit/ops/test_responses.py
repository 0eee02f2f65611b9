"""align.ops.responses: cutting sampled responses after the first EOS (and PPO's missing-EOS penalty on the same
reference rows)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from align.ops.responses import truncate_after_eos
from align.rl.ppo.rollout import apply_missing_eos_penalty
from math_reference import close, ref, t  # noqa: F401  (ref is a fixture)


def test_truncation_matches_reference(ref):
    inputs, expected = ref["inputs"], ref["truncation"]
    responses = torch.tensor(inputs["responses"])
    truncated, response_mask, last_token_index, contains_eos = truncate_after_eos(
        responses, inputs["eos_token_id"], inputs["pad_token_id"]
    )
    assert truncated.tolist() == expected["truncated_responses"]
    assert last_token_index.tolist() == expected["last_token_index"]
    assert contains_eos.tolist() == expected["contains_eos"]
    assert response_mask.dtype == torch.bool
    assert response_mask.long().tolist() == inputs["response_mask"]
    penalised = apply_missing_eos_penalty(t(inputs["scores"]), contains_eos, 1.0)
    close(penalised, expected["scores_with_missing_eos_penalty_1.0"])


def test_truncation_keeps_an_eos_at_position_zero_and_cuts_at_the_first_eos():
    responses = torch.tensor([[2, 5, 6], [7, 2, 2], [2, 2, 2]])
    truncated, mask, last_token_index, contains_eos = truncate_after_eos(responses, eos_token_id=2, pad_token_id=2)
    assert truncated.tolist() == [[2, 2, 2], [7, 2, 2], [2, 2, 2]]
    assert mask.tolist() == [[True, False, False], [True, True, False], [True, False, False]]
    assert last_token_index.tolist() == [0, 1, 0]
    assert contains_eos.tolist() == [True, True, True]


@settings(max_examples=50, deadline=None)
@given(responses=st.lists(st.lists(st.integers(0, 4), min_size=5, max_size=5), min_size=1, max_size=4))
def test_truncation_mask_ends_at_the_first_eos(responses):
    tokens = torch.tensor(responses)
    truncated, mask, last_token_index, contains_eos = truncate_after_eos(tokens, eos_token_id=2, pad_token_id=0)
    for row, row_truncated, row_mask, last, has_eos in zip(responses, truncated, mask, last_token_index, contains_eos):
        expected_last = row.index(2) if 2 in row else len(row) - 1
        assert last.item() == expected_last and has_eos.item() == (2 in row)
        assert row_mask.tolist() == [i <= expected_last for i in range(len(row))]
        assert row_truncated.tolist() == row[: expected_last + 1] + [0] * (len(row) - expected_last - 1)
