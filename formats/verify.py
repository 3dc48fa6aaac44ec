"""Full integrity check of a packed dataset: every byte hashed, every row's invariants checked.

`open_dataset` checks cheap things (manifest, sizes, footers) so training starts fast; this module is the
thorough pass a pipeline runs once after packing or after copying data between machines.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from formats.errors import FormatError
from formats.manifest import hash_file, read_manifest, shard_file_problem
from formats.schema import IGNORE_INDEX, row_schema

_MAX_PER_KIND = 5


@dataclasses.dataclass
class VerifyReport:
    path: str
    problems: list[str] = dataclasses.field(default_factory=list)
    shards: int = 0
    rows: int = 0
    docs: int = 0
    tokens: int = 0
    trainable: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


class _Problems:
    """Collects problems, keeping a few examples per kind so one systematic fault does not flood the output."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.counts: dict[str, int] = {}

    def add(self, kind: str, message: str) -> None:
        n = self.counts.get(kind, 0)
        self.counts[kind] = n + 1
        if n < _MAX_PER_KIND:
            self.items.append(message)

    def finish(self) -> list[str]:
        out = list(self.items)
        for kind, n in self.counts.items():
            if n > _MAX_PER_KIND:
                out.append(f"... and {n - _MAX_PER_KIND} more problems of kind '{kind}'")
        return out


def _matrix(arr: pa.Array, seq_length: int) -> np.ndarray:
    """A fixed-size-list column as an [n, seq_length] view of its values (zero-copy for uncompressed shards)."""
    values = arr.values.slice(arr.offset * seq_length, len(arr) * seq_length)
    return values.to_numpy(zero_copy_only=False).reshape(-1, seq_length)


def _check_batch(
    rb: pa.RecordBatch,
    seq_length: int,
    pad_id: int,
    where: str,
    first_row: int,
    problems: _Problems,
    vocab_size: int | None = None,
) -> tuple[int, int, int]:
    """Check one record batch's rows; returns (tokens, docs, trainable).

    The invariants the trainer relies on: token ids in [0, vocab_size); labels -100 or the next input token;
    no label at a document's last position (so none crosses into the next document); documents positive and
    summing to at most seq_length; padding untrained and holding pad_id.
    """
    S = seq_length
    for col in rb.columns:
        if col.null_count:
            problems.add("nulls", f"{where}: rows {first_row}..{first_row + rb.num_rows - 1} contain nulls")
            return 0, 0, 0
    n = rb.num_rows
    ids = _matrix(rb.column(0), S)
    labels = _matrix(rb.column(1), S)
    lo, hi = (int(ids.min()), int(ids.max())) if ids.size else (0, 0)
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        bad_rows = np.nonzero(np.any((ids < 0) | (ids >= (vocab_size or np.iinfo(np.int32).max)), axis=1))[0]
        limit = f"[0, {vocab_size})" if vocab_size is not None else "non-negative"
        for r in bad_rows:
            row = ids[r]
            pos = int(np.nonzero((row < 0) | (row >= (vocab_size or np.iinfo(np.int32).max)))[0][0])
            problems.add(
                "token_id_range",
                f"{where} row {first_row + r}: token id {int(row[pos])} at position {pos} is not in {limit}",
            )
    # Labels need no range check of their own: each is -100, or must equal the next (range-checked) input id,
    # and the last position is a document end or padding, both checked below.
    dl = rb.column(2)
    di = rb.column(3)
    offsets = dl.offsets.to_numpy().astype(np.int64)
    offsets -= offsets[0]
    lengths = dl.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    counts = np.diff(offsets)
    id_counts = np.diff(di.offsets.to_numpy().astype(np.int64))
    bad = np.nonzero(counts != id_counts)[0]
    for r in bad:
        problems.add(
            "doc_ids", f"{where} row {first_row + r}: {counts[r]} doc lengths but {id_counts[r]} doc ids"
        )
    if np.any(lengths <= 0):
        r = int(np.searchsorted(offsets, int(np.nonzero(lengths <= 0)[0][0]), side="right") - 1)
        problems.add("doc_length", f"{where} row {first_row + r}: a document length is <= 0")
        return 0, 0, 0
    cum = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cum[1:])
    sums = cum[offsets[1:]] - cum[offsets[:-1]]
    for r in np.nonzero(sums > S)[0]:
        problems.add("overflow", f"{where} row {first_row + r}: documents sum to {sums[r]} > seq_length {S}")
    if np.any(sums > S):
        return int(sums.sum()), len(lengths), int(np.count_nonzero(labels != IGNORE_INDEX))
    if np.any(counts == 0):
        for r in np.nonzero(counts == 0)[0]:
            problems.add("empty_row", f"{where} row {first_row + r}: row holds no documents")
    # Each document's last position predicts nothing inside its own document, so its label must be -100.
    row_of_doc = np.repeat(np.arange(n), counts)
    doc_end = cum[1:] - cum[offsets[:-1]][row_of_doc] - 1
    end_labels = labels[row_of_doc, doc_end]
    for d in np.nonzero(end_labels != IGNORE_INDEX)[0][: _MAX_PER_KIND + 1]:
        problems.add(
            "label_at_doc_end",
            f"{where} row {first_row + row_of_doc[d]}: label at document end (position {doc_end[d]}) is "
            f"{end_labels[d]}, expected {IGNORE_INDEX} (a label would cross into the next document)",
        )
    # Labels are pre-shifted: a trained position i must predict exactly the next token.
    trained = labels[:, :-1] != IGNORE_INDEX
    for r in np.nonzero(np.any(trained & (labels[:, :-1] != ids[:, 1:]), axis=1))[0]:
        problems.add(
            "label_not_next_token",
            f"{where} row {first_row + r}: a label differs from the next input token (labels must be pre-shifted)",
        )
    pad = np.arange(S)[None, :] >= sums[:, None]
    for r in np.nonzero(np.any(pad & (labels != IGNORE_INDEX), axis=1))[0]:
        problems.add(
            "label_in_padding", f"{where} row {first_row + r}: padding has labels other than {IGNORE_INDEX}"
        )
    for r in np.nonzero(np.any(pad & (ids != pad_id), axis=1))[0]:
        problems.add(
            "pad_id", f"{where} row {first_row + r}: padding holds tokens other than pad_id {pad_id}"
        )
    return int(sums.sum()), len(lengths), int(np.count_nonzero(labels != IGNORE_INDEX))


