"""Run every benchmarks/bench_*.py one after another and write one report: where sftkit stands against its peers.

    .venv/bin/python benchmarks/run_all.py            # the real run: alone on the machine, writes benchmarks/REPORT.md
    .venv/bin/python benchmarks/run_all.py --quick    # smoke run (tiny sizes) into benchmarks/_work/ (git-ignored)

Each script prints Markdown tables and ends with one `BENCH_JSON {...}` line; the scripts' JSON keys differ,
so METRICS below maps each benchmark to the figures of the summary table (ours, the peer's, the ratio, the
target). The report also holds the machine, the date, the git commit and each script's own tables, and a
PNG of the ratios against their targets. Every figure in one report comes from one invocation, run
sequentially: concurrent benchmarks on a small machine make ratios lie.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@dataclasses.dataclass(frozen=True)
class Metric:
    """One summary row. `figures(j)` returns (ours, peer, ratio) from a script's BENCH_JSON (None: absent);
    `met(ours, ratio)` decides the target. Ratios are always "higher is better for sftkit"."""

    bench: str
    label: str
    peer: str
    unit: str
    target: str
    figures: Callable[[dict], tuple[float | None, float | None, float | None]]
    met: Callable[[float | None, float | None], bool | None]
    target_ratio: float | None = None  # where the plot draws the target line (None: absolute target)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _convert(j: dict) -> tuple[float | None, float | None, float | None]:
    runs = {r["run"]: r for r in j.get("runs", [])}
    ours = next((r for name, r in runs.items() if name.startswith("sftkit") and "N/10" not in name), {})
    base = next((r for name, r in runs.items() if name.startswith("baseline") and "dump" in name and "dumps" not in name), {})
    return ours.get("records_per_s"), base.get("records_per_s"), j.get("ratio_vs_json_dump")


def _pack_peer(j: dict) -> tuple[float | None, float | None, float | None]:
    """Largest size the peer ran on: lengths packed per second, ours BFD vs the peer's first measured variant."""
    entries = [e for e in j.get("results", []) if "speedup_bfd_vs_peer" in e]
    if not entries:
        return None, None, None
    e = max(entries, key=lambda e: e["n"])
    peer_key = next(k for k in e if k.startswith("trl"))
    return e["n"] / e["ours_bfd"]["seconds"], e["n"] / e[peer_key]["seconds"], e["speedup_bfd_vs_peer"]


def _pack_at(n: int, field: str) -> Callable[[dict], tuple[float | None, float | None, float | None]]:
    def get(j: dict) -> tuple[float | None, float | None, float | None]:
        e = next((e for e in j.get("results", []) if e["n"] == n), None)
        return (e["ours_bfd"][field] if e else None), None, None

    return get


def _loader(peer: str) -> Callable[[dict], tuple[float | None, float | None, float | None]]:
    """At the largest dataset: the worst ours/peer rows/s over the worker counts measured (conservative)."""

    def get(j: dict) -> tuple[float | None, float | None, float | None]:
        results = j.get("results", [])
        if not results:
            return None, None, None
        n = max(r["dataset_rows"] for r in results)
        best = None
        for r in results:
            if r["loader"] != peer or r["dataset_rows"] != n:
                continue
            ours = next(x for x in results if x["loader"] == "ours" and x["workers"] == r["workers"] and x["dataset_rows"] == n)
            ratio = ours["rows_per_s"] / r["rows_per_s"]
            if best is None or ratio < best[2]:
                best = (ours["rows_per_s"], r["rows_per_s"], ratio)
        return best or (None, None, None)

    return get


def _loader_memory(j: dict) -> tuple[float | None, float | None, float | None]:
    """Peak anonymous memory over a whole epoch, largest dataset / smallest: ours, then HF datasets (1.0 = flat)."""
    scan = j.get("rss_scan") or []

    def growth(kind: str) -> float | None:
        runs = sorted((r["dataset_rows"], r["peak_anon_mb"]) for r in scan if r["loader"] == kind)
        return runs[-1][1] / runs[0][1] if len(runs) > 1 else None

    ours, peer = growth("ours"), growth("hf_datasets")
    return ours, peer, _ratio(peer, ours)


