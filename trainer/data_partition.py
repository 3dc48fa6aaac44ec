"""Which global positions each (rank, dataloader worker) reads, step by step, with no duplicates and no gaps.

The epoch's global order (``trainer.data_order``) is consumed in *global batches* of ``global_batch_size``
positions: one optimizer step of the whole job. Step s of a pass that started at position ``start`` covers
positions ``[start + s*G, start + (s+1)*G)``; rank r owns the r-th contiguous slice of ``G / world_size``
positions of it and cuts it into micro-batches of ``micro_batch_size``. Because a step is defined by the
global batch alone, a run that stopped after any whole number of steps can resume with a different world
size (and a different micro-batch / accumulation split) as long as the global batch is the same, and still
read every row exactly once.

Dataloader workers take the rank's micro-batches round-robin: worker w yields micro-batches w, w+K, w+2K...
counted from the resume point. That is exactly the order in which ``torch.utils.data.DataLoader`` collects
batches from its workers, so the trainer sees the rank's micro-batches in order whatever ``num_workers`` is.

Remainder (the last ``L mod G`` positions of an epoch of length L):
* ``drop``: they are not read this epoch; ``plan_epoch`` reports how many (the next epoch is a new order).
* ``pad``: the last step is filled up to G with positions >= L, which map to the start of the epoch's order
  (``position mod L``) and are flagged ``is_padding``; the collate sets all their labels to -100, so they
  take part in the forward pass (every rank runs the same number of steps and none hangs in a collective)
  but never in the loss or the trainable-token count.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

Remainder = Literal["drop", "pad"]


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch is split: the same G for every world size is what makes elastic resume exact."""

    global_batch_size: int
    micro_batch_size: int
    world_size: int = 1
    remainder: Remainder = "drop"

    def __post_init__(self) -> None:
        g, b, w = self.global_batch_size, self.micro_batch_size, self.world_size
        if g <= 0 or b <= 0 or w <= 0:
            raise ValueError(
                f"global_batch_size, micro_batch_size and world_size must be > 0, got {g}, {b}, {w}"
            )
        if g % w:
            raise ValueError(f"global_batch_size {g} is not divisible by world_size {w}")
        if (g // w) % b:
            raise ValueError(
                f"rows per rank per step ({g}//{w} = {g // w}) is not divisible by micro_batch_size {b}"
            )
        if self.remainder not in ("drop", "pad"):
            raise ValueError(f"remainder must be 'drop' or 'pad', got {self.remainder!r}")

    @property
    def rows_per_rank(self) -> int:
        return self.global_batch_size // self.world_size

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches per rank per optimizer step (the gradient accumulation count)."""
        return self.rows_per_rank // self.micro_batch_size


@dataclass(frozen=True)
class EpochPlan:
    """What the rest of one epoch looks like from `start`: steps to run and rows dropped or padded."""

    epoch: int
    epoch_length: int
    start: int
    steps: int
    dropped: int
    padded: int


def plan_epoch(epoch: int, epoch_length: int, start: int, layout: BatchLayout) -> EpochPlan:
    """Steps left in an epoch of `epoch_length` positions when `start` of them are already consumed."""
    if not 0 <= start <= epoch_length:
        raise ValueError(f"start {start} outside the epoch [0, {epoch_length}]")
    left = epoch_length - start
    g = layout.global_batch_size
    if layout.remainder == "drop":
        steps, dropped, padded = left // g, left % g, 0
    else:
        steps = -(-left // g)
        dropped, padded = 0, steps * g - left
    return EpochPlan(epoch, epoch_length, start, steps, dropped, padded)


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of one rank: the global positions to read and where it sits in the run."""

    epoch: int
    step: int  # step index in the epoch (start // G + steps since the resume point); informational
    micro: int  # index of this micro-batch inside its step on this rank, 0..micro_batches_per_step-1
    positions: np.ndarray  # int64 [micro_batch_size], may be >= epoch_length for padding
    is_padding: np.ndarray  # bool [micro_batch_size]
    last_in_step: bool
    rows_after_step: int  # epoch positions consumed once this step completes (for the loader state)


def iter_micro_batches(
    epoch_length: int,
    layout: BatchLayout,
    rank: int,
    start_epoch: int,
    start_position: int,
    num_epochs: int | None,
    worker: int = 0,
    num_workers: int = 1,
) -> Iterator[MicroBatch]:
    """Yield this (rank, worker)'s micro-batches from the resume point through epoch `num_epochs - 1`.

    `num_epochs=None` runs forever. `num_workers` counts dataloader workers (use 1 for the main process).
    """
    if not 0 <= rank < layout.world_size:
        raise ValueError(f"rank {rank} outside [0, {layout.world_size})")
    if num_workers <= 0 or not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} outside [0, {num_workers})")
    g, b, per_step = layout.global_batch_size, layout.micro_batch_size, layout.micro_batches_per_step
    # Local index of the rank's micro-batches counted from the resume point; this worker takes i % K == w.
    # `offset` is the local index of the first micro-batch of the current epoch.
    offset = 0
    epoch, start = start_epoch, start_position
    while num_epochs is None or epoch < num_epochs:
        plan = plan_epoch(epoch, epoch_length, start, layout)
        if plan.steps == 0 and num_epochs is None and start == 0:
            raise ValueError(f"an epoch of {epoch_length} rows is shorter than one global batch of {g}")
        n_micro = plan.steps * per_step
        first = (worker - offset) % num_workers
        for i in range(first, n_micro, num_workers):
            s, m = divmod(i, per_step)
            base = start + s * g + rank * layout.rows_per_rank + m * b
            pos = np.arange(base, base + b, dtype=np.int64)
            pad = pos >= epoch_length
            yield MicroBatch(
                epoch=epoch,
                step=start // g + s,
                micro=m,
                positions=pos,
                is_padding=pad,
                last_in_step=m == per_step - 1,
                rows_after_step=min(start + (s + 1) * g, epoch_length),
            )
        offset += n_micro
        epoch, start = epoch + 1, 0
