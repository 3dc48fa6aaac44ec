"""Per-step metrics: tokens/s, FLOPs counted honestly for packed attention, MFU, JSON Lines and TensorBoard.

Packed rows hold several documents that never attend to each other, so attention cost is the sum of
each document's causal square, not the square of the row length. Counting the row length would
inflate MFU; we count what is actually computed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

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
    """Appends one JSON object per logged step to metrics.jsonl (rank 0 only), and to TensorBoard if asked."""

    def __init__(self, path: Path | None, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        self._file = open(path, "a", encoding="utf-8") if path is not None else None
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                log.warning("logging.tensorboard is set but tensorboard is not installed; writing metrics.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            # NaN/Inf are not JSON: they are written as null (the record says why, e.g. "skipped").
            clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            self._file.write(json.dumps(clean, allow_nan=False) + "\n")
            self._file.flush()
        if self._tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


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
    metrics.jsonl, TensorBoard, the progress bar and the caller's `on_step`; rank 0 only writes."""

    def __init__(self, *, out_dir: Path, is_main: bool, device: torch.device, log_every: int, tensorboard: bool,
                 progress_bar: bool, start_step: int, total_steps: int,
                 on_step: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.log_every = log_every
        self.total_steps = total_steps
        self.device = device
        self.on_step = on_step
        self.peak = peak_flops(device)
        self.writer = MetricsWriter(out_dir / "metrics.jsonl" if is_main else None,
                                    out_dir / "tensorboard" if (is_main and tensorboard) else None)
        self.progress = None
        if is_main and progress_bar:
            from tqdm import tqdm

            self.progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self.timer = Throughput()
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
        if self.on_step is not None:
            self.on_step(record)

    def write(self, record: dict[str, Any]) -> None:
        self.writer.write(record)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.writer.close()