def _real(mode: str, field: str, faster: bool) -> Callable[[dict], tuple[float | None, float | None, float | None]]:
    """bench_train_real: ours vs TRL for one mode; the ratio is oriented so that higher is better for sftkit."""
    def get(j: dict) -> tuple[float | None, float | None, float | None]:
        results = j.get("results", {})
        ours = results.get(f"ours-{mode}", {}).get(field)
        peer = results.get(f"trl-{mode}", {}).get(field)
        return ours, peer, (_ratio(ours, peer) if faster else _ratio(peer, ours))
    return get


def _generate_at(j: dict, batch: int) -> tuple[float | None, float | None, float | None]:
    """bench_generate: our tokens/s (eager decode step) and transformers' at one batch size."""
    rows = {r["impl"]: r for r in j.get("rows", []) if r["batch"] == batch}
    ours, peer = rows.get("ours"), rows.get("transformers")
    if ours is None or peer is None:
        return None, None, None
    return ours["tokens_per_s"], peer["tokens_per_s"], _ratio(ours["tokens_per_s"], peer["tokens_per_s"])


def _at_least(target: float) -> Callable[[float | None, float | None], bool | None]:
    return lambda ours, ratio: None if ratio is None else ratio >= target


def _e2e(j: dict, peer: str) -> tuple[float | None, float | None, float | None]:
    """Best-of-N records/s of ours and of `peer` (bench_e2e keeps every round per arm)."""
    def best(arm: str) -> float | None:
        times = [r["seconds"] for r in j.get("runs", {}).get(arm, []) if r.get("seconds")]
        return j["records"] / min(times) if times and j.get("records") else None

    ours, other = best("ours"), best(peer)
    return ours, other, _ratio(ours, other)


