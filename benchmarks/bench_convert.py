"""Benchmark `dataprep convert` against a plain json.load + Python loop + json.dump converter.

Builds N Alpaca records (default 1,000,000) by resampling the real Alpaca samples in ../shared/data into
one JSON array file under benchmarks/_work/ (git-ignored; reused when present), then runs, each in its
own process, one after another:

- baseline json.dump: json.load the array, convert in a Python loop, json.dump a JSON array (what
  MindFormers' and FastChat's converter scripts do; note json.dump streams through the pure-Python
  encoder);
- baseline json.dumps/line: the same, but json.dumps one JSONL line per record (a stronger peer);
- sftkit convert --num-proc 1: the `dataprep convert` console script (streaming, orjson), on N and on
  N/10 records (peak memory should not grow with the input);
- sftkit convert --num-proc P (default 2, `--num-proc` here; 0 = one per CPU): the same with P worker
  processes (their peak RSS is not in the table: each holds a few chunks, not the input).

Wall time is measured around the whole process (imports and start-up included), CPU time from the
children's rusage, and peak RSS is each process's own VmHWM (the rusage maxrss of a child also counts
the parent's memory on Linux). The two baselines and sftkit write the same ids, messages and `extra` (the fields
not mapped, kept rather than dropped), and the
baseline-per-line output is compared with sftkit's record by record, and the --num-proc P output with
the --num-proc 1 output byte for byte, before the table is printed. The speed-up column is each sftkit
row against the json.dump baseline.

    .venv/bin/python benchmarks/bench_convert.py            # the real measurement (run alone: 2 cores)
    .venv/bin/python benchmarks/bench_convert.py --quick    # 20,000 records, a smoke test

Prints a Markdown table and one `BENCH_JSON {...}` line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "alpaca"
WORK = REPO / "benchmarks" / "_work"
SAMPLES = ("alpaca_tiny_100.json", "alpaca_gpt4_en_demo_1k.json")
TARGET_RATIO = 5.0

# Appended to every measured program: report this process's own peak RSS (VmHWM) on stderr. The
# rusage of a child is no good here: Linux carries the parent's peak over into a forked child's maxrss.
PEAK = r"""
import atexit as _atexit, sys as _sys
def _peak():
    try:
        with open("/proc/self/status") as f:
            kib = next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))
        _sys.stderr.write(f"PEAK_KIB {kib}\n")
    except OSError:
        pass
_atexit.register(_peak)
"""

# sftkit through its real console entry point, with the peak report added.
SFTKIT = PEAK + r"""
import sys
from cli.dataprep import main
sys.argv = ["dataprep", *sys.argv[1:]]
main()
"""

# The peer, run as `python -c BASELINE IN OUT MODE`: deliberately the obvious code a user would write.
BASELINE = PEAK + r"""
import json, os, sys
src, dst, mode = sys.argv[1:4]
stem = os.path.basename(src)
with open(src, encoding="utf-8") as f:
    data = json.load(f)
out = []
for i, r in enumerate(data):
    user = r["instruction"] + "\n\n" + r["input"] if r.get("input") else r["instruction"]
    rec = {"id": f"{stem}[{i}]", "messages": [{"role": "user", "content": user},
                                              {"role": "assistant", "content": r["output"]}]}
    extra = {k: v for k, v in r.items() if k not in ("instruction", "input", "output")}
    if extra:  # never drop a field silently: keep what is not mapped, as sftkit does
        rec["extra"] = extra
    out.append(rec)
with open(dst, "w", encoding="utf-8") as f:
    if mode == "dump":
        json.dump(out, f)
    else:
        for rec in out:
            f.write(json.dumps(rec) + "\n")
"""


def build_input(n: int, seed: int = 0) -> Path:
    """N records resampled (with replacement) from the real Alpaca samples, as one JSON array file."""
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"alpaca_resampled_{n}.json"
    if path.exists():
        return path
    if not SHARED.is_dir():
        sys.exit(f"real Alpaca samples not found at {SHARED} (they come with ../shared beside the repo)")
    pool = []
    for name in SAMPLES:
        pool.extend(json.loads((SHARED / name).read_text(encoding="utf-8")))
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(b"[\n")
        for i in range(n):
            if i:
                f.write(b",\n")
            f.write(orjson.dumps(rng.choice(pool), option=orjson.OPT_INDENT_2))
        f.write(b"\n]\n")
    os.replace(tmp, path)
    return path


def take_first(src: Path, n: int) -> Path:
    """The first n records of `src` as their own file (for the memory-vs-input-size row)."""
    path = WORK / f"{src.stem}_first{n}.json"
    if not path.exists():
        data = orjson.loads(src.read_bytes())[:n]
        path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    return path


def timed(argv: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS MiB) of one child process; fails loudly if it fails."""
    start = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, check=False)
    wall = time.perf_counter() - start
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        sys.exit(f"{argv[:3]} failed ({proc.returncode}):\n{err}")
    peaks = [int(line.split()[1]) for line in err.splitlines() if line.startswith("PEAK_KIB ")]
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime - timed.cpu_so_far  # type: ignore[attr-defined]
    timed.cpu_so_far = usage.ru_utime + usage.ru_stime  # type: ignore[attr-defined]
    return wall, cpu, (peaks[-1] / 1024 if peaks else float("nan"))


