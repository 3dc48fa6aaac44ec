"""Training-data loading side by side: our PackedIterableDataset vs Hugging Face `datasets` vs MosaicML `streaming`.

    python benchmarks/bench_loader.py            # 10k and 100k rows of 4096 tokens, workers 0/2/4
    python benchmarks/bench_loader.py --quick    # tiny sizes, checks the script runs

All three read the same rows (ours are written first, then copied row for row into an HF Arrow file and MDS
shards) in a shuffled order and hand the trainer the same batch (``trainer.collate.collate_packed``: tokens,
labels, per-document position_ids, cu_seqlens), so the numbers compare loaders, not batch contents. That
collate builds each batch as one memory block, so with workers every loader pays the same single
shared-memory hand-over per batch; what differs is the cost of finding and reading the rows.
HF reads through ``Dataset.from_file(...).with_format("torch")`` + a shuffled DataLoader; streaming through
``StreamingDataset(local=..., shuffle=True)``.

Each (loader, rows, workers) runs in its own process so peak memory is its own: we sample the RSS of the
process tree (main + workers) and its anonymous part (RssAnon: heap, not page cache) every 20 ms. Sum-RSS
counts the shared memory-mapped pages once per worker, so "anon" is the number that shows whether a loader
holds the dataset in memory. The page cache is hot for every loader (data just written), so this measures
CPU cost of the read path, not disk.

Sizes: the issue asks for 10k -> 1M rows, but 1M rows of 4096 int32 tokens + labels is 32 GB per copy and
three copies (ours, Arrow, MDS) do not fit this machine's disk budget; the throughput table uses 10k and 100k
(3.2 GB per copy; ``--rows`` takes any sizes). Memory growth depends on the number of rows (and record
batches), not their length, so a second table reads whole epochs of 10k, 100k and 1M rows of 256 tokens
with no workers (``--rss-rows``, ``--rss-seq-length``; MosaicML streaming is left out there: a 1M-row epoch
at its speed takes ten minutes).

`streaming` is not a project dependency: it is pip-installed (``--no-deps``, with its few import-time deps)
into benchmarks/_work/streaming-pkgs, git-ignored. It imports torchvision only for its image datasets, and
the torchvision wheels on PyPI do not load against our CPU torch build, so a two-line stub module stands in
for it (we use only MDSWriter/StreamingDataset). If the install fails, that column is skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORK = REPO / "benchmarks" / "_work" / "loader"
STREAMING_PKGS = REPO / "benchmarks" / "_work" / "streaming-pkgs"
STREAMING_STUBS = REPO / "benchmarks" / "_work" / "streaming-stubs"
STREAMING_REQS = [
    "mosaicml-streaming==0.13.0",
    "Brotli",
    "python-snappy",
    "cramjam",
    "zstd",
    "catalogue",
    "pillow",
]
SEED = 0


# ------------------------------------------------------------------------------------------------ data
def make_rows(n: int, seq: int, chunk: int, seed: int):
    """Deterministic rows: 1-4 documents of random length per row, random tokens, ~half the labels trained."""
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        rng = np.random.default_rng([seed, start])
        ids = rng.integers(3, 32000, size=(k, seq), dtype=np.int32)
        labels = np.where(rng.random((k, seq)) < 0.5, -100, np.roll(ids, -1, axis=1)).astype(np.int32)
        n_docs = rng.integers(1, 5, size=k)
        lengths, counts = [], []
        for r in range(k):
            cuts = np.sort(rng.choice(np.arange(1, seq), size=n_docs[r], replace=False))
            docs = np.diff(np.concatenate([[0], cuts])).astype(np.int32)  # leaves a padding tail
            ids[r, cuts[-1] :] = 0
            labels[r, cuts[-1] :] = -100
            labels[r, cuts - 1] = -100
            lengths.append(docs)
            counts.append(len(docs))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        yield ids, labels, np.concatenate(lengths), offsets


def write_ours(path: Path, n: int, seq: int) -> None:
    from formats.writer import DatasetWriter

    with DatasetWriter(path, seq_length=seq, pad_id=0, overwrite=True) as w:
        for ids, labels, lengths, offsets in make_rows(n, seq, 512, SEED):
            w.write_rows(ids, labels, lengths, offsets, [f"d{i}" for i in range(int(offsets[-1]))])
        w.finish(tokenizer={"fingerprint": "bench"})


def write_hf(ours: Path, path: Path) -> None:
    """Copy our rows into one Arrow stream file that `datasets.Dataset.from_file` memory-maps."""
    import pyarrow as pa

    from formats.reader import open_dataset

    ds = open_dataset(ours)
    seq = ds.seq_length
    schema = pa.schema(
        [
            pa.field("input_ids", pa.list_(pa.int32(), seq)),
            pa.field("labels", pa.list_(pa.int32(), seq)),
            pa.field("doc_lengths", pa.list_(pa.int32())),
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, len(ds), 512):
            stop = min(start + 512, len(ds))
            ids, labels = ds.take(np.arange(start, stop))
            lengths = [ds.row(i).doc_lengths for i in range(start, stop)]
            writer.write_batch(
                pa.record_batch(
                    [
                        pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), seq),
                        pa.FixedSizeListArray.from_arrays(pa.array(labels.reshape(-1)), seq),
                        pa.array([x.tolist() for x in lengths], type=pa.list_(pa.int32())),
                    ],
                    schema=schema,
                )
            )


MDS_WRITER = """
import sys, numpy as np
sys.path.insert(0, sys.argv[3])
from streaming import MDSWriter
from formats.reader import open_dataset
ds = open_dataset(sys.argv[1])
cols = {"input_ids": "ndarray:int32", "labels": "ndarray:int32", "doc_lengths": "ndarray:int32"}
with MDSWriter(out=sys.argv[2], columns=cols, compression=None, size_limit=1 << 27) as w:
    for i in range(len(ds)):
        r = ds.row(i)
        w.write({"input_ids": np.asarray(r.input_ids), "labels": np.asarray(r.labels),
                 "doc_lengths": np.asarray(r.doc_lengths)})