METRICS: list[Metric] = [
    Metric("convert", "convert (records/s)", "json.load + loop + json.dump", "records/s", ">= 5x",
           _convert, _at_least(5.0), 5.0),
    Metric("tokenize", "tokenize + masks (tokens/s)", "TRL-style datasets.map(apply_chat_template)", "tokens/s",
           ">= 2x", lambda j: (j.get("ours_tokens_per_s"), j.get("trl_style_tokens_per_s"), j.get("ours_over_trl")),
           _at_least(2.0), 2.0),
    Metric("tokenize", "tokenize + masks vs encode ceiling", "tokenizers encode_batch (no template, no masks)",
           "tokens/s", ">= 0.67x (within 1.5x)",
           lambda j: (j.get("ours_tokens_per_s"), j.get("ceiling_encode_batch_tokens_per_s"),
                      _ratio(j.get("ours_tokens_per_s"), j.get("ceiling_encode_batch_tokens_per_s"))),
           _at_least(1 / 1.5), 1 / 1.5),
    Metric("e2e", "pack end to end, 200k Alpaca-GPT4, Llama 3, seq 4096 (records/s)",
           "TRL SFTTrainer data preparation (assistant-only loss, bfd packing, save_to_disk)", "records/s", ">= 4x",
           lambda j: _e2e(j, "trl"), _at_least(4.0), 4.0),
    Metric("e2e", "pack end to end vs the bare ceiling (render + encode_batch, nothing written; issue 15's)",
           "ceiling", "records/s", ">= 0.95x", lambda j: _e2e(j, "ceiling"), _at_least(0.95), 0.95),
    Metric("e2e", "pack end to end vs the stricter ceiling (render + encode_batch_fast, nothing written)",
           "ceiling_fast", "records/s", "none set", lambda j: _e2e(j, "ceiling_fast"), lambda ours, ratio: None),
    Metric("pack", "pack BFD (lengths/s)", "TRL pack_dataset(bfd)", "lengths/s", ">= 10x", _pack_peer,
           _at_least(10.0), 10.0),
    Metric("pack", "pack 1M lengths (s)", "-", "s", "< 1 s", _pack_at(1_000_000, "seconds"),
           lambda ours, ratio: None if ours is None else ours < 1.0),
    Metric("pack", "pack 1M lengths over bound (%)", "-", "%", "<= 0.5%", _pack_at(1_000_000, "over_bound_pct"),
           lambda ours, ratio: None if ours is None else ours <= 0.5),
    Metric("loader", "loader vs HF datasets (rows/s)", "datasets Arrow + DataLoader", "rows/s", ">= 1x (faster)",
           _loader("hf_datasets"), _at_least(1.0), 1.0),
    Metric("loader", "loader vs MosaicML streaming (rows/s)", "streaming StreamingDataset", "rows/s",
           ">= 1x (faster)", _loader("mosaic_streaming"), _at_least(1.0), 1.0),
    Metric("loader", "loader memory growth 10k -> 1M rows (anon, whole epoch)", "HF datasets, same rows", "x",
           "<= 1.1x (flat)", _loader_memory, lambda ours, ratio: None if ours is None else ours <= 1.1),
    Metric("train", "train vs HF Trainer (trained tokens/s)", "HF Trainer + DataCollatorWithFlattening", "tokens/s", ">= 1.2x",
           lambda j: (j.get("ours_trained_tokens_per_s"), j.get("hf_trained_tokens_per_s"), j.get("ratio_vs_hf")),
           _at_least(1.2), 1.2),
    Metric("train", "train vs padded batches (trained tokens/s)", "ours, one sample per row, padded", "tokens/s", ">= 2x",
           lambda j: (j.get("ours_trained_tokens_per_s"), j.get("padded_trained_tokens_per_s"), j.get("ratio_vs_padded")),
           _at_least(2.0), 2.0),
    *[m for mode in ("full", "lora") for m in (
        Metric("train_real", f"train {mode}, Qwen vocab, seq 4096, vs TRL (trained tokens/s)",
               "TRL SFTTrainer (default loss, padding-free bfd packing)", "tokens/s", ">= 1.5x",
               _real(mode, "trained_tokens_per_s", faster=True), _at_least(1.5), 1.5),
        Metric("train_real", f"train {mode}, Qwen vocab, seq 4096, TRL / ours peak memory", "TRL SFTTrainer", "MiB",
               ">= 1.67x (ours <= 0.6x)", _real(mode, "peak_mib", faster=False), _at_least(1 / 0.6), 1 / 0.6),
    )],
    Metric("lora", "LoRA tokens/s vs full fine-tuning", "ours, full fine-tuning", "tokens/s", "none set",
           lambda j: (j.get("lora", {}).get("tokens_per_s"), j.get("full", {}).get("tokens_per_s"),
                      j.get("lora", {}).get("tokens_per_s_vs_full")),
           lambda ours, ratio: None),
    Metric("lora", "LoRA memory saving (full / LoRA peak memory)", "ours, full fine-tuning", "MiB", "none set",
           lambda j: (j.get("lora", {}).get("peak_memory_mib"), j.get("full", {}).get("peak_memory_mib"),
                      _ratio(j.get("full", {}).get("peak_memory_mib"), j.get("lora", {}).get("peak_memory_mib"))),
           lambda ours, ratio: None),
    Metric("generate", "greedy generation, batch 1 (tokens/s)", "transformers.generate", "tokens/s", "none set",
           lambda j: _generate_at(j, 1), lambda ours, ratio: None),
    Metric("generate", "greedy generation, batch 16 (tokens/s)", "transformers.generate", "tokens/s", "none set",
           lambda j: _generate_at(j, j.get("sizes", {}).get("batch", 16)), lambda ours, ratio: None),
    Metric("mfu", "MFU, Llama-3-8B shape 4 layers, bf16, seq 4096", "-", "%", ">= 45%",
           lambda j: ((100 * j["mfu"]) if "mfu" in j else None, None, None),
           lambda ours, ratio: None if ours is None else ours >= 45.0),
]


