"""Properties of the global row order and its partition across ranks and dataloader workers (issue 5)."""

from __future__ import annotations

import itertools
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.data_order import FeistelPermutation, GlobalOrder, Source, apportion, round_keys
from trainer.data_partition import BatchLayout, iter_micro_batches, plan_epoch

FAST = settings(max_examples=40, deadline=None)


# ---------------------------------------------------------------- permutation


@FAST
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**32), epoch=st.integers(0, 50))
def test_feistel_is_a_bijection_on_range(n: int, seed: int, epoch: int) -> None:
    perm = FeistelPermutation(n, round_keys("fp", seed, epoch))
    out = perm(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))


def test_feistel_random_access_matches_full_evaluation() -> None:
    perm = FeistelPermutation(1000, round_keys("fp", 3, 1))
    full = perm(np.arange(1000))
    picks = np.array([999, 0, 500, 17, 17])
    assert perm(picks).tolist() == full[picks].tolist()


def test_order_is_pinned_across_versions_and_platforms() -> None:
    """Resuming a run after upgrading numpy/python must not change the order; these values were computed once
    by this implementation and must never change without bumping ORDER_VERSION."""
    perm = FeistelPermutation(10, round_keys("fp", 0, 0))
    assert perm(np.arange(10)).tolist() == [9, 6, 3, 4, 7, 8, 1, 2, 5, 0]
    big = FeistelPermutation(10**9, round_keys("abc", 42, 7))
    assert big(np.array([0, 1, 123456789])).tolist() == [980301640, 496912051, 416437345]
    odd_bits = FeistelPermutation(100_000, round_keys("abc", 1, 0))  # 17 bits: the unbalanced split
    assert odd_bits(np.array([0, 5, 99_999])).tolist() == [35204, 67156, 76872]


def test_permutations_differ_by_epoch_seed_and_fingerprint() -> None:
    n = 500
    base = FeistelPermutation(n, round_keys("fp", 1, 0))(np.arange(n))
    for keys in (round_keys("fp", 1, 1), round_keys("fp", 2, 0), round_keys("other", 1, 0)):
        other = FeistelPermutation(n, keys)(np.arange(n))
        # Two independent random permutations of 500 share ~1 fixed point; a weak mix would share many.
        assert (other == base).sum() < 15


def test_shuffle_is_not_trivially_structured() -> None:
    """A usable shuffle moves rows far: adjacent positions should not map to adjacent rows."""
    n = 10_000
    out = FeistelPermutation(n, round_keys("fp", 0, 0))(np.arange(n))
    assert (np.abs(np.diff(out)) == 1).sum() < 20
    assert abs(np.corrcoef(np.arange(n), out)[0, 1]) < 0.05


# ---------------------------------------------------------------- mixing


def test_apportion_is_exact_and_deterministic() -> None:
    assert apportion(10, [1, 1, 1]) == (4, 3, 3)
    assert apportion(7, [0.5, 0.25, 0.25]) == (3, 2, 2)  # 3.5, 1.75, 1.75: largest remainders win
    assert sum(apportion(12345, [0.1, 0.2, 0.7])) == 12345
    with pytest.raises(ValueError, match="> 0"):
        apportion(10, [1, 0])


def _reference_merge(counts: tuple[int, ...]) -> list[tuple[int, int]]:
    """The documented interleave, written the slow obvious way: sort every draw by its time key."""
    total = sum(counts)
    keyed = []
    for j, c in enumerate(counts):
        for k in range(c):
            t = Fraction((2 * k + 1) * total, 2 * c)
            keyed.append((int(t), j, k))  # floor of the exact time, ties by dataset index
    keyed.sort()
    return [(j, k) for _, j, k in keyed]


@FAST
@given(counts=st.lists(st.integers(1, 40), min_size=2, max_size=5))
def test_interleave_matches_reference_merge(counts: list[int]) -> None:
    sources = [Source(c, f"d{j}") for j, c in enumerate(counts)]
    order = GlobalOrder(sources, seed=0, shuffle=False)  # weights = sizes -> counts == sizes
    assert order.counts == tuple(counts)
    src, rows = order.lookup(0, np.arange(order.epoch_length))
    assert list(zip(src.tolist(), rows.tolist(), strict=True)) == _reference_merge(tuple(counts))