"""


def streaming_env() -> tuple[dict[str, str] | None, str]:
    """Install `streaming` into benchmarks/_work once; return the env to run it with, or None and why not."""
    if not (STREAMING_PKGS / "streaming").is_dir():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(STREAMING_PKGS),
        ]
        proc = subprocess.run(cmd + STREAMING_REQS, capture_output=True, text=True)
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            return None, f"pip could not install mosaicml-streaming: {last}"
    stub = STREAMING_STUBS / "torchvision"
    (stub / "transforms").mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text("")
    (stub / "datasets.py").write_text(
        "class VisionDataset:  # stub: streaming.vision is never used here\n    pass\n"
    )
    (stub / "transforms" / "__init__.py").write_text("")
    (stub / "transforms" / "functional.py").write_text("def to_tensor(x):\n    raise NotImplementedError\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(STREAMING_PKGS), str(STREAMING_STUBS), str(REPO)])
    probe = subprocess.run(
        [sys.executable, "-c", "import streaming"], env=env, capture_output=True, text=True
    )
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or [f"exit code {probe.returncode}"])[-1]
        return None, f"streaming does not import: {last}"
    return env, ""


# ------------------------------------------------------------------------------------------------ measuring
class TreeMemory:
    """Peak summed RSS and RssAnon of this process and its children (dataloader workers), sampled."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak_rss = self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _status(pid: int) -> tuple[int, int]:
        rss = anon = 0
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) * 1024
                    elif line.startswith("RssAnon:"):
                        anon = int(line.split()[1]) * 1024
        except OSError:
            pass
        return rss, anon

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = [self._proc.pid] + [c.pid for c in self._proc.children(recursive=True)]
            rss = anon = 0
            for pid in pids:
                r, a = self._status(pid)
                rss, anon = rss + r, anon + a
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
            time.sleep(0.02)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _rows_collate(samples):
    from trainer.collate import collate_packed

    ids = np.stack([np.asarray(s["input_ids"]) for s in samples])
    labels = np.stack([np.asarray(s["labels"]) for s in samples])
    return collate_packed(ids, labels, [np.asarray(s["doc_lengths"]) for s in samples])


