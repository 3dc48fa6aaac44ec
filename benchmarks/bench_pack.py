"""Packing speed and quality: our Numba FFD/BFD against TRL's `pack_dataset(strategy="bfd")` on the same lengths.

Lengths are drawn (with replacement, seeded) from the real Alpaca-GPT4 sample tokenized once with the Qwen2.5
tokenizer through our own template + tokenize stage, so the distribution is the one `dataprep pack` sees.

The peer: TRL is not a project dependency. The script installs the TRL wheel (no deps; transformers and datasets
come from the project venv) into benchmarks/_work/trl-pkgs and calls its public `pack_dataset` on a
`datasets.Dataset` whose `input_ids` rows have exactly these lengths. Two settings:
- `map_kwargs={"batch_size": n}`: one BFD over all n sequences, the same problem ours solves (bins comparable);
- TRL's default map batch size (1000): what a user gets by default; it packs each 1000 sequences separately.
TRL's times are end to end (they include Arrow moving the token lists; our timing is lengths -> bins only, the
token gather is a separate stage of ours). If TRL cannot be installed or imported, a pure-Python
re-implementation of its algorithm (sort descending; segment tree over free-space values; FIFO of bins per free
space) is used instead and labelled as such in the table.

Usage: python benchmarks/bench_pack.py [--quick] [--sizes 1000000,10000000] [--seq-length 4096] [--trl-max N]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import subprocess
import sys
import time
from collections import defaultdict, deque
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = REPO / "benchmarks" / "_work"
TRL_DIR = WORK / "trl-pkgs"
SHARED = REPO.parent / "shared" / "data"

from dataprep.packing import lower_bound, pack_lengths  # noqa: E402


def alpaca_lengths(data: Path, tokenizer: Path) -> np.ndarray:
    cache = WORK / f"lengths-{data.stem}-{tokenizer.name}.npy"
    if cache.is_file():
        return np.load(cache)
    from dataprep.convert import ConvertOptions, ConvertStats, iter_conversations
    from dataprep.tokenize import TokenizeOptions, TokenizeStats, tokenize_conversations
    from dataprep.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    records = iter_conversations([str(data)], ConvertOptions(), ConvertStats())
    lengths = np.array(
        [len(s.input_ids) for s in tokenize_conversations(records, tok, TokenizeOptions(), TokenizeStats())],
        dtype=np.int64,
    )
    WORK.mkdir(parents=True, exist_ok=True)
    np.save(cache, lengths)
    return lengths


def load_trl():
    """TRL's pack_dataset from a private --target install, or None when it cannot be had."""
    if str(TRL_DIR) not in sys.path:
        sys.path.insert(0, str(TRL_DIR))
    try:
        return importlib.import_module("trl").pack_dataset
    except ImportError:
        pass
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(TRL_DIR), "trl"]
    if subprocess.run(cmd, check=False).returncode != 0:
        return None
    importlib.invalidate_caches()
    try:
        return importlib.import_module("trl").pack_dataset
    except ImportError as exc:
        print(f"TRL import failed ({exc}); using the re-implementation", file=sys.stderr)
        return None


def trl_dataset(lengths: np.ndarray):
    import datasets
    import pyarrow as pa

    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = pa.array(np.zeros(int(offsets[-1]), dtype=np.int32))
    column = pa.LargeListArray.from_arrays(pa.array(offsets), values)
    return datasets.Dataset(pa.table({"input_ids": column}))


def run_trl(pack_dataset, lengths: np.ndarray, seq_length: int, batch_size: int | None) -> tuple[float, int]:
    import datasets

    datasets.disable_progress_bars()
    ds = trl_dataset(lengths)
    kwargs = {"map_kwargs": {"batch_size": batch_size}} if batch_size else {}
    t = time.perf_counter()
    packed = pack_dataset(ds, seq_length, strategy="bfd", **kwargs)
    dt = time.perf_counter() - t
    return dt, len(packed)


class _SpaceTree:
    """Max segment tree over free-space values 1..capacity (the structure TRL's BFD uses), in plain Python."""

    def __init__(self, capacity: int) -> None:
        self.size = 1 << math.ceil(math.log2(capacity + 1))
        self.tree = [0] * (2 * self.size)

    def set(self, value: int, present: bool) -> None:
        i = self.size + value
        self.tree[i] = value if present else 0
        i //= 2
        while i:
            self.tree[i] = max(self.tree[2 * i], self.tree[2 * i + 1])
            i //= 2

    def smallest_at_least(self, s: int) -> int:
        i = 1
        while i < self.size:
            i = 2 * i if self.tree[2 * i] >= s else 2 * i + 1
        return self.tree[i]


