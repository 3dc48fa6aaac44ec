"""`dataprep convert` from the command line: exit codes, messages and the JSON summary pipelines read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from cli.dataprep import main

GOOD = {"instruction": "q", "output": "a"}


def invoke(*args: str):
    return CliRunner().invoke(main, ["convert", *args])


def write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_json_summary_and_output(tmp_path):
    src = write(tmp_path / "in.jsonl", [GOOD, {"instruction": "q"}, GOOD])
    out = tmp_path / "out.jsonl"
    result = invoke(str(src), "-o", str(out), "--on-error", "skip", "--rejects", str(tmp_path / "rej.jsonl"), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["records_in"] == 3 and summary["records_out"] == 2
    assert summary["skipped"] == {"missing_field": 1} and summary["skipped_total"] == 1
    assert summary["input_formats"] == {"alpaca": 1} and summary["output"] == str(out)
    assert summary["records_per_second"] > 0
    assert len(out.read_text().splitlines()) == 2
    assert json.loads((tmp_path / "rej.jsonl").read_text())["line"] == 2


def test_human_summary_goes_to_stderr(tmp_path):
    src = write(tmp_path / "in.jsonl", [GOOD])
    result = invoke(str(src), "-o", str(tmp_path / "o.jsonl"))
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "records_out:" in result.stderr and "dataprep convert" in result.stderr


def test_bad_data_exits_1_naming_file_and_line(tmp_path):
    src = write(tmp_path / "in.jsonl", [GOOD, GOOD, "{broken"])
    out = tmp_path / "o.jsonl"
    result = invoke(str(src), "-o", str(out))
    assert result.exit_code == 1
    assert f"error: {src}:3: invalid JSON" in result.stderr
    assert not out.exists()


def test_existing_output_exits_1_without_overwrite(tmp_path):
    src = write(tmp_path / "in.jsonl", [GOOD])
    out = tmp_path / "o.jsonl"
    out.write_text("x\n")
    result = invoke(str(src), "-o", str(out))
    assert result.exit_code == 1 and "--overwrite" in result.stderr and out.read_text() == "x\n"
    assert invoke(str(src), "-o", str(out), "--overwrite").exit_code == 0


def test_usage_errors_exit_2(tmp_path):
    src = write(tmp_path / "in.jsonl", [GOOD])
    out = str(tmp_path / "o.jsonl")
    cases = [
        [str(tmp_path / "missing.jsonl"), "-o", out],
        [str(tmp_path / "nomatch*.jsonl"), "-o", out],
        [str(src)],  # no -o
        ["-o", out],  # no input
        [str(src), "-o", out, "--input-format", "yaml"],
        [str(src), "-o", out, "--take", "0"],
        [str(src), "-o", out, "--rejects", str(tmp_path / "r.jsonl")],  # rejects without skip
        [str(tmp_path / "empty"), "-o", out],  # a directory with no data files in it
    ]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not data")
    for args in cases:
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
    assert not Path(out).exists()


def test_options_reach_the_library(tmp_path):
    src = write(tmp_path / "in.jsonl", [{"instruction": f"q{i}", "output": "a"} for i in range(20)])
    out = tmp_path / "o.json"
    result = invoke(
        str(src), "-o", str(out), "--take", "5", "--shuffle", "--seed", "4", "--system", "SYS",
        "--output-style", "mindformers", "--input-format", "alpaca", "--json",
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert len(rows) == 5 and {r["id"] for r in rows} == {f"in.jsonl:{i}" for i in range(1, 6)}
    assert all(r["conversations"][0] == {"from": "system", "value": "SYS"} for r in rows)
    assert json.loads(result.stdout)["stopped_at_take"] is True


def test_console_script_runs_as_a_process(tmp_path, repo_root):
    """The installed entry point (what users and Airflow call) works end to end on the shipped examples."""
    exe = Path(sys.executable).parent / "dataprep"
    out = tmp_path / "conv.jsonl"
    data = repo_root / "examples" / "data"
    proc = subprocess.run(
        [str(exe), "convert", str(data / "alpaca_example.json"), str(data / "src_tgt_example.jsonl"), "-o", str(out), "--json"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["records_out"] == 60
    assert len(out.read_text(encoding="utf-8").splitlines()) == 60


def test_dash_output_streams_records_to_stdout(tmp_path, repo_root):
    src = write(tmp_path / "in.jsonl", [GOOD, GOOD])
    proc = subprocess.run([sys.executable, "-m", "cli.dataprep", "convert", str(src), "-o", "-"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(repo_root), "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["messages"][1]["content"] for r in records] == ["a", "a"]
    assert "records_out" in proc.stderr and not (tmp_path / "-").exists()
    assert invoke(str(src), "-o", "-", "--json").exit_code == 2  # stdout cannot hold both
