"""Rollout batching for the policy engine: mini-batch split, DP sharding (equal-count shards and the
token-balanced shares `PolicyEngine.scatter` sends), token-budget packing, collation.

python -m pytest tests/unit/test_batching.py -q
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_sapo.megatron.batching import (
    Sample,
    assign_data_parallel,
    collate,
    data_parallel_shares,
    pack_micro_batches,
    shard_for_data_parallel,
    split_mini_batches,
)


def _sample(length: int, start: int, adv: float = 1.0, **kw) -> Sample:
    return Sample(torch.arange(1, length + 1), response_start=start, advantage=adv, **kw)


def test_sample_validates_shapes() -> None:
    with pytest.raises(ValueError):
        _sample(5, 0)
    with pytest.raises(ValueError):
        _sample(5, 5)
    with pytest.raises(ValueError):
        _sample(5, 2, old_logprobs=torch.zeros(2))
    s = _sample(5, 2, loss_mask=torch.tensor([True, False, True]))
    assert s.seq_len == 4 and s.num_response_tokens == 3
    assert s.response_mask().tolist() == [True, False, True]


def test_split_mini_batches_is_contiguous_and_balanced() -> None:
    assert split_mini_batches(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError):
        split_mini_batches([1], 2)


def test_dp_shards_reassemble_the_global_mini_batches() -> None:
    samples, k, dp = list(range(12)), 2, 3
    shards = [shard_for_data_parallel(samples, mini_batches=k, dp_rank=r, dp_size=dp) for r in range(dp)]
    for m, global_mb in enumerate(split_mini_batches(samples, k)):
        local_mbs = [split_mini_batches(shard, k)[m] for shard in shards]
        assert [x for mb in local_mbs for x in mb] == global_mb
    with pytest.raises(ValueError):
        shard_for_data_parallel(list(range(10)), mini_batches=2, dp_rank=0, dp_size=3)


def _check_assignment(lens: list[int], k: int, dp: int) -> list[list[list[int]]]:
    """Every property of `assign_data_parallel` against `split_mini_batches` and the LPT bound."""
    plan = assign_data_parallel(lens, mini_batches=k, dp_size=dp)
    assert plan == assign_data_parallel(list(lens), mini_batches=k, dp_size=dp)  # deterministic
    assert len(plan) == dp and all(len(per_mb) == k for per_mb in plan)
    # global mini-batch m is the DP1 one, split across the ranks: every index exactly once
    for m, global_mb in enumerate(split_mini_batches(list(range(len(lens))), k)):
        parts = [plan[r][m] for r in range(dp)]
        assert sorted(i for part in parts for i in part) == global_mb
        assert all(part == sorted(part) for part in parts)
        tokens = [sum(lens[i] for i in part) for part in parts]
        mean, longest = sum(lens[i] for i in global_mb) / dp, max(lens[i] for i in global_mb)
        assert max(tokens) <= mean + longest
    step = [sum(lens[i] for mb in per_mb for i in mb) for per_mb in plan]
    longest_sum = sum(max(lens[i] for i in mb) for mb in split_mini_batches(list(range(len(lens))), k))
    assert max(step) <= sum(lens) / dp + longest_sum
    return plan


@settings(max_examples=300, deadline=None)
@given(
    lens=st.lists(st.integers(1, 60), min_size=1, max_size=40),
    k=st.integers(1, 4),
    dp=st.integers(1, 8),
)
def test_token_balanced_assignment_properties(lens: list[int], k: int, dp: int) -> None:
    if len(lens) < k:
        with pytest.raises(ValueError):
            assign_data_parallel(lens, mini_batches=k, dp_size=dp)
        return
    _check_assignment(lens, k, dp)


def test_token_balanced_assignment_examples() -> None:
    # one mini-batch [10, 1, 1, 8] on 2 ranks: longest first onto the least-loaded rank
    assert assign_data_parallel([10, 1, 1, 8], mini_batches=1, dp_size=2) == [[[0]], [[1, 2, 3]]]
    # equal lengths: ties go to the rank with fewer tokens in the step, so odd mini-batches alternate
    lens = [4] * 6
    plan = _check_assignment(lens, 2, 2)
    assert plan == [[[0, 2], [4]], [[1], [3, 5]]]
    # fewer samples than ranks: some ranks hold nothing of a mini-batch (the engine runs a filler)
    plan = _check_assignment([5, 3, 7], 1, 4)
    assert plan == [[[2]], [[0]], [[1]], [[]]]
    with pytest.raises(ValueError):
        assign_data_parallel([1, 2], mini_batches=1, dp_size=0)


def test_shares_hold_only_their_samples_and_global_indices() -> None:
    samples = [_sample(n, 1) for n in (12, 3, 9, 4, 7, 5, 6, 2)]
    shares = data_parallel_shares(samples, mini_batches=2, dp_size=3)
    plan = assign_data_parallel([s.seq_len for s in samples], mini_batches=2, dp_size=3)
    seen = []
    for share, per_mb in zip(shares, plan):
        assert share.indices == [i for mb in per_mb for i in mb]
        assert share.mini_batch_sizes == [len(mb) for mb in per_mb]
        assert share.num_samples == 8
        assert all(s is samples[i] for s, i in zip(share.samples, share.indices))
        seen += share.indices
    assert sorted(seen) == list(range(8))  # disjoint and covering


@settings(max_examples=200, deadline=None)
@given(
    lens=st.lists(st.integers(1, 50), min_size=1, max_size=20),
    budget=st.integers(1, 200),
    min_count=st.integers(1, 30),
    multiple_of=st.integers(1, 4),
)
def test_packing_is_a_partition_within_budget(
    lens: list[int], budget: int, min_count: int, multiple_of: int
) -> None:
    groups = pack_micro_batches(lens, budget, min_count=min_count, multiple_of=multiple_of)
    assert sorted(i for g in groups for i in g) == list(range(len(lens)))
    assert len(groups) >= min_count and len(groups) % multiple_of == 0
    for g in groups:
        if len(g) > 1:
            assert len(g) * max(lens[i] for i in g) <= budget


def test_packing_puts_oversized_samples_alone_and_fills_with_empty_groups() -> None:
    assert pack_micro_batches([100, 3, 3], 10) == [[0], [1, 2]]
    assert pack_micro_batches([5], 10, min_count=3) == [[0], [], []]
    assert pack_micro_batches([2, 2, 2, 2], 100, min_count=2) == [[0, 1], [2, 3]]


def test_collate_aligns_labels_masks_and_old_logprobs() -> None:
    a = _sample(6, 3, adv=0.5)  # tokens 1..6, response = tokens 4, 5, 6
    b = _sample(4, 1, adv=-1.0, loss_mask=torch.tensor([True, False, True]))
    old = [torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-4.0, -5.0, -6.0])]
    mb = collate([a, b], old, pad_token_id=0, shape=(3, 7))
    assert mb.input_ids.shape == (3, 7)
    assert mb.input_ids[0].tolist() == [1, 2, 3, 4, 5, 0, 0]
    assert mb.labels[0].tolist() == [2, 3, 4, 5, 6, 0, 0]
    # position t predicts label t: response tokens 4, 5, 6 sit at positions 2, 3, 4
    assert mb.loss_mask[0].tolist() == [False, False, True, True, True, False, False]
    assert mb.loss_mask[1].tolist() == [True, False, True, False, False, False, False]
    assert not mb.loss_mask[2].any()  # padding row
    assert mb.labels[0, mb.loss_mask[0]].tolist() == [4, 5, 6]
    assert [x.tolist() for x in mb.response_values(mb.old_logprobs)] == [
        [-1.0, -2.0, -3.0],
        [-4.0, -5.0, -6.0],
    ]
    assert mb.advantages.tolist() == [0.5, -1.0, 0.0]
    assert mb.position_ids[1].tolist() == list(range(7))


def test_collate_rounds_the_sequence_length_up_for_sequence_parallelism() -> None:
    samples = [Sample(torch.arange(1, 8), 3, 1.0), Sample(torch.arange(1, 5), 2, -1.0)]  # seq_len 6 and 3
    plain = collate(samples)
    padded = collate(samples, seq_multiple_of=4)
    assert plain.input_ids.shape == (2, 6) and padded.input_ids.shape == (2, 8)
    # The extra positions are padding: never in the loss, and the real positions are unchanged.
    assert not padded.loss_mask[:, 6:].any()
    assert torch.equal(padded.input_ids[:, :6], plain.input_ids)
    assert torch.equal(padded.loss_mask[:, :6], plain.loss_mask)
