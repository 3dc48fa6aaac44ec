"""The global row order of one or several packed datasets, as a pure function of (fingerprints, seed, epoch).

Why a hand-written permutation instead of ``numpy.random``: the order must be bit-identical on every rank,
every worker, every platform and after upgrading numpy/torch, or a resumed run would silently re-read
some rows and skip others. numpy documents that its Generator streams may change between versions, and
torch's generators differ between CPU and CUDA builds. Here the order depends only on

* ``hashlib.blake2b`` (a fixed, standardised hash) to derive round keys from (fingerprint, seed, pass), and
* unsigned 64-bit integer arithmetic (xor, shifts, multiply modulo 2**64), which numpy defines identically
  on every platform,

so it is portable by construction. ``tests/test_data_order.py`` pins a few values to catch any change.

The permutation is an (unbalanced) Feistel network over the smallest power-of-2 domain >= n with cycle-walking
back into [0, n): a bijection on [0, n) that needs O(1) memory and gives O(1) random access to any position. Random
access is what makes resume and any world size trivial: a worker computes exactly the positions it owns,
starting anywhere, without materialising an n-sized array (RSS stays flat as the dataset grows).

Several datasets with mixing weights
------------------------------------
An *epoch* is ``samples_per_epoch`` draws (default: the sum of the dataset sizes). Dataset j gets exactly
``c_j`` of those draws, ``c_j`` being the weights apportioned by largest remainder. Each dataset is read as
an endless sequence of full passes (pass p is a fresh permutation keyed by (fingerprint_j, seed, p)), and
epoch e takes draws ``[e*c_j, (e+1)*c_j)`` from it. So an up-weighted dataset repeats rows only after a full
pass, and a down-weighted one continues where the previous epoch stopped instead of re-reading its first
rows. With one dataset (or weights equal to the sizes) an epoch is exactly one pass: every row once.
The draws are interleaved deterministically and smoothly: draw k of dataset j sits at "time"
(k + 1/2) / c_j and the epoch is the merge of all draws by time (ties by dataset index), so every window of
the epoch holds the datasets in proportion to their weights. ``shuffle=False`` keeps file order inside
each dataset (and the same smooth interleave).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

ORDER_VERSION = 1  # bump when the order for the same inputs changes; stored in loader state
FEISTEL_ROUNDS = 8
MAX_EPOCH_LENGTH = 1 << 30  # keeps the interleave's integer arithmetic inside int64 (2 * L * L < 2**63)

_S27, _S30, _S31 = np.uint64(27), np.uint64(30), np.uint64(31)
_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a well-studied 64-bit avalanche mix, used as the Feistel round function."""
    # Array (not scalar) uint64 arithmetic wraps modulo 2**64 silently, which is exactly what is wanted.
    z = z ^ (z >> _S30)
    z *= _C1
    z ^= z >> _S27
    z *= _C2
    z ^= z >> _S31
    return z


def round_keys(*parts: object, rounds: int = FEISTEL_ROUNDS) -> tuple[int, ...]:
    """Derive the Feistel round keys from the identity of a pass. The text form is canonical on purpose."""
    text = f"sftkit-order-v{ORDER_VERSION}|" + "|".join(str(p) for p in parts)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8 * rounds).digest()
    return tuple(int.from_bytes(digest[8 * i : 8 * i + 8], "little") for i in range(rounds))