@FAST
@given(
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=4),
    seed=st.integers(0, 1000),
    epoch=st.integers(0, 5),
    shuffle=st.booleans(),
)
def test_epoch_without_weights_reads_every_row_of_every_dataset_once(
    sizes: list[int], seed: int, epoch: int, shuffle: bool
) -> None:
    order = GlobalOrder([Source(n, f"d{j}") for j, n in enumerate(sizes)], seed=seed, shuffle=shuffle)
    src, rows = order.lookup(epoch, np.arange(order.epoch_length))
    seen = Counter(zip(src.tolist(), rows.tolist(), strict=True))
    assert seen == Counter((j, r) for j, n in enumerate(sizes) for r in range(n))


@FAST
@given(
    sizes=st.lists(st.integers(1, 50), min_size=2, max_size=4),
    weights=st.lists(st.integers(1, 9), min_size=4, max_size=4),
    length=st.integers(1, 300),
    seed=st.integers(0, 100),
)
def test_weighted_epochs_follow_weights_and_walk_full_passes(
    sizes: list[int], weights: list[int], length: int, seed: int
) -> None:
    weights = weights[: len(sizes)]
    order = GlobalOrder(
        [Source(n, f"d{j}") for j, n in enumerate(sizes)],
        seed=seed,
        weights=weights,
        samples_per_epoch=length,
    )
    assert order.counts == apportion(length, weights)
    # Over several epochs each dataset is read as consecutive full passes: in every complete pass each row
    # appears exactly once, so no row is repeated before all others were read.
    epochs = 4
    per_dataset: dict[int, list[int]] = {j: [] for j in range(len(sizes))}
    for e in range(epochs):
        src, rows = order.lookup(e, np.arange(length))
        prefix_counts = np.zeros(len(sizes))
        for m, (j, r) in enumerate(zip(src.tolist(), rows.tolist(), strict=True)):
            per_dataset[j].append(r)
            prefix_counts[j] += 1
            # smoothness: every prefix holds each dataset within a small bound of its share
            expected = (m + 1) * np.array(order.counts) / length
            assert np.all(np.abs(prefix_counts - expected) <= len(sizes) / 2 + 1)
    for j, n in enumerate(sizes):
        seq = per_dataset[j]
        assert len(seq) == epochs * order.counts[j]
        for p in range(len(seq) // n):
            assert sorted(seq[p * n : (p + 1) * n]) == list(range(n))


def test_interleave_scales_without_materialising_the_epoch() -> None:
    order = GlobalOrder([Source(700_000_000, "a"), Source(300_000_000, "b")], seed=1, shuffle=True)
    src, rows = order.lookup(3, np.array([0, 1, 999_999_999, 123_456_789]))
    assert src.shape == rows.shape == (4,)
    assert all(0 <= r < (700_000_000 if s == 0 else 300_000_000) for s, r in zip(src, rows, strict=True))


# ---------------------------------------------------------------- partition across ranks and workers


def _loader_order(
    layout: BatchLayout,
    length: int,
    rank: int,
    num_workers: int,
    start_epoch: int,
    start: int,
    num_epochs: int,
):
    """The micro-batches in the order torch's DataLoader hands them to the trainer: round-robin over workers,
    skipping workers that are exhausted (num_workers=0 is the main process alone)."""
    k = max(1, num_workers)
    iters = [iter_micro_batches(length, layout, rank, start_epoch, start, num_epochs, w, k) for w in range(k)]
    out, alive = [], list(range(k))
    for w in itertools.cycle(range(k)):
        if not alive:
            break
        if w not in alive:
            continue
        mb = next(iters[w], None)
        if mb is None:
            alive.remove(w)
            continue
        out.append(mb)
    return out


layouts = st.builds(
    lambda world, micro, accum, rem: BatchLayout(world * micro * accum, micro, world, rem),
    st.integers(1, 8),
    st.integers(1, 3),
    st.integers(1, 3),
    st.sampled_from(["drop", "pad"]),
)


@FAST
@given(layout=layouts, length=st.integers(1, 200), workers=st.integers(0, 4), epoch=st.integers(0, 3))
def test_each_epoch_is_covered_exactly_once_across_ranks_and_workers(
    layout: BatchLayout, length: int, workers: int, epoch: int
) -> None:
    plan = plan_epoch(epoch, length, 0, layout)
    per_rank_batches = []
    seen: Counter[int] = Counter()
    padded = 0
    for rank in range(layout.world_size):
        mbs = _loader_order(layout, length, rank, workers, epoch, 0, epoch + 1)
        per_rank_batches.append(len(mbs))
        for mb in mbs:
            assert mb.epoch == epoch
            seen.update(mb.positions[~mb.is_padding].tolist())
            padded += int(mb.is_padding.sum())
            assert np.array_equal(mb.is_padding, mb.positions >= length)
    assert len(set(per_rank_batches)) == 1, "every rank must run the same number of steps"
    g = layout.global_batch_size
    if layout.remainder == "drop":
        kept = (length // g) * g
        assert plan.dropped == length - kept and plan.padded == 0
        assert seen == Counter(range(kept))
    else:
        assert seen == Counter(range(length))
        assert padded == plan.padded == plan.steps * g - length
    assert per_rank_batches[0] == plan.steps * layout.micro_batches_per_step


@FAST
@given(
    layout=layouts,
    length=st.integers(1, 120),
    workers=st.integers(0, 4),
    seed=st.integers(0, 10),
    stop_after=st.integers(0, 60),
)
def test_resume_from_any_step_reproduces_the_uninterrupted_sequence(
    layout: BatchLayout, length: int, workers: int, seed: int, stop_after: int
) -> None:
    order = GlobalOrder([Source(length, f"fp{seed}")], seed=seed)
    epochs = 3
    for rank in range(layout.world_size):
        full = _loader_order(layout, length, rank, workers, 0, 0, epochs)
        steps_done = [mb for mb in full if mb.last_in_step][:stop_after]
        if not steps_done:
            continue
        last = steps_done[-1]
        cut = full.index(last) + 1
        # the state the loader would save after that step: the epoch and rows consumed in it
        epoch, start = last.epoch, last.rows_after_step
        if start == length or plan_epoch(epoch, length, start, layout).steps == 0:
            epoch, start = epoch + 1, 0
        resumed = _loader_order(layout, length, rank, workers, epoch, start, epochs)

        def key(mb):
            return (
                mb.epoch,
                mb.positions.tolist(),
                order.lookup(mb.epoch, mb.positions % length)[1].tolist(),
            )

        assert [key(mb) for mb in resumed] == [key(mb) for mb in full[cut:]]


@FAST
@given(
    micro=st.integers(1, 2),
    world_a=st.sampled_from([1, 2, 4, 8]),
    world_b=st.sampled_from([1, 2, 4, 8]),
    length=st.integers(8, 200),
    steps_before=st.integers(0, 20),
    workers_a=st.integers(0, 4),
    workers_b=st.integers(0, 4),
    remainder=st.sampled_from(["drop", "pad"]),
)
def test_resume_at_another_world_size_with_same_global_batch_sees_each_row_once(
    micro: int,
    world_a: int,
    world_b: int,
    length: int,
    steps_before: int,
    workers_a: int,
    workers_b: int,
    remainder: str,
) -> None:
    g = 8 * micro  # divisible by every world size drawn
    a = BatchLayout(g, micro, world_a, remainder)  # type: ignore[arg-type]
    b = BatchLayout(g, micro, world_b, remainder)  # type: ignore[arg-type]
    plan = plan_epoch(0, length, 0, a)
    steps_before = min(steps_before, plan.steps)
    seen: Counter[int] = Counter()
    for rank in range(world_a):
        for mb in _loader_order(a, length, rank, workers_a, 0, 0, 1):
            if mb.step < steps_before:
                seen.update(mb.positions[~mb.is_padding].tolist())
    start = min(steps_before * g, length)
    for rank in range(world_b):
        for mb in _loader_order(b, length, rank, workers_b, 0, start, 1):
            assert mb.step >= steps_before
            seen.update(mb.positions[~mb.is_padding].tolist())
    expected = range(length) if remainder == "pad" else range(plan.steps * g)
    assert seen == Counter(expected)


def test_layout_rejects_splits_that_cannot_be_equal() -> None:
    with pytest.raises(ValueError, match="world_size"):
        BatchLayout(10, 1, 4)
    with pytest.raises(ValueError, match="micro_batch_size"):
        BatchLayout(12, 4, 2)
    with pytest.raises(ValueError, match="remainder"):
        BatchLayout(4, 1, 1, "wrap")  # type: ignore[arg-type]


def test_endless_iteration_refuses_an_epoch_shorter_than_a_global_batch() -> None:
    layout = BatchLayout(16, 2, 2, "drop")
    with pytest.raises(ValueError, match="shorter than one global batch"):
        next(iter_micro_batches(10, layout, 0, 0, 0, None))
