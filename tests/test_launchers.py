"""The cluster launch example runs: examples/slurm/finetune.sbatch on this machine, with stand-ins for srun and
scontrol (one node, two processes), a real torchrun rendezvous and a real `trainer run` behind it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.tiny_run import make_tokenizer_and_model, pack_rows

pytestmark = [pytest.mark.slow, pytest.mark.dist]

FAKE_SRUN = """#!/bin/bash
# srun stand-in for one node: drop srun's own options, run the command once.
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") echo 127.0.0.1 ;;
  requeue*|"requeue $2") echo "$@" >> "$SCONTROL_LOG" ;;
esac
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: str, tmp_path: Path, repo_root: Path, steps: int, path: str = "",
            **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run a launch example for a tiny two-process run of `steps` steps into tmp_path/run, with `env` on top of
    what every launcher takes (PATH, PYTHONPATH, 2 processes, a free rendezvous port); `path` goes first on
    PATH. Fails with the launcher's stderr unless it exits 0; returns the process and the run's summary.json."""
    model_dir = make_tokenizer_and_model(tmp_path, layers=1)
    data_dir = pack_rows(model_dir, tmp_path / "data", n_records=40, seq_length=64)
    out = tmp_path / "run"
    env = dict(os.environ, PATH=f"{path}{Path(sys.executable).parent}:{os.environ['PATH']}",
               PYTHONPATH=str(repo_root), NPROC_PER_NODE="2", RDZV_PORT=str(_free_port()), **env)
    sets = [f"model.path={model_dir}", f"data.train=[{data_dir}]", f"logging.output_dir={out}",
            f"train.max_steps={steps}", "data.micro_batch_size=1"]
    proc = subprocess.run(["bash", script, *[x for s in sets for x in ("--set", s)]],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, json.loads((out / "summary.json").read_text())


def test_the_slurm_script_launches_a_two_process_run(tmp_path, repo_root):
    fakes = tmp_path / "bin"
    fakes.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fakes / name).write_text(text)
        (fakes / name).chmod(0o755)
    proc, summary = _launch("examples/slurm/finetune.sbatch", tmp_path, repo_root, 3, path=f"{fakes}:",
                            SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[01]", SLURM_NNODES="1",
                            SCONTROL_LOG=str(tmp_path / "scontrol.log"))
    assert summary["steps"] == 3
    assert "step 3/3" in proc.stderr  # plain per-step lines in the job log
    resolved = (tmp_path / "run" / "config.resolved.yaml").read_text()
    assert "max_steps: 3" in resolved
    assert not (tmp_path / "scontrol.log").exists()  # finished: nothing to requeue


def test_the_kubernetes_launcher_runs_pod_zero_of_a_one_pod_job(tmp_path, repo_root):
    _, summary = _launch("examples/kubernetes/launch.sh", tmp_path, repo_root, 2, NNODES="1",
                         RDZV_HOST="127.0.0.1", JOB_COMPLETION_INDEX="0", RUN_ID="test")
    assert summary["steps"] == 2 and summary["world_size"] == 2


def test_the_kubernetes_manifest_agrees_with_its_launcher(repo_root):
    import yaml

    from cli.common import EXIT_INTERRUPTED

    docs = list(yaml.safe_load_all((repo_root / "examples/kubernetes/finetune-job.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "Job")
    service = next(d for d in docs if d["kind"] == "Service")
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    name = job["metadata"]["name"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == int(env["NNODES"])
    # Pod i of an Indexed Job is <job>-<i>; the headless Service named as the pods' subdomain makes it resolvable.
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {"job-name": name}
    assert pod["subdomain"] == service["metadata"]["name"] and env["RDZV_HOST"] == f"{name}-0.{pod['subdomain']}"
    assert service["spec"]["ports"][0]["port"] == int(env["RDZV_PORT"])
    assert int(env["NPROC_PER_NODE"]) == container["resources"]["limits"]["nvidia.com/gpu"]
    launcher = repo_root / container["command"][0]
    assert launcher.is_file() and os.access(launcher, os.X_OK)
    retried = [r for r in job["spec"]["podFailurePolicy"]["rules"] if "onExitCodes" in r]
    assert retried and EXIT_INTERRUPTED in retried[0]["onExitCodes"]["values"] and retried[0]["action"] == "Ignore"
