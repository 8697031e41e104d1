"""The training stream: ratio mix, determinism, disjoint rank shares, exact resume."""

from __future__ import annotations

from collections import Counter

import pytest

from stedm.data.mixing import MixedEpochSampler


def test_epoch_length_and_mix_follow_ratios():
    sampler = MixedEpochSampler(sizes=[5, 50], ratios=[0.2, 0.8], samples=1000, seed=3)
    order = list(sampler)
    assert len(order) == len(sampler) == 1000
    source = Counter(i >= 5 for i in order)
    assert source[False] == 200 and source[True] == 800
    # drawn with replacement, uniformly inside each entry
    per_item = Counter(i for i in order if i < 5)
    assert set(per_item) == set(range(5)) and min(per_item.values()) > 20


def test_same_seed_same_stream_new_epoch_new_order():
    a = MixedEpochSampler([10, 10], [1.0, 1.0], samples=30, seed=7)
    b = MixedEpochSampler([10, 10], [1.0, 1.0], samples=30, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(MixedEpochSampler([10, 10], [1.0, 1.0], samples=30, seed=8)) != first


def test_ranks_draw_disjoint_shares_that_make_the_epoch():
    kw = dict(sizes=[7, 13], ratios=[1.0, 0.5], samples=41, seed=1)
    full = MixedEpochSampler(**kw).epoch_order(0).tolist()
    shares = [list(MixedEpochSampler(**kw, rank=r, world_size=2)) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(full) // 2
    positions = [list(range(r, len(full) - len(full) % 2, 2)) for r in range(2)]
    assert not set(positions[0]) & set(positions[1])
    for r in range(2):
        assert shares[r] == [full[p] for p in positions[r]]


@pytest.mark.parametrize("world_size", [1, 2])
def test_restored_sampler_continues_exactly(world_size):
    kw = dict(sizes=[9, 4], ratios=[1.0, 1.0], samples=20, seed=5, rank=world_size - 1, world_size=world_size)
    reference = MixedEpochSampler(**kw)
    reference.set_epoch(2)
    stream = list(reference)
    interrupted = MixedEpochSampler(**kw)
    interrupted.set_epoch(2)
    consumed = list(iter(interrupted))[:6]
    state = interrupted.state_dict(consumed=len(consumed))
    restored = MixedEpochSampler(**kw)
    restored.load_state_dict(state)
    assert len(restored) == len(stream)  # the epoch's full share: Lightning counts the epoch from len()
    assert consumed + list(restored) == stream
    restored.set_epoch(3)  # the next epoch is whole again
    assert len(list(restored)) == len(stream)


def test_restore_refuses_a_different_stream():
    state = MixedEpochSampler([4], [1.0], samples=8, seed=1).state_dict(consumed=2)
    with pytest.raises(ValueError, match="data stream differs"):
        MixedEpochSampler([4], [1.0], samples=8, seed=2).load_state_dict(state)
