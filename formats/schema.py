"""The packed-row Arrow schema and the constants that name this on-disk format.

Readers and writers both derive the schema from seq_length here, so a shard written by one version of the
code can be checked field by field against what a reader expects.
"""

from __future__ import annotations

import pyarrow as pa

FORMAT_NAME = "sftkit-packed"
# Bump when the on-disk layout or the manifest's meaning changes; readers refuse versions they do not know.
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST_NAME = "index.json"
IGNORE_INDEX = -100
CHECKSUM_ALGORITHM = "xxh3_128"
COMPRESSIONS = ("none", "zstd")
# Rows per Arrow record batch: small enough that decoding one batch for a random row is cheap even when
# zstd-compressed, large enough that the per-batch metadata stays negligible.
DEFAULT_BATCH_ROWS = 64
DEFAULT_SHARD_ROWS = 16384
# Rows are stored whole (seq_length int32 input ids and labels each), so a row costs 8 * seq_length bytes on
# disk and in every buffer however short its documents: 2**20 tokens (8 MiB a row) is the longest we accept.
MAX_SEQ_LENGTH = 1 << 20
# Bytes of rows a record batch may hold; for long rows the batch gets fewer rows so write buffers stay bounded.
MAX_BATCH_BYTES = 64 << 20


def bounded_batch_rows(batch_rows: int, seq_length: int) -> int:
    """`batch_rows`, lowered for very long rows so one record batch holds at most MAX_BATCH_BYTES of rows."""
    return max(1, min(int(batch_rows), MAX_BATCH_BYTES // (8 * int(seq_length))))


def row_schema(seq_length: int) -> pa.Schema:
    """One row = one training sequence of exactly seq_length tokens plus the documents packed into it."""
    if seq_length <= 0:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    return pa.schema(
        [
            pa.field("input_ids", pa.list_(pa.int32(), seq_length), nullable=False),
            pa.field("labels", pa.list_(pa.int32(), seq_length), nullable=False),
            pa.field("doc_lengths", pa.list_(pa.int32()), nullable=False),
            pa.field("doc_ids", pa.list_(pa.string()), nullable=False),
        ]
    )


def schema_description(seq_length: int) -> list[dict[str, str]]:
    """A JSON-friendly description of the schema for the manifest, so humans and other tools can read it."""
    return [{"name": f.name, "type": str(f.type)} for f in row_schema(seq_length)]


def shard_file_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"
