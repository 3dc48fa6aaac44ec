"""Random access to a packed dataset without loading it: memory-mapped Arrow IPC shards.

Row i is found with two binary searches (shard, then record batch) over cumulative row offsets; for
uncompressed shards the returned arrays are zero-copy views into the page cache, so a DataLoader worker
touches only the pages it reads. Training reads (`row_tokens`) of uncompressed shards go straight to the
mapped bytes by offset, remembering four integers per record batch, so memory stays flat however many rows a
dataset has; a small LRU of decoded batches serves zstd shards and `row`/`take`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from formats.errors import FormatError
from formats.manifest import dataset_fingerprint, hash_file, read_manifest, shard_file_problem
from formats.schema import row_schema

log = logging.getLogger(__name__)

_BATCH_CACHE = 8


@dataclasses.dataclass(frozen=True)
class PackedRow:
    """One training row. Arrays may be read-only views into the memory map; copy before writing to them."""

    input_ids: np.ndarray  # int32 [seq_length]
    labels: np.ndarray  # int32 [seq_length], pre-shifted, -100 = not trained
    doc_lengths: np.ndarray  # int32 [k]
    doc_ids: list[str]


@dataclasses.dataclass(frozen=True)
class _Batch:
    input_ids: np.ndarray  # [n, S]
    labels: np.ndarray  # [n, S]
    doc_offsets: np.ndarray  # [n + 1]
    doc_lengths: np.ndarray  # flat
    doc_ids: pa.Array  # flat strings


def _fixed_list_matrix(arr: pa.Array, seq_length: int) -> np.ndarray:
    # Slicing the child array directly is zero-copy; `flatten()` goes through pyarrow.compute and costs
    # about as much as the read itself for small batches.
    values = arr.values.slice(arr.offset * seq_length, len(arr) * seq_length)
    return values.to_numpy(zero_copy_only=False).reshape(-1, seq_length)


class PackedDataset:
    """A finished dataset directory opened for reading. Create it with `open_dataset`.

    Picklable: a copy sent to a worker process re-opens (and re-maps) the shards there, without re-hashing.
    """

    def __init__(self, path: str | Path, verify: bool = False) -> None:
        self.path = Path(path)
        self.manifest: dict[str, Any] = read_manifest(self.path)
        m = self.manifest
        self.seq_length: int = m["seq_length"]
        self.pad_id: int = m["tokenizer"]["pad_id"]
        self.tokenizer_fingerprint: str = m["tokenizer"]["fingerprint"]
        self.fingerprint: str = dataset_fingerprint(m)
        self._schema = row_schema(self.seq_length)
        self._readers: list[pa.ipc.RecordBatchFileReader] = []
        # Uncompressed shards: the whole memory-mapped file as bytes, so rows are read by offset (row_tokens).
        self._bytes: list[np.ndarray | None] = []
        plain = m.get("compression", "none") == "none"
        batch_starts: list[int] = [0]
        self._batch_loc: list[tuple[int, int]] = []  # global batch -> (shard, batch in shard)
        listed: dict[Path, set[str]] = {}
        for s, shard in enumerate(m["shards"]):
            file = self.path / shard["file"]
            problem = shard_file_problem(self.path, shard, listed)
            if problem is not None:
                raise FormatError(problem)
            size = file.stat().st_size
            if size != shard["bytes"]:
                raise FormatError(
                    f"{file}: size {size} bytes, manifest says {shard['bytes']} (truncated or replaced)"
                )
            if verify:
                digest = hash_file(file)
                if digest != shard["checksum"]:
                    raise FormatError(
                        f"{file}: checksum {digest} does not match manifest {shard['checksum']}"
                    )
            try:
                mapped = pa.memory_map(str(file), "r")
                reader = pa.ipc.open_file(mapped)
            except (pa.ArrowInvalid, OSError) as exc:
                raise FormatError(f"{file}: not a readable Arrow IPC file ({exc})") from exc
            if not reader.schema.equals(self._schema):
                raise FormatError(
                    f"{file}: schema {reader.schema} does not match seq_length {self.seq_length}"
                )
            # The writer cuts every shard into full batches of batch_rows plus one shorter tail, so batch
            # boundaries follow from the manifest without decoding (which zstd batches would need).
            rows, per_batch = shard["rows"], m["batch_rows"]
            expected = -(-rows // per_batch)
            if reader.num_record_batches != expected:
                raise FormatError(
                    f"{file}: has {reader.num_record_batches} record batches, expected {expected} for {rows} rows"
                )
            for b in range(expected):
                batch_starts.append(batch_starts[-1] + min(per_batch, rows - b * per_batch))
                self._batch_loc.append((s, b))
            self._readers.append(reader)
            self._bytes.append(np.frombuffer(mapped.read_buffer(), dtype=np.uint8) if plain else None)
        self._batch_starts = np.asarray(batch_starts, dtype=np.int64)
        self._cache: OrderedDict[int, _Batch] = OrderedDict()
        # Where each record batch's arrays start in its (uncompressed) shard, found on first use; -1 = not yet.
        self._where = np.full((len(self._batch_loc), 4), -1, dtype=np.int64)

    # -- pickling: re-open in the receiving process instead of shipping memory maps --------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], verify=False)  # type: ignore[misc]

    def __len__(self) -> int:
        return int(self._batch_starts[-1])

    def __repr__(self) -> str:
        return f"PackedDataset({str(self.path)!r}, rows={len(self)}, seq_length={self.seq_length})"

    @property
    def num_shards(self) -> int:
        return len(self._readers)

    def _batch(self, g: int) -> _Batch:
        cached = self._cache.get(g)
        if cached is not None:
            self._cache.move_to_end(g)
            return cached
        s, b = self._batch_loc[g]
        rb = self._readers[s].get_batch(b)
        expected = int(self._batch_starts[g + 1] - self._batch_starts[g])
        if rb.num_rows != expected:
            file = self.path / self.manifest["shards"][s]["file"]
            raise FormatError(f"{file}: record batch {b} has {rb.num_rows} rows, expected {expected}")
        dl = rb.column(2)
        batch = _Batch(
            input_ids=_fixed_list_matrix(rb.column(0), self.seq_length),
            labels=_fixed_list_matrix(rb.column(1), self.seq_length),
            doc_offsets=dl.offsets.to_numpy(),
            doc_lengths=dl.values.to_numpy(),
            doc_ids=rb.column(3).values,
        )
        self._cache[g] = batch
        if len(self._cache) > _BATCH_CACHE:
            self._cache.popitem(last=False)
        return batch

    def _offsets(self, g: int) -> list[int]:
        """Byte offsets in its shard of batch g's input_ids, labels, doc offsets and doc lengths.

        Found once per record batch from Arrow's own decoding, then kept as four integers: a cache of decoded
        batches grows by kilobytes of Python and Arrow objects per batch (tens of MB at a million rows), and
        evicting it makes a random read decode a batch every time (about 3x slower).
        """
        where = self._where[g]
        if where[0] < 0:
            s, b = self._batch_loc[g]
            rb = self._readers[s].get_batch(b)
            base = self._bytes[s].ctypes.data  # type: ignore[union-attr]
            ids, labels, docs = rb.column(0), rb.column(1), rb.column(2)
            t = self.seq_length
            where[:] = (
                ids.values.buffers()[1].address + 4 * (ids.values.offset + ids.offset * t) - base,
                labels.values.buffers()[1].address + 4 * (labels.values.offset + labels.offset * t) - base,
                docs.buffers()[1].address + 4 * docs.offset - base,
                docs.values.buffers()[1].address + 4 * docs.values.offset - base,
            )
            size = self._bytes[s].size  # type: ignore[union-attr]
            if where.min() < 0 or where.max() > size:  # not a view into this mapping: never expected
                file = self.path / self.manifest["shards"][s]["file"]
                raise FormatError(f"{file}: record batch {b} does not lie inside the mapped file")
        return where.tolist()

    def row_tokens(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, labels, doc_lengths) of row `i` as read-only views: what a training loader needs.

        Unlike `row`, it skips the document ids, whose conversion from Arrow costs more than the rest, and for
        uncompressed shards it reads straight from the memory map by offset, keeping 32 bytes per record batch.
        """
        g, r = self._locate(int(i))
        s = self._batch_loc[g][0]
        data = self._bytes[s]
        if data is None:  # zstd: decode the batch (kept in a small LRU)
            batch = self._batch(g)
            lo, hi = int(batch.doc_offsets[r]), int(batch.doc_offsets[r + 1])
            return batch.input_ids[r], batch.labels[r], batch.doc_lengths[lo:hi]
        ids_at, labels_at, offsets_at, lengths_at = self._offsets(g)
        row_bytes = 4 * self.seq_length
        lo, hi = data[offsets_at + 4 * r : offsets_at + 4 * r + 8].view(np.int32).tolist()
        return (
            data[ids_at + r * row_bytes : ids_at + (r + 1) * row_bytes].view(np.int32),
            data[labels_at + r * row_bytes : labels_at + (r + 1) * row_bytes].view(np.int32),
            data[lengths_at + 4 * lo : lengths_at + 4 * hi].view(np.int32),
        )

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} out of range for dataset of {n} rows")
        g = int(np.searchsorted(self._batch_starts, i, side="right")) - 1
        return g, i - int(self._batch_starts[g])

    def row(self, i: int) -> PackedRow:
        g, r = self._locate(int(i))
        batch = self._batch(g)
        lo, hi = int(batch.doc_offsets[r]), int(batch.doc_offsets[r + 1])
        return PackedRow(
            input_ids=batch.input_ids[r],
            labels=batch.labels[r],
            doc_lengths=batch.doc_lengths[lo:hi],
            doc_ids=batch.doc_ids[lo:hi].to_pylist(),
        )

    def __getitem__(self, i: int) -> PackedRow:
        return self.row(i)

    def iter_rows(self, start: int = 0, stop: int | None = None) -> Iterator[PackedRow]:
        stop = len(self) if stop is None else min(stop, len(self))
        for i in range(max(start, 0), stop):
            yield self.row(i)

    def take(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """input_ids and labels of many rows as two fresh [n, seq_length] int32 arrays, one copy per batch touched."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"indices out of range for dataset of {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        out_ids = np.empty((idx.size, self.seq_length), dtype=np.int32)
        out_labels = np.empty((idx.size, self.seq_length), dtype=np.int32)
        g_of = np.searchsorted(self._batch_starts, idx, side="right") - 1
        order = np.argsort(g_of, kind="stable")
        groups, starts = np.unique(g_of[order], return_index=True)
        bounds = np.append(starts, idx.size)
        for k, g in enumerate(groups):
            sel = order[bounds[k] : bounds[k + 1]]
            local = idx[sel] - self._batch_starts[g]
            batch = self._batch(int(g))
            out_ids[sel] = batch.input_ids[local]
            out_labels[sel] = batch.labels[local]
        return out_ids, out_labels


def open_dataset(path: str | Path, verify: bool = False) -> PackedDataset:
    """Open a finished dataset. Raises FormatError for a missing/unknown-version manifest, a missing shard, a
    size or schema mismatch, and (with verify=True) any shard whose bytes do not hash to the manifest checksum."""
    return PackedDataset(path, verify=verify)