def measure(kind: str, data: str, workers: int, batch: int, max_rows: int) -> dict:
    """Read up to max_rows rows (whole batches) with one loader; runs inside its own process."""
    from torch.utils.data import DataLoader

    if kind == "ours":
        from formats.reader import open_dataset
        from trainer.dataset import PackedIterableDataset

        n = len(open_dataset(data))
        g = batch
        ds = PackedIterableDataset(
            data,
            global_batch_size=g,
            micro_batch_size=batch,
            seed=SEED,
            rank=0,
            world_size=1,
            remainder="drop",
            epochs=1,
        )
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
    elif kind == "hf_datasets":
        import datasets

        datasets.disable_progress_bars()
        hf = datasets.Dataset.from_file(data).with_format("torch")
        n = len(hf)
        loader = DataLoader(
            hf, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers, collate_fn=_rows_collate
        )
    elif kind == "mosaic_streaming":
        from streaming import StreamingDataset

        sd = StreamingDataset(local=data, shuffle=True, shuffle_seed=SEED, batch_size=batch)
        n = len(sd)
        loader = DataLoader(
            sd, batch_size=batch, drop_last=True, num_workers=workers, collate_fn=_rows_collate
        )
    else:
        raise ValueError(kind)
    rows = tokens = 0
    with TreeMemory() as mem:
        t0 = time.perf_counter()
        first = None
        for b in loader:
            if first is None:
                first = time.perf_counter() - t0
            rows += b["input_ids"].shape[0]
            tokens += b["input_ids"].numel()
            if rows >= max_rows:
                break
        seconds = time.perf_counter() - t0
    del loader
    return {
        "loader": kind,
        "dataset_rows": n,
        "workers": workers,
        "rows": rows,
        "tokens": tokens,
        "seconds": seconds,
        "first_batch_s": first,
        "rows_per_s": rows / seconds,
        "tokens_per_s": tokens / seconds,
        "peak_rss_mb": mem.peak_rss / 2**20,
        "peak_anon_mb": mem.peak_anon / 2**20,
    }