@dataclasses.dataclass
class Outcome:
    name: str
    script: Path
    argv: list[str]
    returncode: int
    seconds: float
    stdout: str
    stderr_tail: str
    data: dict | None
    tables: list[str]
    reused_from: str | None = None  # with --rerun: when the earlier run whose logs this outcome was read from ran


def reuse_logged(script: Path, log_dir: Path) -> Outcome | None:
    """The outcome of `script` in the last invocation, read back from its logs (None when there is none)."""
    name = script.stem.removeprefix("bench_")
    out_log, meta_log = log_dir / f"{name}.stdout.log", log_dir / f"{name}.meta.json"
    if not out_log.is_file() or not meta_log.is_file():
        return None
    meta = json.loads(meta_log.read_text(encoding="utf-8"))
    out = out_log.read_text(encoding="utf-8")
    data, tables = parse_output(out)
    return Outcome(name, script, meta["argv"], meta["returncode"], meta["seconds"], out, meta.get("stderr_tail", ""),
                   data, tables, reused_from=f"{meta['finished']} UTC, commit {meta['commit'][:10]}")


def reuse_reported(script: Path, report: Path) -> Outcome | None:
    """The outcome of `script` read back from its section of an earlier report (None when it has none or its
    figures do not parse): for --rerun on a checkout without the logs (they are not committed)."""
    if not report.is_file():
        return None
    name = script.stem.removeprefix("bench_")
    text = report.read_text(encoding="utf-8")
    head = re.search(r"^- date: (\S+ \S+) UTC.*$\n^- git commit: (\w+)", text, re.M)
    section = re.search(rf"^## {re.escape(name)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if section is None or head is None:
        return None
    body = section.group(1)
    line = re.search(r"^`python (.*?)` -- exit (-?\d+), (\d+) s(?: \(from the run of (.*?)\))?$", body, re.M)
    blob = re.search(r"```json\n(.*?)\n```", body, re.S)
    if line is None or blob is None:
        return None
    try:
        data = json.loads(blob.group(1))
    except json.JSONDecodeError:  # the report keeps at most 20,000 characters of it
        return None
    tables = ["\n".join(t) for t in _runs(body.splitlines(), lambda x: x.startswith("|"))]
    origin = line.group(4) or f"{head.group(1)} UTC, commit {head.group(2)[:10]}"
    return Outcome(name, script, [sys.executable, *line.group(1).split()], int(line.group(2)), float(line.group(3)),
                   "", "", data, tables, reused_from=origin)


def _runs(lines: list[str], keep: Callable[[str], bool]) -> list[list[str]]:
    out: list[list[str]] = []
    current: list[str] = []
    for x in [*lines, ""]:
        if keep(x):
            current.append(x)
        elif current:
            out.append(current)
            current = []
    return out


def discover(directory: Path) -> list[Path]:
    return sorted(directory.glob("bench_*.py"))


def takes_quick(script: Path) -> bool:
    """Scripts declare --quick in their argparse; one that does not is run at full size even with --quick."""
    return '"--quick"' in script.read_text(encoding="utf-8")


def parse_output(stdout: str) -> tuple[dict | None, list[str]]:
    """The last BENCH_JSON object, and every Markdown table (runs of lines starting with '|')."""
    data = None
    for line in stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            try:
                data = json.loads(line[len("BENCH_JSON "):])
            except json.JSONDecodeError:
                data = None
    tables, current = [], []
    for line in stdout.splitlines() + [""]:
        if line.lstrip().startswith("|"):
            current.append(line.strip())
        elif current:
            tables.append("\n".join(current))
            current = []
    return data, tables


def run_one(script: Path, quick: bool, timeout: float, log_dir: Path) -> Outcome:
    argv = [sys.executable, str(script)] + (["--quick"] if quick and takes_quick(script) else [])
    name = script.stem.removeprefix("bench_")
    print(f"[run_all] {name}: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{name}.stderr.log", "w", encoding="utf-8") as err:
        try:
            proc = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout)
            code, out = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as exc:
            code = -9
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    seconds = time.perf_counter() - t0
    (log_dir / f"{name}.stdout.log").write_text(out, encoding="utf-8")
    stderr_tail = "\n".join((log_dir / f"{name}.stderr.log").read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
    data, tables = parse_output(out)
    meta = {"argv": argv, "returncode": code, "seconds": seconds, "stderr_tail": stderr_tail, "commit": git_commit(),
            "finished": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M}"}
    (log_dir / f"{name}.meta.json").write_text(json.dumps(meta), encoding="utf-8")
    print(f"[run_all] {name}: exit {code} in {seconds:.0f} s", file=sys.stderr, flush=True)
    return Outcome(name, script, argv, code, seconds, out, stderr_tail, data, tables)


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "%":
        return f"{value:.2f}%"
    if unit == "s":
        return f"{value:.3f} s"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def summary_rows(outcomes: dict[str, Outcome]) -> list[dict[str, Any]]:
    rows = []
    known = {m.bench for m in METRICS}
    for m in METRICS:
        o = outcomes.get(m.bench)
        row: dict[str, Any] = {"metric": m, "ours": None, "peer": None, "ratio": None, "met": None, "note": ""}
        if o is None:
            row["note"] = "no such benchmark script"
        elif o.data is None:
            row["note"] = f"failed (exit {o.returncode}, no BENCH_JSON)"
        elif "skipped" in o.data:
            row["note"] = f"skipped: {o.data['skipped']}"
        else:
            ours, peer, ratio = m.figures(o.data)
            row.update(ours=ours, peer=peer, ratio=ratio, met=m.met(ours, ratio))
            if ours is None and ratio is None:
                row["note"] = "not measured in this run"
        rows.append(row)
    for name in outcomes:
        if name not in known:
            rows.append({"metric": Metric(name, name, "-", "", "-", lambda j: (None, None, None), lambda a, b: None),
                         "ours": None, "peer": None, "ratio": None, "met": None,
                         "note": "no summary mapping in run_all.METRICS; see its own table below"})
    return rows


def machine() -> dict[str, str]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, AttributeError):
        pass
    gpu = "none"
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            gpu = "; ".join(out.stdout.strip().splitlines())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {
        "host": platform.node(),
        "os": platform.platform(),
        "cpu": f"{cpu} ({os.cpu_count()} logical CPUs)",
        "memory": mem,
        "gpu": gpu,
        "python": platform.python_version(),
    }


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return commit + (" (with uncommitted changes)" if dirty else "")


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Horizontal bars of ratios (log scale), target marked, green where met. False if nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [r for r in rows if r["ratio"] is not None]
    if not drawn:
        return False
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(drawn) + 1.6))
    labels = [r["metric"].label for r in drawn]
    ratios = [r["ratio"] for r in drawn]
    colors = [{True: "#2e7d32", False: "#c62828", None: "#78909c"}[r["met"]] for r in drawn]
    ys = range(len(drawn))
    ax.barh(ys, ratios, color=colors)
    for y, r in zip(ys, drawn, strict=True):
        t = r["metric"].target_ratio
        if t is not None:
            ax.plot([t, t], [y - 0.4, y + 0.4], color="black", linewidth=2)
        ax.text(r["ratio"], y, f" {r['ratio']:.2f}x", va="center", fontsize=8)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("sftkit / peer (higher is better; black tick = target; green met, red not, grey no target)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(outcomes: dict[str, Outcome], report: Path, png: Path, quick: bool, started: dt.datetime, total_s: float) -> None:
    rows = summary_rows(outcomes)
    commit = git_commit()
    info = machine()
    drew = plot(rows, png, f"sftkit vs peers, {started:%Y-%m-%d}, commit {commit[:10]}{' [--quick]' if quick else ''}")
    lines = [
        "# sftkit benchmark report",
        "",
        "Every figure below comes from one run of `benchmarks/run_all.py`"
        + (" with `--quick` (tiny sizes: a smoke test, not a measurement)" if quick else "")
        + ", each benchmark run alone, one after another"
        + ("; the sections marked 'from the run of ...' were not rerun (`--rerun`) and come from that earlier "
           "invocation's logs." if any(o.reused_from for o in outcomes.values()) else "."),
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC (total {total_s / 60:.1f} min)",
        f"- git commit: {commit}",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
    ]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", "## Summary", "", "| benchmark | ours | peer | peer figure | ratio | target | met |",
              "|---|---:|---|---:|---:|---|---|"]
    for r in rows:
        m = r["metric"]
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        ours = _fmt(r["ours"], m.unit) if not r["note"] else r["note"]
        lines.append(f"| {m.label} | {ours} | {m.peer} | {_fmt(r['peer'], m.unit)} | {ratio} | {m.target} | {met} |")
    if drew:
        lines += ["", f"![ratios]({os.path.relpath(png, report.parent)})"]
    lines += ["", "Ratios are sftkit / peer in the benchmark's own unit (higher is better). The loader rows show the",
              "worst ratio over the worker counts measured at the largest dataset; see each table for all of them."]
    for name, o in outcomes.items():
        lines += ["", f"## {name}", "", f"`{' '.join(['python', *[os.path.relpath(a, REPO) if a.startswith('/') else a for a in o.argv[1:]]])}`"
                  f" -- exit {o.returncode}, {o.seconds:.0f} s"
                  + (f" (from the run of {o.reused_from})" if o.reused_from else ""), ""]
        if o.tables:
            for t in o.tables:
                lines += [t, ""]
        else:
            lines += ["(no table printed)", ""]
        if o.returncode != 0 or o.data is None:
            lines += ["stderr (last lines):", "", "```", o.stderr_tail, "```", ""]
        if o.data is not None:
            lines += ["<details><summary>BENCH_JSON</summary>", "", "```json", json.dumps(o.data, indent=1)[:20000], "```",
                      "", "</details>"]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="pass --quick to every script that takes it (smoke run)")
    ap.add_argument("--only", default="", help="comma-separated benchmark names to run (e.g. pack,tokenize)")
    ap.add_argument("--dir", type=Path, default=HERE, help="where the bench_*.py scripts are")
    ap.add_argument("--output", type=Path, default=None,
                    help="report path (default benchmarks/REPORT.md; with --quick benchmarks/_work/REPORT-quick.md)")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds allowed per script")
    ap.add_argument("--rerun", default="",
                    help="comma-separated benchmarks to run again; every other one is read back from the logs of the "
                         "last invocation (benchmarks/_work/run_all_logs), or from its section of the report being "
                         "replaced when there are no logs, and marked so in the report")
    args = ap.parse_args()
    report = args.output or (HERE / "_work" / "REPORT-quick.md" if args.quick else HERE / "REPORT.md")
    png = report.with_name("report_ratios.png" if report.name == "REPORT.md" else report.stem + "_ratios.png")
    scripts = discover(args.dir)
    if args.only:
        wanted = set(args.only.split(","))
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    if not scripts:
        print(f"no bench_*.py scripts found in {args.dir}", file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    outcomes = {}
    log_dir = args.dir / "_work" / "run_all_logs"  # beside the scripts run (a test's copies keep their own)
    rerun = set(filter(None, args.rerun.split(",")))
    for script in scripts:
        reused = None
        if rerun and script.stem.removeprefix("bench_") not in rerun:
            reused = reuse_logged(script, log_dir) or reuse_reported(script, report)
        o = reused or run_one(script, args.quick, args.timeout, log_dir)
        outcomes[o.name] = o
    write_report(outcomes, report, png, args.quick, started, time.perf_counter() - t0)
    print(f"[run_all] wrote {report} and {png}", file=sys.stderr)
    failed = [o.name for o in outcomes.values() if o.returncode != 0 or o.data is None]
    if failed:
        print(f"[run_all] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