@dataclass(frozen=True)
class FeistelPermutation:
    """A keyed bijection on [0, n) with O(1) memory and random access (see the module docstring)."""

    n: int
    keys: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"permutation size must be >= 0, got {self.n}")

    @property
    def _bits(self) -> int:
        return max(2, (self.n - 1).bit_length())

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        # An unbalanced Feistel network on B = ceil(log2 n) bits (so fewer than half the values fall outside
        # [0, n) and cycle-walking stays short): the halves have a and b bits and trade places every round.
        # Each round (L, R) -> (R, L ^ F(R)) is invertible whatever F is, so the whole is a bijection.
        lbits = self._bits // 2
        rbits = self._bits - lbits
        left = x >> np.uint64(rbits)
        right = x & np.uint64((1 << rbits) - 1)
        for key in self.keys:
            f = _mix64(right ^ np.uint64(key)) & np.uint64((1 << lbits) - 1)
            left, right = right, left ^ f
            lbits, rbits = rbits, lbits
        return (left << np.uint64(rbits)) | right

    def __call__(self, positions: np.ndarray | Sequence[int]) -> np.ndarray:
        """Map positions in [0, n) to their permuted rows (int64 array of the same shape)."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= self.n):
            raise IndexError(f"positions must lie in [0, {self.n})")
        if self.n <= 1:
            return pos.copy()
        x = pos.astype(np.uint64)
        out = self._encrypt(x)
        # Cycle-walking: re-encrypt values that fell outside [0, n). Because the cipher is a bijection on the
        # power-of-2 domain, following the cycle to the first in-range value is a bijection on [0, n).
        todo = np.nonzero(out >= np.uint64(self.n))[0]
        while todo.size:
            out[todo] = self._encrypt(out[todo])
            todo = todo[out[todo] >= np.uint64(self.n)]
        return out.astype(np.int64)


def apportion(total: int, weights: Sequence[float]) -> tuple[int, ...]:
    """Split `total` draws by `weights` exactly (largest remainder, ties to the lower index).

    Fractions, not floats, so the split cannot differ between platforms.
    """
    if not weights:
        raise ValueError("at least one weight is needed")
    fr = [Fraction(w) for w in weights]
    if any(w <= 0 for w in fr):
        raise ValueError(f"mixing weights must be > 0, got {list(weights)}")
    s = sum(fr)
    exact = [total * w / s for w in fr]
    base = [int(e) for e in exact]
    left = total - sum(base)
    order = sorted(range(len(fr)), key=lambda j: (-(exact[j] - base[j]), j))
    for j in order[:left]:
        base[j] += 1
    return tuple(base)


@dataclass(frozen=True)
class Source:
    """What the order needs to know about one dataset: its size and content fingerprint."""

    num_rows: int
    fingerprint: str


class GlobalOrder:
    """Global position in an epoch -> (dataset index, row), for every epoch, computed locally anywhere."""

    def __init__(
        self,
        sources: Sequence[Source],
        seed: int,
        shuffle: bool = True,
        weights: Sequence[float] | None = None,
        samples_per_epoch: int | None = None,
    ) -> None:
        if not sources:
            raise ValueError("at least one dataset is needed")
        for j, src in enumerate(sources):
            if src.num_rows <= 0:
                raise ValueError(f"dataset {j} ({src.fingerprint}) has no rows")
        if weights is not None and len(weights) != len(sources):
            raise ValueError(f"{len(weights)} weights given for {len(sources)} datasets")
        self.sources = tuple(sources)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        sizes = [s.num_rows for s in sources]
        length = sum(sizes) if samples_per_epoch is None else int(samples_per_epoch)
        if length <= 0:
            raise ValueError(f"samples_per_epoch must be > 0, got {length}")
        if length > MAX_EPOCH_LENGTH:
            raise ValueError(f"an epoch of {length} samples exceeds the supported {MAX_EPOCH_LENGTH}")
        self.epoch_length = length
        self.counts = apportion(length, sizes if weights is None else weights)
        self._starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    def lookup(self, epoch: int, positions: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Rows at `positions` (each in [0, epoch_length)) of `epoch`: (dataset index, row), both int64."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= self.epoch_length):
            raise IndexError(f"positions must lie in [0, {self.epoch_length})")
        if len(self.sources) == 1:
            src_idx, draw = np.zeros_like(pos), pos
        else:
            src_idx, draw = self._interleave(pos)
        rows = np.empty_like(pos)
        for j in np.unique(src_idx):
            sel = src_idx == j
            rows[sel] = self._rows_of(int(j), epoch, draw[sel])
        return src_idx, rows

    def _rows_of(self, j: int, epoch: int, draw: np.ndarray) -> np.ndarray:
        """Draw k of dataset j in `epoch` -> row, walking that dataset's endless sequence of passes."""
        n = self.sources[j].num_rows
        global_draw = np.int64(epoch) * np.int64(self.counts[j]) + draw
        passes, offset = np.divmod(global_draw, n)
        if not self.shuffle:
            return offset
        out = np.empty_like(offset)
        for p in np.unique(passes):
            sel = passes == p
            perm = FeistelPermutation(n, round_keys(self.sources[j].fingerprint, self.seed, int(p)))
            out[sel] = perm(offset[sel])
        return out

    def _count_upto(self, t: np.ndarray) -> np.ndarray:
        """Per dataset, how many draws have integer time key <= t; shape [len(t), J].

        Draw k of dataset j has key floor((2k+1) * L / (2 c_j)); key <= t  <=>  (2k+1) * L < 2 c_j (t+1).
        """
        c = np.asarray(self.counts, dtype=np.int64)[None, :]
        a = 2 * c * (t[:, None] + 1)
        n_odd = ((a - 1) // self.epoch_length + 1) // 2
        return np.clip(n_odd, 0, c)

    def _interleave(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Invert the smooth merge: position m -> (dataset j, draw k), by binary search on the time key."""
        lo = np.full(pos.shape, -1, dtype=np.int64)  # count(<= lo) <= m
        hi = np.full(pos.shape, self.epoch_length - 1, dtype=np.int64)  # count(<= hi) == L > m
        flat_lo, flat_hi, flat_pos = lo.reshape(-1), hi.reshape(-1), pos.reshape(-1)
        while True:
            active = flat_hi - flat_lo > 1
            if not active.any():
                break
            mid = (flat_lo + flat_hi) // 2
            le = self._count_upto(mid).sum(axis=1) > flat_pos
            flat_hi = np.where(active & le, mid, flat_hi)
            flat_lo = np.where(active & ~le, mid, flat_lo)
        t = flat_hi
        before = self._count_upto(t - 1)
        at = self._count_upto(t) - before  # 0/1 per dataset: who has a draw exactly at key t
        rank = flat_pos - before.sum(axis=1)  # which of the tied draws (ordered by dataset index)
        cum = np.cumsum(at, axis=1)
        j = np.argmax(cum > rank[:, None], axis=1)
        k = before[np.arange(len(j)), j]
        return j.reshape(pos.shape).astype(np.int64), k.reshape(pos.shape).astype(np.int64)