def run_trl_reimplementation(lengths: np.ndarray, seq_length: int) -> tuple[float, int]:
    t = time.perf_counter()
    order = np.argsort(-lengths, kind="stable")
    tree = _SpaceTree(seq_length)
    tree.set(seq_length, True)
    by_space: dict[int, deque] = defaultdict(deque)
    bins: list[list[int]] = []
    for idx, length in zip(order.tolist(), lengths[order].tolist(), strict=True):
        space = tree.smallest_at_least(length)
        if space < seq_length:
            b = by_space[space].popleft()
            if not by_space[space]:
                tree.set(space, False)
        else:
            b = len(bins)
            bins.append([])
        bins[b].append(idx)
        space -= length
        if space > 0:
            by_space[space].append(b)
            tree.set(space, True)
    return time.perf_counter() - t, len(bins)


def time_ours(lengths: np.ndarray, seq_length: int, algorithm: str, repeats: int) -> tuple[float, int]:
    pack_lengths(lengths[:1000], seq_length, algorithm)  # JIT warm-up (loads the on-disk cache or compiles)
    best, bins = float("inf"), 0
    for _ in range(repeats):
        t = time.perf_counter()
        packing = pack_lengths(lengths, seq_length, algorithm, seed=0)
        best = min(best, time.perf_counter() - t)
        bins = packing.num_bins
    return best, bins


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes (100k lengths) to check the script works"
    )
    ap.add_argument("--sizes", default="1000000,10000000", help="comma-separated numbers of lengths")
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument(
        "--trl-max",
        type=int,
        default=1_000_000,
        help="largest size TRL runs on (it holds the tokens in memory)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="best of N for ours")
    ap.add_argument("--data", type=Path, default=SHARED / "alpaca" / "alpaca_gpt4_en_demo_1k.json")
    ap.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "qwen2_5")
    args = ap.parse_args()
    sizes = [100_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    S = args.seq_length

    base = alpaca_lengths(args.data, args.tokenizer)
    base = base[base <= S]
    trl_pack = load_trl()
    peer = "TRL pack_dataset(bfd)" if trl_pack else "TRL-bfd RE-IMPLEMENTATION (TRL not available)"
    rows, results = [], []
    for n in sizes:
        lengths = np.random.default_rng(0).choice(base, size=n)
        bound = lower_bound(lengths, S)
        entry = {"n": n, "seq_length": S, "lower_bound": bound}
        measured = {}
        for algo in ("ffd", "bfd"):
            measured[f"ours_{algo}"] = time_ours(lengths, S, algo, args.repeats)
        if n <= args.trl_max:
            if trl_pack:
                measured["trl_bfd_one_batch"] = run_trl(trl_pack, lengths, S, batch_size=n)
                measured["trl_bfd_default_map"] = run_trl(trl_pack, lengths, S, batch_size=None)
            # Always also time the algorithm alone on lengths, so the ratio is not only Arrow moving tokens.
            measured["trl_bfd_reimpl"] = run_trl_reimplementation(lengths, S)
        peer_key = next((k for k in measured if k.startswith("trl")), None)
        peer_time = measured[peer_key][0] if peer_key else None
        for key, (dt, bins) in measured.items():
            label = {
                "ours_ffd": "ours FFD (Numba)",
                "ours_bfd": "ours BFD (Numba)",
                "trl_bfd_one_batch": f"{peer}, one map batch",
                "trl_bfd_default_map": f"{peer}, default map (1000/batch)",
                "trl_bfd_reimpl": "TRL's BFD algorithm re-implemented in pure Python (lengths only)",
            }[key]
            speedup = f"{peer_time / dt:,.1f}x" if peer_time and key.startswith("ours") else "-"
            rows.append(
                f"| {n:,} | {label} | {dt:.3f} | {bins:,} | {bound:,} | {100 * (bins / bound - 1):.3f}% | {speedup} |"
            )
            entry[key] = {
                "seconds": round(dt, 4),
                "bins": bins,
                "over_bound_pct": round(100 * (bins / bound - 1), 4),
            }
        if peer_time:
            entry["speedup_bfd_vs_peer"] = round(peer_time / measured["ours_bfd"][0], 1)
            reimpl = measured["trl_bfd_reimpl"][0]
            entry["speedup_bfd_vs_reimpl_algorithm_only"] = round(reimpl / measured["ours_bfd"][0], 1)
        results.append(entry)
        if n > args.trl_max:
            rows.append(f"| {n:,} | {peer} | not run (n > --trl-max {args.trl_max:,}) | | | | |")

    print(
        f"\nPacking {', '.join(f'{n:,}' for n in sizes)} lengths resampled from {args.data.name} ({len(base)} samples, "
        f"mean {base.mean():.0f} tokens) at seq_length {S}{'  [--quick]' if args.quick else ''}\n"
    )
    print("| lengths | method | seconds | bins | lower bound | over bound | speedup vs peer |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(
        f"\nours: best of {args.repeats} after JIT warm-up. TRL rows: one run of the real pack_dataset, end to end"
        " (includes Arrow moving the token lists); speedup is against its first row. The re-implementation row"
        " times the same algorithm on lengths only."
    )
    print(
        "BENCH_JSON " + json.dumps({"bench": "pack", "quick": args.quick, "peer": peer, "results": results})
    )


if __name__ == "__main__":
    main()
