"""Greedy bin packing of sequence lengths into rows of seq_length, compiled with Numba.

Both decreasing heuristics run in O(n log n) without Python per-item work:
- sizes are ordered by a counting sort (lengths are small integers <= capacity), O(n + capacity);
- first-fit-decreasing keeps a max segment tree over the bins' free space: the leftmost bin with room for an
  item is one tree descent. All leaves start at `capacity`, so "no open bin fits" lands on the next unused
  leaf -- opening a bin needs no special case;
- best-fit-decreasing keeps one stack of bins per free-space value and a max tree over the free-space values
  where leaf r holds r while its stack is non-empty (else -1). The leftmost leaf >= s is then the smallest free
  space that still fits s, i.e. the best fit, found by the same descent over a tree of only capacity+1 leaves.

The result is a CSR layout (bin offsets + item indices), not Python lists. Items are shuffled with a seed before
packing (that and the optional window decide which items may share a row), and the bins are shuffled afterwards
so rows are not sorted by length. Same inputs and seed -> same packing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np
from numba import njit

Algorithm = Literal["ffd", "bfd", "none"]
ALGORITHMS: tuple[str, ...] = Algorithm.__args__  # type: ignore[attr-defined]
_ALGO_CODE = {"ffd": 0, "bfd": 1, "none": 2}


@dataclasses.dataclass(frozen=True)
class Packing:
    """Bin b holds items `items[bin_offsets[b]:bin_offsets[b+1]]` (indices into the packed lengths array)."""

    bin_offsets: np.ndarray  # int64 [num_bins + 1]
    items: np.ndarray  # int64 [n]
    capacity: int
    algorithm: str

    @property
    def num_bins(self) -> int:
        return len(self.bin_offsets) - 1

    def bin(self, b: int) -> np.ndarray:
        return self.items[self.bin_offsets[b] : self.bin_offsets[b + 1]]


@njit(cache=True)
def _sort_desc(lengths, items, capacity):
    """items ordered by lengths[item] descending, ties kept in input order (counting sort)."""
    count = np.zeros(capacity + 2, dtype=np.int64)
    for i in range(items.shape[0]):
        count[capacity - lengths[items[i]]] += 1
    start = 0
    for v in range(capacity + 2):
        c = count[v]
        count[v] = start
        start += c
    out = np.empty_like(items)
    for i in range(items.shape[0]):
        key = capacity - lengths[items[i]]
        out[count[key]] = items[i]
        count[key] += 1
    return out


@njit(cache=True)
def _tree_set(tree, leaves, pos, value):
    node = leaves + pos
    tree[node] = value
    node >>= 1
    while node >= 1:
        a = tree[2 * node]
        b = tree[2 * node + 1]
        m = a if a > b else b
        if tree[node] == m:
            break
        tree[node] = m
        node >>= 1


@njit(cache=True)
def _tree_leftmost_at_least(tree, leaves, s):
    """Index of the leftmost leaf whose value >= s; the caller guarantees the root is >= s."""
    node = 1
    while node < leaves:
        node = 2 * node
        if tree[node] < s:
            node += 1
    return node - leaves


@njit(cache=True)
def _ffd(sizes, capacity, max_per_bin, max_bins, out_bin):
    leaves = 1
    while leaves < max_bins:
        leaves *= 2
    tree = np.full(2 * leaves, capacity, dtype=np.int64)
    count = np.zeros(leaves, dtype=np.int64)
    used = 0
    for k in range(sizes.shape[0]):
        s = sizes[k]
        b = _tree_leftmost_at_least(tree, leaves, s)
        out_bin[k] = b
        if b >= used:
            used = b + 1
        count[b] += 1
        free = tree[leaves + b] - s
        if max_per_bin > 0 and count[b] >= max_per_bin:
            free = -1  # closed: no further item may enter
        _tree_set(tree, leaves, b, free)
    return used


@njit(cache=True)
def _bfd(sizes, capacity, max_per_bin, max_bins, out_bin):
    leaves = 1
    while leaves < capacity + 1:
        leaves *= 2
    tree = np.full(2 * leaves, -1, dtype=np.int64)
    _tree_set(tree, leaves, capacity, capacity)  # "a fresh bin" is always available at free space == capacity
    head = np.full(capacity + 1, -1, dtype=np.int64)
    nxt = np.empty(max_bins, dtype=np.int64)
    count = np.zeros(max_bins, dtype=np.int64)
    used = 0
    for k in range(sizes.shape[0]):
        s = sizes[k]
        r = _tree_leftmost_at_least(tree, leaves, s)
        if r == capacity:
            b = used
            used += 1
        else:
            b = head[r]
            head[r] = nxt[b]
            if head[r] < 0:
                _tree_set(tree, leaves, r, -1)
        out_bin[k] = b
        count[b] += 1
        rest = r - s
        if rest > 0 and not (max_per_bin > 0 and count[b] >= max_per_bin):
            nxt[b] = head[rest]
            if head[rest] < 0:
                _tree_set(tree, leaves, rest, rest)
            head[rest] = b
    return used


@njit(cache=True)
def _pack_windows(lengths, perm, window, capacity, algo, max_per_bin):
    """Pack each window of `perm` separately. Returns (placed items in placement order, their bin ids, bins)."""
    n = perm.shape[0]
    placed = np.empty(n, dtype=np.int64)
    bin_of = np.empty(n, dtype=np.int64)
    total_bins = 0
    for w0 in range(0, n, window):
        w1 = min(w0 + window, n)
        items = perm[w0:w1]
        if algo == 2:
            for k in range(w1 - w0):
                placed[w0 + k] = items[k]
                bin_of[w0 + k] = total_bins + k
            total_bins += w1 - w0
            continue
        order = _sort_desc(lengths, items, capacity)
        sizes = np.empty(w1 - w0, dtype=np.int64)
        total = 0
        for k in range(w1 - w0):
            sizes[k] = lengths[order[k]]
            total += sizes[k]
        # Greedy fits leave at most one bin at most half full among bins not closed by the count cap.
        bound = 2 * ((total + capacity - 1) // capacity) + 2
        if max_per_bin > 0:
            bound += (w1 - w0) // max_per_bin
        if bound > w1 - w0:
            bound = w1 - w0
        out = np.empty(w1 - w0, dtype=np.int64)
        if algo == 0:
            used = _ffd(sizes, capacity, max_per_bin, bound, out)
        else:
            used = _bfd(sizes, capacity, max_per_bin, bound, out)
        for k in range(w1 - w0):
            placed[w0 + k] = order[k]
            bin_of[w0 + k] = total_bins + out[k]
        total_bins += used
    return placed, bin_of, total_bins


@njit(cache=True)
def _to_csr(placed, bin_of, rank, num_bins):
    """Group placed items by rank[bin] (the shuffled bin order), keeping placement order inside a bin."""
    offsets = np.zeros(num_bins + 1, dtype=np.int64)
    for k in range(placed.shape[0]):
        offsets[rank[bin_of[k]] + 1] += 1
    for b in range(num_bins):
        offsets[b + 1] += offsets[b]
    fill = offsets[:-1].copy()
    items = np.empty_like(placed)
    for k in range(placed.shape[0]):
        r = rank[bin_of[k]]
        items[fill[r]] = placed[k]
        fill[r] += 1
    return offsets, items


def lower_bound(lengths: np.ndarray, capacity: int) -> int:
    """No packing can use fewer bins than ceil(total tokens / capacity)."""
    return math.ceil(int(np.asarray(lengths, dtype=np.int64).sum()) / capacity)


def pack_lengths(
    lengths: np.ndarray,
    capacity: int,
    algorithm: str = "bfd",
    *,
    window: int | None = None,
    max_per_bin: int | None = None,
    seed: int = 0,
    shuffle_bins: bool = True,
) -> Packing:
    """Pack items of the given lengths (each 1..capacity) into bins of `capacity`.

    `window`: pack consecutive windows of this many items (after the seeded shuffle) independently, which
    bounds how far apart in the input two documents sharing a row can be; None packs everything at once.
    `max_per_bin`: cap on items per bin (None: no cap).
    """
    if algorithm not in _ALGO_CODE:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if capacity <= 0:
        raise ValueError("capacity must be positive")
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError("lengths must be a 1-D array")
    n = lengths.shape[0]
    if n and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(
            f"every length must be in [1, {capacity}]; got min {lengths.min()}, max {lengths.max()}"
        )
    if window is not None and window < 1:
        raise ValueError("window must be >= 1")
    if max_per_bin is not None and max_per_bin < 1:
        raise ValueError("max_per_bin must be >= 1")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n).astype(np.int64)
    placed, bin_of, num_bins = _pack_windows(
        lengths, perm, int(window or max(n, 1)), int(capacity), _ALGO_CODE[algorithm], int(max_per_bin or 0)
    )
    num_bins = int(num_bins)
    rank = rng.permutation(num_bins).astype(np.int64) if shuffle_bins else np.arange(num_bins, dtype=np.int64)
    offsets, items = _to_csr(placed, bin_of, rank, num_bins)
    return Packing(bin_offsets=offsets, items=items, capacity=int(capacity), algorithm=algorithm)


def packing_stats(lengths: np.ndarray, packing: Packing) -> dict:
    """Numbers a user compares: rows used vs the lower bound, and the fraction of slots holding real tokens."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    bins = packing.num_bins
    bound = lower_bound(lengths, packing.capacity)
    per_bin = np.diff(packing.bin_offsets)
    return {
        "algorithm": packing.algorithm,
        "rows": bins,
        "lower_bound_rows": bound,
        "rows_over_bound": (bins / bound - 1.0) if bound else 0.0,
        "tokens": total,
        "slots": bins * packing.capacity,
        "efficiency": total / (bins * packing.capacity) if bins else 1.0,
        "docs_per_row_mean": float(per_bin.mean()) if bins else 0.0,
        "docs_per_row_max": int(per_bin.max()) if bins else 0,
    }
