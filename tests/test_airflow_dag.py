"""The example Airflow DAG runs green under a real Airflow: convert -> 3 mapped pack tasks -> merge -> verify
-> train, on the repository's example data with a tiny model built here.

Slow (installs Apache Airflow into its own virtual environment the first time, a few minutes; then about a
minute), so it is skipped unless SFTKIT_RUN_AIRFLOW=1. The venv is kept in ~/.cache/sftkit (override with
SFTKIT_AIRFLOW_VENV) and reused while it holds the pinned Airflow version. Airflow only runs the BashOperators;
the commands come from this test's own environment (the DAG's `sftkit_bin` param), so the Airflow venv
needs neither sftkit nor torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

AIRFLOW_VERSION = "3.3.2"
REPO = Path(__file__).resolve().parents[1]
DAG_FILE = REPO / "examples" / "airflow" / "sft_pipeline_dag.py"

pytestmark = [
    pytest.mark.airflow,
    pytest.mark.skipif(
        os.environ.get("SFTKIT_RUN_AIRFLOW") != "1",
        reason="installs and runs Apache Airflow (minutes); set SFTKIT_RUN_AIRFLOW=1 to run it",
    ),
]


def airflow_venv() -> Path:
    venv = Path(
        os.environ.get("SFTKIT_AIRFLOW_VENV", Path.home() / ".cache" / "sftkit" / f"airflow-{AIRFLOW_VERSION}")
    )
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import airflow; print(airflow.__version__)"]
    if python.exists() and subprocess.run(probe, capture_output=True, text=True).stdout.strip() == AIRFLOW_VERSION:
        return venv
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    # The official constraints files live outside PyPI; the pinned release resolves cleanly from PyPI alone.
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"apache-airflow=={AIRFLOW_VERSION}"],
        check=True,
        timeout=1800,
    )
    assert subprocess.run(probe, capture_output=True, text=True).stdout.strip() == AIRFLOW_VERSION
    return venv


def build_tiny_model(root: Path) -> Path:
    from cli.tiny_model import build_tiny_model as make_model
    from dataprep.convert import ConvertOptions, ConvertStats, iter_conversations
    from trainer.tiny_model import TinyShape

    data = [str(p) for p in sorted((REPO / "examples" / "data").iterdir())]
    records = list(iter_conversations(data, ConvertOptions(), ConvertStats()))
    shape = TinyShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, max_position_embeddings=512)
    return make_model(records, root / "model", vocab_size=512, shape=shape, tokenizer_dir=root / "tokenizer")


def test_dag_runs_end_to_end_under_airflow(tmp_path):
    venv = airflow_venv()
    model = build_tiny_model(tmp_path)
    work = tmp_path / "work"
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow_home"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FILE.parent),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}",
    }
    env.pop("PYTHONPATH", None)
    airflow = str(venv / "bin" / "airflow")
    migrate = subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True, text=True, timeout=600)
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
    conf = {
        "repo_dir": str(REPO),
        "work_dir": str(work),
        "sftkit_bin": str(Path(sys.executable).parent),
        "model": str(model),
        "seq_length": 128,
        "partitions": 3,
        "max_steps": 4,
    }
    cmd = [airflow, "dags", "test", "sft_pipeline", "-f", str(DAG_FILE), "-c", json.dumps(conf)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    log = run.stdout + run.stderr
    (tmp_path / "airflow_dags_test.log").write_text(log)
    print("\n".join(line for line in log.splitlines() if "[DAG TEST]" in line or "DagRun Finished" in line))
    assert run.returncode == 0, log[-6000:]

    ended = [f"end task task_id={t} map_index=-1" for t in ("convert", "partition_envs", "merge", "verify", "train")]
    ended += [f"end task task_id=pack_partition map_index={i}" for i in range(3)]  # three mapped pack tasks
    for line in ended:
        assert line in log, line
    assert log.count("Command exited with return code 0") == 7
    assert "state=success" in log and '"reused": false' in log
    from formats.reader import open_dataset
    from formats.verify import verify_dataset

    parts = [work / "parts" / f"p{i}" for i in range(3)]
    merged = open_dataset(work / "data")
    assert [m["partition"]["index"] for m in merged.manifest["merged_from"]] == [0, 1, 2]
    assert merged.manifest["num_docs"] == sum(open_dataset(p).manifest["num_docs"] for p in parts)
    stats = merged.manifest["packing"]["stats"]
    assert stats["records_in"] == 60  # 40 Alpaca + 20 src/tgt records, each read once for the whole job
    assert merged.manifest["num_docs"] + sum(stats["dropped"].values()) + sum(stats["skipped"].values()) == 60
    assert verify_dataset(work / "data").ok
    metrics = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(m.get("step", 0) for m in metrics) == 4

    # Run the whole DAG again, as a retry would: pack and merge find their outputs and reuse them.
    fingerprint = merged.fingerprint
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    log2 = again.stdout + again.stderr
    (tmp_path / "airflow_dags_test_rerun.log").write_text(log2)
    assert again.returncode == 0, log2[-6000:]
    assert log2.count('"reused": true') == 4 and '"reused": false' not in log2  # 3 pack tasks + merge
    assert open_dataset(work / "data").fingerprint == fingerprint