timed.cpu_so_far = 0.0  # type: ignore[attr-defined]


def same_records(a: Path, b: Path) -> int:
    """Compare two JSONL files record by record (streaming); returns the count or exits on a difference."""
    count = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for la, lb in zip(fa, fb, strict=True):
            if orjson.loads(la) != orjson.loads(lb):
                sys.exit(f"outputs differ at record {count}: baseline and sftkit did not do the same work")
            count += 1
    return count


def same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="20,000 records: check that the script works")
    parser.add_argument("--num-proc", type=int, default=2, help="worker processes for the parallel row (0: one per CPU)")
    args = parser.parse_args()
    n = 20_000 if args.quick else args.records
    python = sys.executable

    src = build_input(n)
    small = take_first(src, max(n // 10, 1))
    out = WORK / "out"
    out.mkdir(exist_ok=True)
    runs = [
        ("baseline json.load + loop + json.dump", n, [python, "-c", BASELINE, str(src), str(out / "base_dump.json"), "dump"]),
        ("baseline json.load + loop + json.dumps/line", n, [python, "-c", BASELINE, str(src), str(out / "base_lines.jsonl"), "lines"]),
        ("sftkit dataprep convert --num-proc 1", n,
         [python, "-c", SFTKIT, "convert", str(src), "-o", str(out / "sftkit.jsonl"), "--overwrite", "--json", "--num-proc", "1"]),
        (
            "sftkit dataprep convert --num-proc 1 (N/10 records)",
            max(n // 10, 1),
            [python, "-c", SFTKIT, "convert", str(small), "-o", str(out / "sftkit_small.jsonl"), "--overwrite", "--json", "--num-proc", "1"],
        ),
        (f"sftkit dataprep convert --num-proc {args.num_proc}", n,
         [python, "-c", SFTKIT, "convert", str(src), "-o", str(out / "sftkit_par.jsonl"), "--overwrite", "--json",
          "--num-proc", str(args.num_proc)]),
    ]
    results = []
    for name, count, argv in runs:
        wall, cpu, rss = timed(argv)
        results.append(
            {"run": name, "records": count, "seconds": wall, "cpu_seconds": cpu, "records_per_s": count / wall, "peak_rss_mib": rss}
        )
        print(f"  {name}: {wall:.2f} s wall, {cpu:.2f} s CPU, {rss:.0f} MiB", file=sys.stderr, flush=True)

    # The baseline wrote a different file name, so its ids carry the input's name just like ours do.
    checked = same_records(out / "base_lines.jsonl", out / "sftkit.jsonl")
    dumped = json.loads((out / "base_dump.json").read_text(encoding="utf-8"))
    assert len(dumped) == n and checked == n
    if not same_bytes(out / "sftkit.jsonl", out / "sftkit_par.jsonl"):
        sys.exit(f"--num-proc {args.num_proc} wrote different bytes than --num-proc 1")

    base = results[0]["seconds"]
    base_lines = results[1]["seconds"]
    ours = results[2]["seconds"]
    ours_par = results[4]["seconds"]
    print(f"\nconvert benchmark: {n:,} Alpaca records resampled from {', '.join(SAMPLES)}"
          f" ({src.stat().st_size / 1e6:,.0f} MB JSON array){' [--quick]' if args.quick else ''}\n")
    print("| run | records | wall s | CPU s | records/s | peak RSS MiB | vs json.dump baseline (wall) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ratio = f"{base / r['seconds']:.1f}x" if r["run"].startswith("sftkit") and r["records"] == n else ""
        print(
            f"| {r['run']} | {r['records']:,} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['records_per_s']:,.0f}"
            f" | {r['peak_rss_mib']:,.0f} | {ratio} |"
        )
    ratio = base / ours
    ratio_par = base / ours_par
    for label, value in (("--num-proc 1", ratio), (f"--num-proc {args.num_proc}", ratio_par)):
        print(f"\nsftkit convert {label} vs json.load + loop + json.dump: {value:.1f}x (target >= {TARGET_RATIO:.0f}x:"
              f" {'met' if value >= TARGET_RATIO else 'NOT met'}); vs json.dumps per line: {base_lines / base * value:.1f}x.")
    print(f"Outputs checked equal on all {checked:,} records (baseline vs sftkit; --num-proc {args.num_proc} byte-identical"
          f" to --num-proc 1). CPUs here: {os.cpu_count()}.")
    print("BENCH_JSON " + json.dumps({
        "bench": "convert",
        "quick": args.quick,
        "records": n,
        "input_mb": round(src.stat().st_size / 1e6, 1),
        "ratio_vs_json_dump": round(ratio, 2),
        "ratio_vs_json_dumps_lines": round(base_lines / ours, 2),
        "num_proc": args.num_proc,
        "ratio_vs_json_dump_num_proc": round(ratio_par, 2),
        "ratio_vs_json_dumps_lines_num_proc": round(base_lines / ours_par, 2),
        "cpus": os.cpu_count(),
        "target_ratio": TARGET_RATIO,
        "runs": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in results],
    }))


if __name__ == "__main__":
    main()
