"""Streaming, deterministic, resumable training data over packed dataset directories.

Every (rank, dataloader worker) computes on its own, from the manifests alone, which rows it reads: the global
order comes from ``trainer.data_order`` (pure in fingerprints, seed and epoch) and the split from
``trainer.data_partition`` (global batches -> ranks -> micro-batches -> workers round-robin). No shared memory,
no coordination, and the shards are memory-mapped by ``formats.reader`` inside each worker, so nothing is
loaded into memory and the object pickles in a few hundred bytes.

The dataset yields finished micro-batches (``trainer.collate`` output) rather than rows, so use it with
``DataLoader(ds, batch_size=None, num_workers=K)``: a worker reads and collates a whole micro-batch, and the
DataLoader's in-order round-robin over workers gives the trainer the rank's micro-batches in order.

Resume with prefetching workers
-------------------------------
Workers run ahead of the trainer, so the dataset cannot know from inside a worker what the trainer really
consumed. Instead each batch says where it sits (``batch["loader"]``: epoch, step, whether it ends its
step, and how many rows of the epoch the whole job has consumed once that step completes). After the
optimizer step the trainer calls ``ds.mark_consumed(batch)`` on *its* copy of the dataset (the main
process one), which moves a cursor only when a step is complete; ``ds.state_dict()`` returns that cursor.
Prefetched-but-unused batches therefore never count, and a checkpoint taken after step s resumes at the
first row of step s+1 on any world size with the same global batch. Re-iterating the dataset (or a new
DataLoader after ``load_state_dict``) starts at the cursor.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from formats.errors import FormatError
from formats.reader import PackedDataset, open_dataset
from trainer.collate import collate_packed
from trainer.data_order import ORDER_VERSION, GlobalOrder, Source
from trainer.data_partition import (
    BatchLayout,
    EpochPlan,
    MicroBatch,
    Remainder,
    iter_micro_batches,
    plan_epoch,
)
from trainer.remote_cache import fetch_dataset, is_url

log = logging.getLogger(__name__)

STATE_VERSION = 1
_LOOKUP_ROWS = 1024  # rows whose order is computed in one vectorised call


class DatasetMismatchError(FormatError):
    """The packed data does not fit the model/run (seq_length, tokenizer) or each other."""


class LoaderStateError(FormatError):
    """A saved loader state does not belong to this data/order, so resuming from it would be wrong."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the loader keeps of one dataset directory (the handle itself is opened lazily per process)."""

    path: str
    num_rows: int
    fingerprint: str
    seq_length: int
    tokenizer_fingerprint: str
    format_version: int


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _as_paths(paths: str | Path | Sequence[str | Path]) -> list[str]:
    if isinstance(paths, (str, Path)):
        return [str(paths)]
    out = [str(p) for p in paths]
    if not out:
        raise ValueError("at least one dataset directory is needed")
    return out