def _vocab_size(manifest: dict, vocab_size: int | None) -> int | None:
    if vocab_size is not None:
        return int(vocab_size)
    recorded = manifest.get("tokenizer", {}).get("vocab_size")
    return int(recorded) if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0 else None


def _check_shard_file(path: Path, shard: dict, problems: _Problems, listed: dict) -> Path | None:
    """Presence, containment, size and checksum of one shard; the file when its bytes can be trusted."""
    file = path / shard["file"]
    problem = shard_file_problem(path, shard, listed)
    if problem is not None:
        problems.add("missing_shard", problem)
        return None
    size = file.stat().st_size
    if size != shard["bytes"]:
        problems.add("size", f"{file}: size {size} bytes, manifest says {shard['bytes']}")
    digest = hash_file(file)
    if digest != shard["checksum"]:
        problems.add("checksum", f"{file}: checksum {digest} does not match manifest {shard['checksum']}")
        return None
    return file


def verify_checksums(path: str | Path, *, progress: bool = False) -> list[str]:
    """Re-hash every shard against the manifest (and check it is present, inside the dataset and of the
    recorded size); returns the problems, empty when every byte is as packed. Reads each shard once."""
    problems = _Problems()
    try:
        manifest = read_manifest(path)
    except FormatError as exc:
        return [str(exc)]
    listed: dict = {}
    for shard in tqdm(manifest["shards"], desc="checksums", unit="shard", disable=not progress):
        _check_shard_file(Path(path), shard, problems, listed)
    if not manifest["shards"]:
        problems.add("empty", f"{path}: the manifest lists no shards (an empty dataset)")
    return problems.finish()


