"""Per-step metrics: tokens/s, FLOPs counted honestly for packed attention, MFU, JSON Lines and TensorBoard.

Packed rows hold several documents that never attend to each other, so attention cost is the sum of
each document's causal square, not the square of the row length. Counting the row length would
inflate MFU; we count what is actually computed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
# The per-step lines of runs without a terminal; the CLI shows this logger at its default verbosity.
progress_log = logging.getLogger("trainer.progress")

# Dense bf16 peak (no sparsity) by device name fragment, in FLOP/s.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in a matmul per token: every >=2-D weight except the input embedding lookup."""
    total = 0
    for name, param in model.named_parameters():
        if param.ndim >= 2 and "embed_tokens" not in name:
            total += param.numel()
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        # A tied head is a real matmul even though its weight is the embedding table.
        for name, param in model.named_parameters():
            if "embed_tokens" in name:
                total += param.numel()
    return total


def training_flops(n_matmul_params: int, tokens: int, doc_len_sq_sum: int, n_layers: int, attn_dim: int) -> float:
    """FLOPs of forward + backward (3x forward) for `tokens` tokens.

    Matmuls: 2 FLOPs per multiply-add per parameter per token. Attention: QK^T and AV are each
    2 * attn_dim FLOPs per (query, key) pair, and causal attention over a document of length L has
    about L^2 / 2 pairs.
    """
    forward = 2.0 * n_matmul_params * tokens + n_layers * 2 * 2 * attn_dim * doc_len_sq_sum / 2
    return 3.0 * forward


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    except ImportError:  # pragma: no cover - non-POSIX
        return None


class MetricsWriter:
    """metrics.jsonl of this run (rank 0 only) plus the `logging.report_to` clients.

    The file belongs to one run: a fresh start replaces it, and a resumed run keeps only the records up to the
    step it resumed from (rewritten atomically), so every step appears once even after a kill and a resume.
    """

    def __init__(self, path: Path | None, start_step: int = 0, reporters: list[Any] | None = None) -> None:
        self.path = path
        self.reporters = reporters or []
        self._file = None
        if path is not None:
            _keep_steps_up_to(path, start_step)
            self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            # NaN/Inf are not JSON: they are written as null (the record says why, e.g. "skipped").
            clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            self._file.write(json.dumps(clean, allow_nan=False) + "\n")
            self._file.flush()
        from trainer.reporting import report

        report(self.reporters, record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        for reporter in self.reporters:
            reporter.close()


def _keep_steps_up_to(path: Path, step: int) -> None:
    """Drop the records after `step` (all of them for a fresh start) before a run appends its own."""
    if not path.exists():
        return
    kept = []
    if step > 0:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    kept.append(line + "\n")
            except (ValueError, AttributeError):  # a line torn by a kill mid-write: it belongs to no step
                continue
    from formats.writer import fsync_path

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_metrics(metrics_path: Path, png_path: Path) -> Path | None:
    """Loss (and eval loss) and learning rate over steps as one PNG; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no loss plot (pip install matplotlib)")
        return None
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None and "eval_loss" not in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    lrs = [(r["step"], r["lr"]) for r in rows if r.get("lr") is not None]
    if not train:
        return None
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    ax_loss.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if evals:
        ax_loss.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if lrs:
        ax_lr.plot(*zip(*lrs, strict=True), color="tab:green", linewidth=1.2)
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


class Throughput:
    """Wall-clock between logged steps, so tokens/s covers data loading, forward, backward and the update."""

    def __init__(self) -> None:
        self._t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._t = now - self._t, now
        return elapsed


@dataclass
class StepStats:
    """What one optimizer step did, as the loop measured it."""

    loss: float  # mean token loss over the global batch
    grad_norm: float
    lr: float  # the learning rate this step used
    trainable_tokens: int  # over the whole global batch
    flops: float  # this rank's forward + backward FLOPs


class StepLogger:
    """Decides when a step is logged (every `log_every` steps and the last one) and writes the record to
    metrics.jsonl, the report_to clients, the caller's `on_step`, and the terminal: a tqdm bar when stderr is a
    terminal, else (an Airflow/Slurm log, `progress_bar: false`) one plain line per logged step. Rank 0 only."""

    def __init__(self, *, out_dir: Path, is_main: bool, device: torch.device, log_every: int, progress_bar: bool,
                 start_step: int, total_steps: int, reporters: list[Any] | None = None,
                 on_step: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.log_every = log_every
        self.start_step = start_step
        self.total_steps = total_steps
        self.device = device
        self.on_step = on_step
        self.peak = peak_flops(device)
        self.writer = MetricsWriter(out_dir / "metrics.jsonl" if is_main else None, start_step,
                                    reporters if is_main else None)
        self.progress = None
        self.lines = is_main and not (progress_bar and sys.stderr.isatty())
        if is_main and not self.lines:
            from tqdm import tqdm

            self.progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self.timer = Throughput()
        self.started = time.perf_counter()
        self.window_tokens = 0.0
        self.window_flops = 0.0

    def step_done(self, step: int, stats: StepStats, epoch: int) -> None:
        self.window_tokens += stats.trainable_tokens
        self.window_flops += stats.flops
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{stats.loss:.4f}")
        if step % self.log_every and step != self.total_steps:
            return
        elapsed = self.timer.lap()
        record = {
            "step": step,
            "loss": stats.loss,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "trainable_tokens": stats.trainable_tokens,
            "tokens_per_s": self.window_tokens / elapsed if elapsed > 0 else 0.0,
            "peak_memory_gib": peak_memory_gib(self.device),
            "epoch": epoch,
        }
        if self.peak is not None and elapsed > 0:
            # window_flops counts this rank's micro-batches; every rank does the same amount of work.
            record["mfu"] = self.window_flops / elapsed / self.peak
        self.window_tokens = self.window_flops = 0.0
        self.writer.write(record)
        if self.lines:
            progress_log.info("%s", self._line(record))
        if self.on_step is not None:
            self.on_step(record)

    def _line(self, r: dict[str, Any]) -> str:
        done = r["step"] - self.start_step
        per_step = (time.perf_counter() - self.started) / done if done > 0 else 0.0
        parts = [f"step {r['step']}/{self.total_steps}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.3e}",
                 f"grad_norm {r['grad_norm']:.3f}", f"tokens/s {r['tokens_per_s']:,.0f}",
                 f"trainable {r['trainable_tokens']:,}"]
        if r.get("peak_memory_gib") is not None:
            parts.append(f"peak_mem {r['peak_memory_gib']:.2f} GiB")
        if "mfu" in r:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        parts.append(f"eta {_duration(per_step * (self.total_steps - r['step']))}")
        return " | ".join(parts)

    def write(self, record: dict[str, Any]) -> None:
        self.writer.write(record)
        if self.lines and "eval_loss" in record:
            progress_log.info("step %d | eval_loss %.4f", record["step"], record["eval_loss"])

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.writer.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
