"""The Numba packer: a valid packing always, identical to a plain-Python first fit, deterministic per seed,
and near the lower bound on the real Alpaca-GPT4 length distribution."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataprep.packing import lower_bound, pack_lengths, packing_stats


def check_valid(lengths: np.ndarray, packing, capacity: int, max_per_bin: int | None = None) -> None:
    items = np.sort(packing.items)
    np.testing.assert_array_equal(items, np.arange(len(lengths)))  # every item in exactly one bin
    assert packing.bin_offsets[0] == 0 and packing.bin_offsets[-1] == len(lengths)
    per_bin = np.diff(packing.bin_offsets)
    assert np.all(per_bin >= 1)
    loads = np.add.reduceat(lengths[packing.items], packing.bin_offsets[:-1]) if len(lengths) else []
    assert np.all(np.asarray(loads) <= capacity)
    if max_per_bin and len(lengths):
        assert per_bin.max() <= max_per_bin


def reference_first_fit(sizes: list[int], capacity: int) -> list[int]:
    free: list[int] = []
    out = []
    for s in sizes:
        for b, f in enumerate(free):
            if f >= s:
                free[b] -= s
                out.append(b)
                break
        else:
            free.append(capacity - s)
            out.append(len(free) - 1)
    return out


def reference_best_fit_loads(sizes: list[int], capacity: int) -> list[int]:
    free: list[int] = []
    for s in sizes:
        fits = [b for b, f in enumerate(free) if f >= s]
        if fits:
            b = min(fits, key=lambda b: free[b])
            free[b] -= s
        else:
            free.append(capacity - s)
    return sorted(capacity - f for f in free)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 64), min_size=0, max_size=300),
    st.sampled_from(["ffd", "bfd", "none"]),
    st.one_of(st.none(), st.integers(1, 50)),
    st.one_of(st.none(), st.integers(1, 6)),
    st.integers(0, 3),
)
def test_every_packing_is_valid(lengths, algorithm, window, max_per_bin, seed):
    lengths = np.array(lengths, dtype=np.int64)
    packing = pack_lengths(lengths, 64, algorithm, window=window, max_per_bin=max_per_bin, seed=seed)
    check_valid(lengths, packing, 64, max_per_bin)
    if algorithm == "none":
        assert packing.num_bins == len(lengths)
    elif max_per_bin is None and window is None and len(lengths):
        assert packing.num_bins >= lower_bound(lengths, 64)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 100), min_size=1, max_size=200), st.integers(0, 5))
def test_ffd_matches_plain_python_first_fit_decreasing(lengths, seed):
    lengths = np.array(lengths, dtype=np.int64)
    ours = pack_lengths(lengths, 100, "ffd", seed=seed, shuffle_bins=False)
    # Same order as ours: the seeded shuffle, then a stable sort by length descending.
    perm = np.random.default_rng(seed).permutation(len(lengths))
    order = perm[np.argsort(-lengths[perm], kind="stable")]
    bins = reference_first_fit(lengths[order].tolist(), 100)
    expected = [[int(order[k]) for k in range(len(order)) if bins[k] == b] for b in range(max(bins) + 1)]
    assert [ours.bin(b).tolist() for b in range(ours.num_bins)] == expected


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 100), min_size=1, max_size=200))
def test_bfd_matches_plain_python_best_fit_decreasing(lengths):
    """Ties between equally full bins may break differently, but the bin loads must be the same multiset."""
    lengths = np.array(lengths, dtype=np.int64)
    ours = pack_lengths(lengths, 100, "bfd")
    loads = sorted(int(lengths[ours.bin(b)].sum()) for b in range(ours.num_bins))
    assert loads == reference_best_fit_loads(sorted(lengths.tolist(), reverse=True), 100)


def test_deterministic_per_seed_and_bins_are_shuffled():
    lengths = np.random.default_rng(0).integers(1, 2000, size=5000)
    a = pack_lengths(lengths, 2048, "bfd", seed=3)
    b = pack_lengths(lengths, 2048, "bfd", seed=3)
    c = pack_lengths(lengths, 2048, "bfd", seed=4)
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_array_equal(a.bin_offsets, b.bin_offsets)
    assert not np.array_equal(a.items, c.items)
    # Decreasing heuristics fill the big items first; shuffling bins keeps rows from being sorted by length.
    first_len = lengths[a.items[a.bin_offsets[:-1]]]
    assert abs(np.corrcoef(np.arange(len(first_len)), first_len)[0, 1]) < 0.1
    unshuffled = pack_lengths(lengths, 2048, "bfd", seed=3, shuffle_bins=False)
    assert np.all(np.diff(lengths[unshuffled.items[unshuffled.bin_offsets[:-1]]]) <= 0)


def test_window_keeps_items_of_a_bin_within_one_window():
    lengths = np.random.default_rng(1).integers(1, 500, size=1000)
    packing = pack_lengths(lengths, 1024, "ffd", window=100, seed=7)
    perm = np.random.default_rng(7).permutation(len(lengths))
    window_of = np.empty(len(lengths), dtype=np.int64)
    window_of[perm] = np.arange(len(lengths)) // 100
    for b in range(packing.num_bins):
        assert len(set(window_of[packing.bin(b)].tolist())) == 1


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        pack_lengths(np.array([3, 9]), 8)
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        pack_lengths(np.array([0, 3]), 8)
    with pytest.raises(ValueError, match="algorithm"):
        pack_lengths(np.array([3]), 8, "nfd")


@pytest.fixture(scope="module")
def alpaca_gpt4_lengths(shared_data) -> np.ndarray:
    """Token lengths of the real Alpaca-GPT4 sample under the Qwen2.5 ChatML template."""
    from dataprep.convert import ConvertOptions, ConvertStats, iter_conversations
    from dataprep.tokenize import TokenizeOptions, TokenizeStats, tokenize_conversations
    from dataprep.tokenizer import load_tokenizer

    tok = load_tokenizer(shared_data / "tokenizers" / "qwen2_5")
    records = iter_conversations(
        [str(shared_data / "alpaca" / "alpaca_gpt4_en_demo_1k.json")], ConvertOptions(), ConvertStats()
    )
    samples = tokenize_conversations(records, tok, TokenizeOptions(template="chatml"), TokenizeStats())
    lengths = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
    assert len(lengths) == 999
    return lengths


@pytest.mark.parametrize("algorithm", ["ffd", "bfd"])
@pytest.mark.parametrize("seq_length", [4096, 2048])
def test_real_alpaca_gpt4_within_one_percent_of_bound(alpaca_gpt4_lengths, algorithm, seq_length):
    packing = pack_lengths(alpaca_gpt4_lengths, seq_length, algorithm)
    check_valid(alpaca_gpt4_lengths, packing, seq_length)
    stats = packing_stats(alpaca_gpt4_lengths, packing)
    assert stats["rows"] <= 1.01 * stats["lower_bound_rows"], stats


@pytest.mark.parametrize("algorithm", ["ffd", "bfd"])
@pytest.mark.parametrize("seq_length", [4096, 2048])
def test_resampled_alpaca_gpt4_50k_within_one_percent_of_bound(alpaca_gpt4_lengths, algorithm, seq_length):
    """999 records give a bound of ~100 rows, where 1% is under one row; 50k resampled lengths make it bite."""
    lengths = np.random.default_rng(0).choice(alpaca_gpt4_lengths, size=50_000)
    packing = pack_lengths(lengths, seq_length, algorithm, seed=1)
    check_valid(lengths, packing, seq_length)
    stats = packing_stats(lengths, packing)
    assert stats["lower_bound_rows"] > 2000
    assert stats["rows"] <= 1.01 * stats["lower_bound_rows"], stats
    none = packing_stats(lengths, pack_lengths(lengths, seq_length, "none"))
    assert none["rows"] == 50_000 and none["efficiency"] < stats["efficiency"]
