"""benchmarks/run_all.py: runs each bench script, maps its BENCH_JSON to the summary, survives failures."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FAKE_PACK = """
import json, sys
quick = "--quick" in sys.argv
print("| lengths | method | seconds |")
print("|---:|---|---:|")
print("| 1,000,000 | ours BFD | 0.4 |")
print("noise line")
res = [{"n": 1000000, "ours_bfd": {"seconds": 0.4, "bins": 10, "over_bound_pct": 0.2},
        "trl_bfd_one_batch": {"seconds": 8.0, "bins": 10, "over_bound_pct": 0.2}, "speedup_bfd_vs_peer": 20.0}]
print("BENCH_JSON " + json.dumps({"bench": "pack", "quick": False, "results": []}))
print("BENCH_JSON " + json.dumps({"bench": "pack", "quick": quick, "results": res}))
"""

FAKE_TRAIN = """
import json
print("| trainer | tokens/s |\\n|---|---:|\\n| ours | 110 |")
print("BENCH_JSON " + json.dumps({"bench": "train", "ours_trained_tokens_per_s": 110.0,
      "hf_trained_tokens_per_s": 100.0, "padded_trained_tokens_per_s": 40.0, "ratio_vs_hf": 1.1, "ratio_vs_padded": 2.75}))
"""

FAKE_BROKEN = """
import sys
print("starting", file=sys.stderr)
raise SystemExit("boom: no data")
"""

FAKE_MFU = """
import json
print("BENCH_JSON " + json.dumps({"skipped": "no CUDA"}))
"""


def test_run_all_writes_summary_tables_and_plot(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    for name, src in (("pack", FAKE_PACK), ("train", FAKE_TRAIN), ("convert", FAKE_BROKEN), ("mfu", FAKE_MFU)):
        (bench / f"bench_{name}.py").write_text(textwrap.dedent(src))
    (bench / "helper.py").write_text("raise SystemExit('not a benchmark: must not run')\n")
    report = tmp_path / "out" / "REPORT.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--dir", str(bench), "--output", str(report), "--quick"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr  # one script failed
    assert "failed: convert" in proc.stderr
    text = report.read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "x |" in line or "failed" in line}
    # The last BENCH_JSON line counts; lengths/s = n / seconds; ratio and target from the mapping table.
    pack = rows["pack BFD (lengths/s)"]
    assert "2,500,000" in pack and "125,000" in pack and "20.00x" in pack and "| yes |" in pack
    assert "| pack 1M lengths (s) | 0.400 s |" in text and "| pack 1M lengths over bound (%) | 0.20% |" in text
    assert "1.10x" in rows["train vs HF Trainer (trained tokens/s)"] and "**no**" in rows["train vs HF Trainer (trained tokens/s)"]
    assert "2.75x" in rows["train vs padded batches (trained tokens/s)"]
    assert "failed (exit 1, no BENCH_JSON)" in text and "boom: no data" in text
    assert "skipped: no CUDA" in text
    assert "| lengths | method | seconds |" in text and "| 1,000,000 | ours BFD | 0.4 |" in text
    assert "git commit:" in text and "cpu:" in text and "with `--quick`" in text
    png = report.with_name("report_ratios.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"![ratios]({png.name})" in text
    blocks = [json.loads(b.split("```", 1)[0]) for b in text.split("```json")[1:]]
    assert {"skipped": "no CUDA"} in blocks
    assert next(b for b in blocks if b.get("bench") == "pack")["quick"] is True  # it declares --quick, so it got it

    # --rerun on a checkout without the logs: the others come back from their sections of the report it replaces
    import shutil

    assert (bench / "_work" / "run_all_logs" / "pack.stdout.log").is_file()  # the logs live beside the scripts
    shutil.rmtree(bench / "_work")
    (bench / "bench_pack.py").write_text("raise SystemExit('pack must not run again')\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--dir", str(bench), "--output", str(report),
         "--quick", "--rerun", "train"],
        capture_output=True, text=True, timeout=300,
    )
    again = report.read_text()
    assert "pack must not run again" not in again
    pack_again = next(x for x in again.splitlines() if x.startswith("| pack BFD (lengths/s)"))
    assert pack_again == pack  # the same figures, read back
    assert "(from the run of " in again.split("## pack", 1)[1].split("##", 1)[0]
    assert "(from the run of " not in again.split("## train", 1)[1].split("##", 1)[0]  # train ran again
