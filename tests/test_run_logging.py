"""A run's logs as people read them: plain lines without a terminal, one metrics.jsonl per run with every step
once, report_to clients that work offline, and a loss plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.tiny_run import tiny_setup
from trainer.config import load_config
from trainer.loop import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("logs"), n_records=60, seq_length=64, layers=1)


def _sets(model_dir, data_dir, out, *extra):
    return [f"model.path={model_dir}", f"data.train=[{data_dir}]", f"logging.output_dir={out}",
            "train.max_steps=6", "train.lr=1e-3", *extra]


def test_without_a_terminal_each_logged_step_is_one_plain_line(tiny, repo_root):
    root, model_dir, data_dir = tiny
    out = root / "plain"
    args = [x for s in _sets(model_dir, data_dir, out, "logging.log_every=2") for x in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "cli.trainer", "run", *args], cwd=repo_root, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(repo_root)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "trainer.progress" in line]
    assert [line.split("| ")[0].split("step ")[1].strip() for line in lines] == ["2/6", "4/6", "6/6"]
    assert all(f" | {key} " in line for line in lines for key in ("loss", "lr", "tokens/s", "eta"))
    assert "\r" not in proc.stderr  # no progress bar redraws in a log file
    assert (out / "loss.png").stat().st_size > 1000 and "loss_plot" in proc.stderr


def test_metrics_belong_to_one_run_and_a_resume_keeps_each_step_once(tiny):
    root, model_dir, data_dir = tiny
    out = root / "resume"
    sets = _sets(model_dir, data_dir, out, "checkpoint.every_steps=4", "logging.progress_bar=false")
    train(load_config(None, sets))
    metrics = out / "metrics.jsonl"
    # As if killed after step 6 logged but before it was saved: the last checkpoint is step 4.
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-00000006")
    train(load_config(None, [*sets, "train.max_steps=8"]))
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 9))
    train(load_config(None, [*sets, "checkpoint.resume=none"]))  # a new run in the same directory
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, 7))


def test_report_to_tensorboard_wandb_and_mlflow_offline(tiny, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    for var in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    root, model_dir, data_dir = tiny
    out = root / "report"
    train(load_config(None, _sets(model_dir, data_dir, out, "logging.progress_bar=false",
                                  "logging.report_to=[tensorboard, wandb, mlflow]")))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(losses, rel=1e-6)

    client = mlflow.tracking.MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run = client.search_runs([client.get_experiment_by_name("sftkit").experiment_id])[0]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(losses)
    assert run.data.params["train.lr"] == "0.001"

    offline = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0


def test_a_named_client_that_is_not_installed_stops_the_run_before_it_starts(tiny, monkeypatch):
    from trainer.reporting import ReporterMissing

    monkeypatch.setitem(sys.modules, "swanlab", None)  # import swanlab -> ImportError
    root, model_dir, data_dir = tiny
    with pytest.raises(ReporterMissing, match="pip install swanlab"):
        train(load_config(None, _sets(model_dir, data_dir, root / "missing", "logging.report_to=swanlab")))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    result = train(load_config(None, _sets(model_dir, data_dir, root / "auto", "logging.progress_bar=false")))
    assert result.steps == 6 and not (root / "auto" / "tensorboard").exists()  # auto: only when installed