def run_measure(kind: str, data: Path, workers: int, batch: int, max_rows: int, env: dict | None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--_measure",
        kind,
        "--_data",
        str(data),
        "--_workers",
        str(workers),
        "--batch",
        str(batch),
        "--_max-rows",
        str(max_rows),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{kind} with {workers} workers failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check that the script runs")
    ap.add_argument("--rows", type=int, nargs="+", help="dataset sizes in rows (default 10000 100000)")
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    ap.add_argument("--batch", type=int, default=8, help="rows per batch")
    ap.add_argument("--max-rows", type=int, default=10_000,
                    help="rows read per measurement (0: all); the datasets still grow, so RSS growth shows")
    ap.add_argument("--no-streaming", action="store_true", help="skip MosaicML streaming")
    ap.add_argument("--rss-rows", type=int, nargs="*", help="full-epoch memory scan sizes (default 10k 100k 1M; none: skip)")
    ap.add_argument("--rss-seq-length", type=int, default=256)
    ap.add_argument("--_measure", help=argparse.SUPPRESS)
    ap.add_argument("--_data", help=argparse.SUPPRESS)
    ap.add_argument("--_workers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_max-rows", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._measure:
        print(json.dumps(measure(args._measure, args._data, args._workers, args.batch, args._max_rows)))
        return

    sizes = args.rows or ([256, 1024] if args.quick else [10_000, 100_000])
    env, why_not = (None, "--no-streaming") if args.no_streaming else streaming_env()
    if env is None:
        print(f"note: MosaicML streaming skipped: {why_not}", file=sys.stderr)
    results = []
    for n in sizes:
        base = WORK / f"rows{n}-seq{args.seq_length}"
        ours, hf, mds = base / "ours", base / "hf.arrow", base / "mds"
        t0 = time.perf_counter()
        if not (ours / "index.json").is_file():
            write_ours(ours, n, args.seq_length)
        if not hf.is_file():
            write_hf(ours, hf)
        if env is not None and not (mds / "index.json").is_file():
            subprocess.run(
                [sys.executable, "-c", MDS_WRITER, str(ours), str(mds), str(REPO)], env=env, check=True
            )
        print(f"data for {n} rows ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        max_rows = args.max_rows or n
        for workers in args.workers:
            results.append(run_measure("ours", ours, workers, args.batch, max_rows, None))
            results.append(run_measure("hf_datasets", hf, workers, args.batch, max_rows, None))
            if env is not None:
                results.append(run_measure("mosaic_streaming", mds, workers, args.batch, max_rows, env))
            for r in results[-3:]:
                if r["workers"] == workers and r["dataset_rows"] == n:
                    print(
                        f"  {r['loader']:>16} rows={n} workers={workers}: {r['rows_per_s']:,.0f} rows/s",
                        file=sys.stderr,
                    )

    rss_sizes = args.rss_rows if args.rss_rows is not None else ([1000, 4000] if args.quick else [10_000, 100_000, 1_000_000])
    rss_seq = 64 if args.quick else args.rss_seq_length
    rss_results = []
    for n in rss_sizes:
        base = WORK / f"rows{n}-seq{rss_seq}"
        if not (base / "ours" / "index.json").is_file():
            write_ours(base / "ours", n, rss_seq)
        if not (base / "hf.arrow").is_file():
            write_hf(base / "ours", base / "hf.arrow")
        for kind, data in (("ours", base / "ours"), ("hf_datasets", base / "hf.arrow")):
            rss_results.append(run_measure(kind, data, 0, args.batch, n, None))
            r = rss_results[-1]
            print(f"  full epoch {kind:>12} rows={n}: {r['peak_anon_mb']:,.0f} MB anon", file=sys.stderr)

    print(
        f"\n### Loader throughput ({'--quick, ' if args.quick else ''}seq_length {args.seq_length}, batch {args.batch})\n"
    )
    print(
        "| rows | workers | loader | rows/s | tokens/s | ours / this | first batch s | peak RSS MB (tree) | peak anon MB (tree) |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ours_r = next(
            x
            for x in results
            if x["loader"] == "ours"
            and x["workers"] == r["workers"]
            and x["dataset_rows"] == r["dataset_rows"]
        )
        print(
            f"| {r['dataset_rows']:,} | {r['workers']} | {r['loader']} | {r['rows_per_s']:,.0f} | "
            f"{r['tokens_per_s']:,.0f} | {ours_r['rows_per_s'] / r['rows_per_s']:.2f}x | {r['first_batch_s']:.2f} | "
            f"{r['peak_rss_mb']:,.0f} | {r['peak_anon_mb']:,.0f} |"
        )
    if env is None:
        print(f"\nMosaicML streaming: skipped ({why_not}).")
    if rss_results:
        print(f"\n### Memory over one whole epoch, no workers (seq_length {rss_seq}, batch {args.batch})\n")
        print("| rows | loader | rows read | rows/s | peak anon MB | anon vs smallest | peak RSS MB (incl. page cache) |")
        print("|---:|---|---:|---:|---:|---:|---:|")
        for r in rss_results:
            first = next(x for x in rss_results if x["loader"] == r["loader"])
            print(
                f"| {r['dataset_rows']:,} | {r['loader']} | {r['rows']:,} | {r['rows_per_s']:,.0f} | "
                f"{r['peak_anon_mb']:,.0f} | {r['peak_anon_mb'] / first['peak_anon_mb']:.2f}x | {r['peak_rss_mb']:,.0f} |"
            )
    print(
        "BENCH_JSON "
        + json.dumps(
            {
                "bench": "loader",
                "quick": args.quick,
                "seq_length": args.seq_length,
                "batch": args.batch,
                "streaming_skipped": why_not or None,
                "results": results,
                "rss_seq_length": rss_seq,
                "rss_scan": rss_results,
            }
        )
    )


if __name__ == "__main__":
    main()