class PackedIterableDataset(IterableDataset):
    """Micro-batches of one rank over one or several packed datasets; see the module docstring.

    `global_batch_size` is rows per optimizer step over the whole job (micro_batch_size * grad_accum_steps
    * world_size); keeping it fixed is what allows resuming on another world size. `epochs=None` iterates
    forever (stop on max steps); otherwise iteration ends after epoch `epochs - 1`. A path may be a URL
    (s3://, gs://, file://...): it is fetched once into `cache_dir` with every shard checksum-verified.
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        *,
        global_batch_size: int,
        micro_batch_size: int,
        weights: Sequence[float] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        remainder: Remainder = "drop",
        epochs: int | None = 1,
        samples_per_epoch: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        expected_seq_length: int | None = None,
        expected_tokenizer_fingerprint: str | None = None,
        verify: bool = False,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (then torch.distributed decides)")
        if rank is None or world_size is None:
            rank, world_size = _dist_rank_world()
        self.rank, self.world_size = int(rank), int(world_size)
        self.layout = BatchLayout(global_batch_size, micro_batch_size, self.world_size, remainder)
        if epochs is not None and epochs < 0:
            raise ValueError(f"epochs must be >= 0 or None, got {epochs}")
        self.epochs = epochs
        self._handles: list[PackedDataset] | None = None
        self._handles_pid = 0
        local = [str(fetch_dataset(p, cache_dir)) if is_url(p) else p for p in _as_paths(paths)]
        handles = [open_dataset(p, verify=verify) for p in local]
        # Reading one row here loads pyarrow's lazily imported modules (about a second) once in the parent,
        # so forked dataloader workers inherit them instead of each paying it before their first batch.
        handles[0].row(0)
        self.infos = tuple(
            DatasetInfo(
                path=str(h.path),
                num_rows=len(h),
                fingerprint=h.fingerprint,
                seq_length=h.seq_length,
                tokenizer_fingerprint=h.tokenizer_fingerprint,
                format_version=int(h.manifest["format"]["version"]),
            )
            for h in handles
        )
        self._check_compatible(expected_seq_length, expected_tokenizer_fingerprint)
        self.seq_length = self.infos[0].seq_length
        self.order = GlobalOrder(
            [Source(i.num_rows, i.fingerprint) for i in self.infos],
            seed=seed,
            shuffle=shuffle,
            weights=weights,
            samples_per_epoch=samples_per_epoch,
        )
        if self.order.epoch_length < self.layout.global_batch_size and remainder == "drop":
            raise DatasetMismatchError(
                f"an epoch has {self.order.epoch_length} rows, fewer than one global batch of "
                f"{self.layout.global_batch_size}: with remainder='drop' nothing would be trained (use 'pad')"
            )
        self._epoch, self._start = 0, 0  # the consumption cursor: next unseen row of the job
        self._steps_consumed = 0

    # ---------------------------------------------------------------- checks and description
    def _check_compatible(self, seq_length: int | None, tokenizer_fp: str | None) -> None:
        first = self.infos[0]
        for info in self.infos:
            if seq_length is not None and info.seq_length != seq_length:
                raise DatasetMismatchError(
                    f"{info.path}: packed with seq_length {info.seq_length}, but the run expects {seq_length}; "
                    f"re-pack it with --seq-length {seq_length}"
                )
            if tokenizer_fp is not None and info.tokenizer_fingerprint != tokenizer_fp:
                scheme = (info.tokenizer_fingerprint or "").split(":")[0]
                older = (f" (its fingerprint is of the older '{scheme}' kind: re-pack it with this sftkit)"
                         if scheme != tokenizer_fp.split(":")[0] else "")
                raise DatasetMismatchError(
                    f"{info.path}: tokenized with tokenizer {info.tokenizer_fingerprint or '<unknown>'}, "
                    f"but the model's tokenizer is {tokenizer_fp}; re-pack it with the model's tokenizer{older}"
                )
            if info.seq_length != first.seq_length:
                raise DatasetMismatchError(
                    f"{info.path}: seq_length {info.seq_length} differs from {first.path} ({first.seq_length})"
                )
            if info.tokenizer_fingerprint != first.tokenizer_fingerprint:
                raise DatasetMismatchError(
                    f"{info.path}: tokenizer {info.tokenizer_fingerprint} differs from {first.path} "
                    f"({first.tokenizer_fingerprint}); datasets mixed in one run must share a tokenizer"
                )

    @property
    def epoch_length(self) -> int:
        return self.order.epoch_length

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """Steps, dropped and padded rows of `epoch` (default: the current one, from the cursor)."""
        if epoch is None or epoch == self._epoch:
            return plan_epoch(self._epoch, self.epoch_length, self._start, self.layout)
        return plan_epoch(epoch, self.epoch_length, 0, self.layout)

    def describe(self) -> dict[str, Any]:
        """A summary for the run log: sizes, per-dataset draws per epoch, and what the remainder costs."""
        full = plan_epoch(0, self.epoch_length, 0, self.layout)
        return {
            "datasets": [
                {"path": i.path, "rows": i.num_rows, "draws_per_epoch": c}
                for i, c in zip(self.infos, self.order.counts, strict=True)
            ],
            "rows_per_epoch": self.epoch_length,
            "steps_per_epoch": full.steps,
            "rows_dropped_per_epoch": full.dropped,
            "rows_padded_per_epoch": full.padded,
            "global_batch_size": self.layout.global_batch_size,
            "micro_batches_per_step": self.layout.micro_batches_per_step,
        }

    def __len__(self) -> int:
        """Micro-batches this rank yields from the cursor to the end (only with a finite `epochs`)."""
        if self.epochs is None:
            raise TypeError("an endless dataset (epochs=None) has no length")
        steps = sum(self.plan(e).steps for e in range(self._epoch, self.epochs))
        return steps * self.layout.micro_batches_per_step

    # ---------------------------------------------------------------- reading
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = None  # workers open (memory-map) the shards themselves, lazily
        return state

    def _open(self) -> list[PackedDataset]:
        # Re-open after a fork too: each process maps the shards itself (as a spawned worker would).
        if self._handles is None or self._handles_pid != os.getpid():
            handles = [open_dataset(i.path) for i in self.infos]
            for h, info in zip(handles, self.infos, strict=True):
                if h.fingerprint != info.fingerprint:
                    raise DatasetMismatchError(
                        f"{info.path}: the dataset changed on disk since the loader was built"
                    )
            self._handles, self._handles_pid = handles, os.getpid()
        return self._handles

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if self.rank == 0 and worker == 0:
            plan = self.plan()
            log.info(
                "loader: epoch %d from row %d of %d: %d steps, %d rows dropped, %d padded",
                plan.epoch,
                plan.start,
                plan.epoch_length,
                plan.steps,
                plan.dropped,
                plan.padded,
            )
        length = self.epoch_length
        micro_batches = iter_micro_batches(
            length, self.layout, self.rank, self._epoch, self._start, self.epochs, worker, num_workers
        )
        # Look rows up for many micro-batches at once: the permutation is vectorised, so this amortises its
        # fixed per-call cost (it is the same pure function either way).
        chunk = max(1, _LOOKUP_ROWS // self.layout.micro_batch_size)
        while block := list(itertools.islice(micro_batches, chunk)):
            positions = np.concatenate([mb.positions for mb in block]) % length
            epochs = np.repeat([mb.epoch for mb in block], self.layout.micro_batch_size)
            src = np.empty_like(positions)
            rows = np.empty_like(positions)
            for e in np.unique(epochs):
                sel = epochs == e
                src[sel], rows[sel] = self.order.lookup(int(e), positions[sel])
            b = self.layout.micro_batch_size
            for k, mb in enumerate(block):
                yield self._batch(mb, src[k * b : (k + 1) * b], rows[k * b : (k + 1) * b])

    def _batch(self, mb: MicroBatch, src: np.ndarray, rows: np.ndarray) -> dict[str, Any]:
        handles = self._open()
        # Zero-copy views of the memory-mapped rows; collate copies each once, into the batch block.
        ids, labels, doc_lengths = zip(
            *(handles[j].row_tokens(r) for j, r in zip(src.tolist(), rows.tolist(), strict=True)), strict=True
        )
        # Provenance travels in the batch's one memory block (see trainer.collate): separate tensors would
        # each cost a shared-memory segment per micro-batch when a DataLoader worker hands the batch over.
        provenance = {"sample_source": src, "sample_row": rows, "sample_is_padding": mb.is_padding}
        batch = collate_packed(ids, labels, doc_lengths, mb.is_padding, extra=provenance)
        batch["loader"] = {
            "epoch": mb.epoch,
            "step": mb.step,
            "micro": mb.micro,
            "last_in_step": mb.last_in_step,
            "rows_after_step": mb.rows_after_step,
        }
        return batch

    # ---------------------------------------------------------------- state
    def mark_consumed(self, batch: Mapping[str, Any]) -> None:
        """Tell the dataset the trainer finished with `batch` (call after the optimizer step that used it).

        Only a batch that ends its step moves the cursor, so a checkpoint never lands inside a step.
        """
        where = batch["loader"]
        if not where["last_in_step"]:
            return
        epoch, start = int(where["epoch"]), int(where["rows_after_step"])
        if (epoch, start) < (self._epoch, self._start):
            raise LoaderStateError(
                f"batch of epoch {epoch} ending at row {start} is older than the cursor "
                f"(epoch {self._epoch}, row {self._start}); batches must be marked in order"
            )
        if start >= self.epoch_length or plan_epoch(epoch, self.epoch_length, start, self.layout).steps == 0:
            epoch, start = (
                epoch + 1,
                0,
            )  # the epoch is done (its remainder, if dropped, is reported by plan())
        self._epoch, self._start = epoch, start
        self._steps_consumed += 1

    def state_dict(self) -> dict[str, Any]:
        """The next unseen row of the whole job plus what identifies the order; small and JSON-friendly."""
        return {
            "version": STATE_VERSION,
            "order_version": ORDER_VERSION,
            "epoch": self._epoch,
            "rows_consumed_in_epoch": self._start,  # global: summed over all ranks
            "steps_consumed": self._steps_consumed,  # since this dataset object started (informational)
            "seed": self.order.seed,
            "shuffle": self.order.shuffle,
            "weights": None if self.order.weights is None else list(self.order.weights),
            "epoch_length": self.epoch_length,
            "global_batch_size": self.layout.global_batch_size,
            "remainder": self.layout.remainder,
            "fingerprints": [i.fingerprint for i in self.infos],
            "format_versions": [i.format_version for i in self.infos],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue at the saved cursor. Refuses a state from other data, seed, shuffle, mix or order version.

        A different world size or micro-batch split is fine; a different global batch is refused: the steps
        after the saved one would not be the ones an uninterrupted run takes.
        """
        required = (
            "version",
            "order_version",
            "epoch",
            "rows_consumed_in_epoch",
            "seed",
            "shuffle",
            "weights",
            "epoch_length",
            "global_batch_size",
            "fingerprints",
        )
        missing = [k for k in required if k not in state]
        if missing:
            raise LoaderStateError(f"loader state is missing {missing}")
        if state["version"] != STATE_VERSION:
            raise LoaderStateError(f"loader state version {state['version']} is not {STATE_VERSION}")
        mine = self.state_dict()
        for key, what in (
            ("order_version", "the row-order algorithm"),
            ("fingerprints", "the dataset contents"),
            ("seed", "the seed"),
            ("shuffle", "shuffle"),
            ("weights", "the mixing weights"),
            ("epoch_length", "samples per epoch"),
        ):
            if _plain(state[key]) != _plain(mine[key]):
                raise LoaderStateError(
                    f"cannot resume: {what} changed (checkpoint {state[key]!r}, now {mine[key]!r}); "
                    "the saved position would point into a different order"
                )
        epoch, start = state["epoch"], state["rows_consumed_in_epoch"]
        if not (
            isinstance(epoch, int)
            and isinstance(start, int)
            and epoch >= 0
            and 0 <= start <= self.epoch_length
        ):
            raise LoaderStateError(f"invalid position in loader state: epoch {epoch!r}, row {start!r}")
        if state["global_batch_size"] != self.layout.global_batch_size:
            raise LoaderStateError(
                f"cannot resume: the global batch changed (checkpoint {state['global_batch_size']} rows per step, "
                f"now {self.layout.global_batch_size}; micro_batch_size x grad_accum_steps x world size). Exact "
                "resume needs the same global batch: keep it, or start over"
            )
        self._epoch, self._start = epoch, start
        self._steps_consumed = int(state.get("steps_consumed", 0))


def _plain(value: Any) -> Any:
    """Compare tuples and lists alike (a state may have round-tripped through JSON)."""
    return list(value) if isinstance(value, (list, tuple)) else value
