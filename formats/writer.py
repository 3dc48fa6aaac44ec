"""Write packed rows into Arrow IPC shards, then publish the dataset atomically.

Everything goes into a sibling temp directory (`<out>.tmp-<token>`); shards are fsynced and hashed, the manifest
is written last, and only then is the temp directory renamed onto `<out>` (formats.atomic.publish_dir: the
previous dataset is moved aside, not deleted, until the new one is in place). A crash at any point leaves a
complete dataset -- the previous one or the new one, at `<out>` or moved aside where the next write restores it
-- and never a directory that looks like a finished dataset but is not.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from formats.atomic import StaleReport, fsync_path, remove_stale, temp_name
from formats.atomic import publish_dir as atomic_publish_dir
from formats.errors import FormatError
from formats.manifest import ShardInfo, build_manifest, hash_file, write_manifest
from formats.schema import (
    COMPRESSIONS,
    DEFAULT_BATCH_ROWS,
    DEFAULT_SHARD_ROWS,
    IGNORE_INDEX,
    MANIFEST_NAME,
    row_schema,
    shard_file_name,
)

log = logging.getLogger(__name__)


def check_target(out_dir: str | Path, overwrite: bool) -> None:
    """Fail early if `out_dir` may not be (re)placed: it exists without overwrite, or it is not a dataset
    (never replace a directory of someone's other files, even with overwrite)."""
    out = Path(out_dir)
    if not out.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    if not out.is_dir():
        raise FormatError(f"{out} exists and is not a directory; refusing to replace it")
    if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise FormatError(f"{out} is a non-empty directory that is not a dataset; refusing to replace it")


def temp_dir_for(out_dir: Path) -> Path:
    """A fresh sibling directory name to assemble a dataset in (`<out>.tmp-<pid>-<host>-<random>`)."""
    return temp_name(out_dir, "tmp")


def is_dataset_dir(path: Path) -> bool:
    """Whether `path` holds a manifest: the test for a complete copy when restoring after a crash."""
    return (path / MANIFEST_NAME).is_file()


def remove_stale_temp_dirs(out_dir: Path, *, assume_dead: bool = False) -> StaleReport:
    """Put back a complete dataset a dead writer had moved aside, and remove dead writers' leftovers."""
    return remove_stale(out_dir, is_complete=is_dataset_dir, assume_dead=assume_dead)


def publish_dir(tmp_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename a finished temp directory (manifest already inside) onto `out_dir`, replacing an old dataset
    only if `overwrite`; the old one is removed only after the new one is in place (formats.atomic)."""
    if out_dir.exists():
        check_target(out_dir, overwrite)  # it may have appeared while we were writing
    atomic_publish_dir(tmp_dir, out_dir, replace=overwrite)


class DatasetWriter:
    """Streams rows into shards of `shard_rows` rows, cut into record batches of `batch_rows` rows.

    Use as a context manager: leaving the block with an exception deletes the temp directory; call `finish()`
    inside the block to publish. Small record batches keep random access cheap for the reader (one batch is
    decoded per random row when shards are zstd-compressed).
    """

    def __init__(
        self,
        out_dir: str | Path,
        seq_length: int,
        pad_id: int,
        *,
        shard_rows: int = DEFAULT_SHARD_ROWS,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        compression: str = "none",
        overwrite: bool = False,
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        if shard_rows <= 0 or batch_rows <= 0:
            raise ValueError("shard_rows and batch_rows must be positive")
        self.out_dir = Path(out_dir).absolute()
        self.seq_length = int(seq_length)
        self.pad_id = int(pad_id)
        self.shard_rows = int(shard_rows)
        self.batch_rows = int(min(batch_rows, shard_rows))
        self.compression = compression
        self.overwrite = overwrite
        self.schema = row_schema(self.seq_length)
        self._options = pa.ipc.IpcWriteOptions(compression=None if compression == "none" else compression)
        self.stale = remove_stale_temp_dirs(self.out_dir)
        self._check_target()
        self.tmp_dir = temp_dir_for(self.out_dir)
        self.tmp_dir.mkdir(parents=True)
        self.shards: list[ShardInfo] = []
        self._sink: pa.NativeFile | None = None
        self._ipc: pa.ipc.RecordBatchFileWriter | None = None
        self._shard_counts = [0, 0, 0, 0]  # rows, tokens, docs, trainable of the open shard
        self._reset_buffer()
        self._closed = False

    # -- target handling -------------------------------------------------------------------------------
    def _check_target(self) -> None:
        check_target(self.out_dir, self.overwrite)

    # -- buffering -------------------------------------------------------------------------------------
    def _reset_buffer(self) -> None:
        self._buf_ids = np.empty((self.batch_rows, self.seq_length), dtype=np.int32)
        self._buf_labels = np.empty((self.batch_rows, self.seq_length), dtype=np.int32)
        self._buf_doc_lengths: list[np.ndarray] = []
        self._buf_doc_ids: list[str] = []
        self._buf_doc_counts = np.zeros(self.batch_rows, dtype=np.int32)
        self._buf_n = 0

    def write_row(
        self, input_ids: np.ndarray, labels: np.ndarray, doc_lengths: Sequence[int], doc_ids: Sequence[str]
    ) -> None:
        lengths = np.asarray(doc_lengths, dtype=np.int32)
        self.write_rows(
            np.asarray(input_ids, dtype=np.int32)[None, :],
            np.asarray(labels, dtype=np.int32)[None, :],
            lengths,
            np.array([0, len(lengths)], dtype=np.int64),
            list(doc_ids),
        )

    def write_rows(
        self,
        input_ids: np.ndarray,
        labels: np.ndarray,
        doc_lengths: np.ndarray,
        doc_offsets: np.ndarray,
        doc_ids: Sequence[str],
    ) -> None:
        """Append n rows. Row r's documents are doc_lengths[doc_offsets[r]:doc_offsets[r+1]] (CSR layout),
        with ids doc_ids[same slice]; this keeps per-row data out of Python lists on the hot path."""
        if self._closed:
            raise RuntimeError("writer is already finished or aborted")
        n = input_ids.shape[0]
        S = self.seq_length
        if input_ids.shape != (n, S) or labels.shape != (n, S):
            raise ValueError(f"rows must have shape (n, {S}); got {input_ids.shape} and {labels.shape}")
        doc_offsets = np.asarray(doc_offsets, dtype=np.int64)
        doc_lengths = np.asarray(doc_lengths, dtype=np.int32)
        if doc_offsets.shape != (n + 1,) or doc_offsets[-1] - doc_offsets[0] != len(doc_ids):
            raise ValueError("doc_offsets must have n+1 entries spanning exactly len(doc_ids) documents")
        counts = np.diff(doc_offsets)
        used = doc_lengths[doc_offsets[0] : doc_offsets[-1]]
        cum = np.zeros(len(used) + 1, dtype=np.int64)
        np.cumsum(used, out=cum[1:])
        rel = doc_offsets - doc_offsets[0]
        sums = cum[rel[1:]] - cum[rel[:-1]]
        if np.any(used <= 0) or np.any(sums > S):
            raise ValueError(f"every document length must be > 0 and each row's lengths must sum to <= {S}")
        start = 0
        while start < n:
            room = min(self.batch_rows - self._buf_n, self.shard_rows - self._shard_counts[0] - self._buf_n)
            k = min(room, n - start)
            b = self._buf_n
            self._buf_ids[b : b + k] = input_ids[start : start + k]
            self._buf_labels[b : b + k] = labels[start : start + k]
            lo, hi = doc_offsets[start], doc_offsets[start + k]
            self._buf_doc_lengths.append(doc_lengths[lo:hi])
            self._buf_doc_ids.extend(doc_ids[lo - doc_offsets[0] : hi - doc_offsets[0]])
            self._buf_doc_counts[b : b + k] = counts[start : start + k]
            self._buf_n += k
            start += k
            if self._buf_n == self.batch_rows or self._shard_counts[0] + self._buf_n == self.shard_rows:
                self._flush()

    def _flush(self) -> None:
        n = self._buf_n
        if n == 0:
            return
        S = self.seq_length
        ids = self._buf_ids[:n]
        labels = self._buf_labels[:n]
        lengths = np.concatenate(self._buf_doc_lengths) if self._buf_doc_lengths else np.zeros(0, np.int32)
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(self._buf_doc_counts[:n], out=offsets[1:])
        arrays = [
            pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), S),
            pa.FixedSizeListArray.from_arrays(pa.array(labels.reshape(-1)), S),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(lengths, type=pa.int32())),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(self._buf_doc_ids, type=pa.string())),
        ]
        batch = pa.RecordBatch.from_arrays(arrays, schema=self.schema)
        if self._ipc is None:
            self._open_shard()
        assert self._ipc is not None
        self._ipc.write_batch(batch)
        c = self._shard_counts
        c[0] += n
        c[1] += int(lengths.sum())
        c[2] += len(lengths)
        c[3] += int(np.count_nonzero(labels != IGNORE_INDEX))
        self._reset_buffer()
        if c[0] >= self.shard_rows:
            self._close_shard()

    # -- shards ----------------------------------------------------------------------------------------
    def _open_shard(self) -> None:
        path = self.tmp_dir / shard_file_name(len(self.shards))
        self._sink = pa.OSFile(str(path), "wb")
        self._ipc = pa.ipc.new_file(self._sink, self.schema, options=self._options)
        self._shard_counts = [0, 0, 0, 0]

    def _close_shard(self) -> None:
        if self._ipc is None:
            return
        assert self._sink is not None
        self._ipc.close()
        self._sink.close()
        path = self.tmp_dir / shard_file_name(len(self.shards))
        fsync_path(path)
        rows, tokens, docs, trainable = self._shard_counts
        self.shards.append(
            ShardInfo(
                file=path.name,
                rows=rows,
                tokens=tokens,
                docs=docs,
                trainable=trainable,
                bytes=path.stat().st_size,
                checksum=hash_file(path),
            )
        )
        self._ipc = None
        self._sink = None
        self._shard_counts = [0, 0, 0, 0]

    # -- publishing ------------------------------------------------------------------------------------
    def finish(
        self,
        *,
        tokenizer: Mapping[str, Any] | None = None,
        template: str | None = None,
        packing: Mapping[str, Any] | None = None,
        command: Sequence[str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Close the last shard, write the manifest, then rename the temp dir into place. Returns the manifest."""
        self._flush()
        self._close_shard()
        tok = {"fingerprint": "", "pad_id": self.pad_id}
        tok.update(tokenizer or {})
        tok["pad_id"] = self.pad_id
        manifest = build_manifest(
            seq_length=self.seq_length,
            shards=self.shards,
            tokenizer=tok,
            compression=self.compression,
            batch_rows=self.batch_rows,
            template=template,
            packing=packing,
            command=command,
            extra=extra,
        )
        write_manifest(self.tmp_dir, manifest)
        publish_dir(self.tmp_dir, self.out_dir, self.overwrite)
        self._closed = True
        log.info("wrote %d rows in %d shards to %s", manifest["num_rows"], len(self.shards), self.out_dir)
        return manifest

    def abort(self) -> None:
        """Drop everything written so far; the target directory is left as it was."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._ipc is not None:
                self._ipc.close()
            if self._sink is not None:
                self._sink.close()
        except (OSError, pa.ArrowException):
            pass
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._closed:
            self.abort()
