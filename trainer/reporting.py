"""Where a run's metrics go besides metrics.jsonl: TensorBoard, Weights & Biases, MLflow, SwanLab.

`logging.report_to` names them, as HF's `report_to` does. Every client is optional: `auto` (the default) means
TensorBoard when it is installed and nothing else; a client named explicitly must be installed, or the run stops
before it starts with the pip command to fix it. Each client runs without a network unless the user has set
one up: wandb in offline mode unless WANDB_MODE or WANDB_API_KEY says otherwise, MLflow into a file store in
the run directory unless MLFLOW_TRACKING_URI is set, SwanLab in local mode unless SWANLAB_MODE is set. Only
rank 0 reports.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Literal, Protocol

log = logging.getLogger(__name__)

ReportTo = Literal["auto", "none", "tensorboard", "wandb", "mlflow", "swanlab"]
_PIP = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny", "swanlab": "swanlab"}


class Reporter(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class ReporterMissing(RuntimeError):
    """A client named in logging.report_to is not installed."""


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class _TensorBoard:
    def __init__(self, out_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, out_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sftkit"), name=run_name, dir=str(out_dir),
                              config=config, mode=mode, reinit="finish_previous")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, out_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # A plain file store needs no server or database; MLflow 3 asks for an explicit opt-in to it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((out_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "sftkit"))
        self.run = mlflow.start_run(run_name=run_name)
        flat = {f"{section}.{key}": value for section, values in config.items() if isinstance(values, dict)
                for key, value in values.items()}
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _SwanLab:
    def __init__(self, out_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        import swanlab

        self.swanlab = swanlab
        self.run = swanlab.init(project="sftkit", experiment_name=run_name, config=config, logdir=str(out_dir / "swanlog"),
                                mode=os.environ.get("SWANLAB_MODE", "local"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.swanlab.log(metrics, step=step)

    def close(self) -> None:
        self.swanlab.finish()


_CLIENTS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow, "swanlab": _SwanLab}


def open_reporters(names: list[str], out_dir: Path, run_name: str, config: dict[str, Any]) -> list[Reporter]:
    """Start the clients `names` asks for (see the module docstring for `auto` and offline defaults)."""
    if "none" in names:
        return []
    wanted = [("tensorboard", False) if n == "auto" else (n, True) for n in dict.fromkeys(names)]
    out: list[Reporter] = []
    for name, explicit in wanted:
        try:
            out.append(_CLIENTS[name](out_dir, run_name, config))
        except ImportError as exc:
            if explicit:
                for reporter in out:
                    reporter.close()
                raise ReporterMissing(f"logging.report_to names {name}, which is not installed ({exc}); "
                                      f"pip install {_PIP[name]}, or remove it from report_to") from None
            log.info("tensorboard is not installed: writing metrics.jsonl only (pip install tensorboard)")
    return out


def report(reporters: list[Reporter], record: dict[str, Any]) -> None:
    """Send one metrics.jsonl record to every client; text values (sample predictions) go where text fits."""
    step = int(record.get("step", 0))
    numbers = _numbers(record)
    for reporter in reporters:
        if numbers:
            reporter.log(numbers, step)
        for key, value in record.items():
            if isinstance(value, str) and hasattr(reporter, "log_text"):
                reporter.log_text(key, value, step)