def verify_dataset(path: str | Path, progress: bool = False, *, vocab_size: int | None = None) -> VerifyReport:
    """Check everything; never raises for a bad dataset, the problems are listed in the report instead.

    `vocab_size` bounds the token ids (default: the tokenizer vocab size the manifest records, if any); the
    trainer passes its model's embedding size.
    """
    report = VerifyReport(path=str(path))
    problems = _Problems()
    try:
        manifest = read_manifest(path)
    except FormatError as exc:
        report.problems = [str(exc)]
        return report
    S = manifest["seq_length"]
    pad_id = manifest["tokenizer"]["pad_id"]
    batch_rows = manifest["batch_rows"]
    vocab = _vocab_size(manifest, vocab_size)
    schema = row_schema(S)
    id_chunks: list[pa.Array] = []
    shards = manifest["shards"]
    if not shards:
        problems.add("empty", f"{path}: the manifest lists no shards (an empty dataset)")
    listed: dict = {}
    for shard in tqdm(shards, desc="verify", unit="shard", disable=not progress):
        file = _check_shard_file(Path(path), shard, problems, listed)
        if file is None:
            continue  # contents are untrustworthy; row checks would only add noise
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(file), "r"))
            if not reader.schema.equals(schema):
                problems.add(
                    "schema", f"{file}: schema {reader.schema} is not the row schema for seq_length {S}"
                )
                continue
            rows = tokens = docs = trainable = 0
            for b in range(reader.num_record_batches):
                rb = reader.get_batch(b)
                if rb.num_rows != batch_rows and b != reader.num_record_batches - 1:
                    problems.add(
                        "batch", f"{file}: record batch {b} has {rb.num_rows} rows, expected {batch_rows}"
                    )
                t, d, tr = _check_batch(rb, S, pad_id, str(file), rows, problems, vocab)
                rows += rb.num_rows
                tokens += t
                docs += d
                trainable += tr
                id_chunks.append(rb.column(3).flatten())
        except (pa.ArrowInvalid, OSError) as exc:
            problems.add("unreadable", f"{file}: cannot read as Arrow IPC ({exc})")
            continue
        report.shards += 1
        for key, value in (("rows", rows), ("tokens", tokens), ("docs", docs), ("trainable", trainable)):
            if value != shard[key]:
                problems.add("counts", f"{file}: {key}={value} but manifest says {shard[key]}")
        report.rows += rows
        report.tokens += tokens
        report.docs += docs
        report.trainable += trainable
    if id_chunks:
        all_ids = pa.chunked_array(id_chunks, type=pa.string())
        if pc.count_distinct(all_ids).as_py() != len(all_ids):
            vc = pc.value_counts(all_ids)
            dup = vc.filter(pc.greater(vc.field("counts"), 1))
            for item in dup.to_pylist()[:_MAX_PER_KIND]:
                problems.add("duplicate_id", f"source id {item['values']!r} appears {item['counts']} times")
            if len(dup) > _MAX_PER_KIND:
                problems.add("duplicate_id", f"{len(dup)} source ids appear more than once in total")
    expected_docs = manifest.get("packing", {}).get("stats", {}).get("samples_out")
    if expected_docs is not None and expected_docs != report.docs and not problems.items:
        problems.add(
            "incomplete",
            f"{path}: {report.docs} documents in shards but packing reported {expected_docs} samples",
        )
    report.problems = problems.finish()
    return report


VerifyLevel = Literal["full", "checksums", "off"]


def require_valid(
    path: str | Path, *, vocab_size: int | None = None, level: VerifyLevel = "full", progress: bool = False
) -> list[str]:
    """Raise FormatError (one line: the first problems and how many) unless the dataset passes `level`.

    full: checksums and every row invariant (`verify_dataset`); checksums: bytes only (`verify_checksums`);
    off: nothing. Returns the (empty) problem list so callers can log what was checked.
    """
    if level == "off":
        return []
    if level == "checksums":
        found = verify_checksums(path, progress=progress)
    elif level == "full":
        found = verify_dataset(path, progress, vocab_size=vocab_size).problems
    else:
        raise ValueError(f"level must be full, checksums or off, got {level!r}")
    if found:
        shown = "; ".join(found[:3])
        more = f" (and {len(found) - 3} more; `dataprep verify {path}` lists them)" if len(found) > 3 else ""
        raise FormatError(f"{path}: dataset fails verification: {shown}{more}")
    return found
