"""Turn packed rows into the training batch the model consumes (CONTRACTS.md "Training batch").

Packed rows hold several documents; the model must treat each as its own sequence. So besides the tokens
we build, from each row's document lengths, ``position_ids`` that restart at 0 in every document (RoPE sees
each document from its own start) and ``cu_seqlens``, the segment boundaries over the flattened B*T tokens
that varlen attention uses so no token attends across documents. A row's padding tail is one more segment
(positions 0.. again) so it cannot attend into, or be attended by, the last real document.

Labels are pre-shifted by the packer and used as they are. Rows flagged ``is_padding`` (the remainder policy's
filler, see ``trainer.data_partition``) get all labels -100: they run through the forward pass so every rank
does the same work, but contribute neither loss nor trainable tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

IGNORE_INDEX = -100


class RowLike(Protocol):
    input_ids: np.ndarray
    labels: np.ndarray
    doc_lengths: np.ndarray


def segment_lengths(doc_lengths: Sequence[np.ndarray], seq_length: int) -> np.ndarray:
    """Lengths of all segments of the batch in order: each row's documents, then its padding tail if any.

    Vectorised over the batch (no per-row numpy calls): this runs once per micro-batch in every worker.
    """
    b = len(doc_lengths)
    counts = np.fromiter((len(x) for x in doc_lengths), dtype=np.int64, count=b)
    lens = (
        np.concatenate([np.asarray(x, dtype=np.int64).reshape(-1) for x in doc_lengths])
        if b
        else np.zeros(0, np.int64)
    )
    row_of = np.repeat(np.arange(b), counts)
    if lens.size and lens.min() < 0:
        r = int(row_of[np.argmax(lens < 0)])
        raise ValueError(f"row {r}: negative document length in {np.asarray(doc_lengths[r]).tolist()}")
    used = np.bincount(row_of, weights=lens, minlength=b).astype(np.int64)
    if b and used.max() > seq_length:
        r = int(np.argmax(used > seq_length))
        raise ValueError(f"row {r}: document lengths sum to {used[r]} > seq_length {seq_length}")
    keep = lens > 0  # a zero-length document is no segment
    lens, row_of = lens[keep], row_of[keep]
    tails = seq_length - used
    has_tail = tails > 0
    # Row r's segments start at starts[r]: its documents in order, then the tail (if any).
    per_row = np.bincount(row_of, minlength=b) + has_tail
    starts = np.concatenate([[0], np.cumsum(per_row)[:-1]]) if b else np.zeros(0, np.int64)
    out = np.empty(int(per_row.sum()), dtype=np.int64)
    first_doc = np.concatenate([[0], np.cumsum(np.bincount(row_of, minlength=b))[:-1]]) if b else starts
    out[starts[row_of] + np.arange(lens.size) - first_doc[row_of]] = lens
    out[(starts + per_row - 1)[has_tail]] = tails[has_tail]
    return out


def collate_packed(
    input_ids: np.ndarray,
    labels: np.ndarray,
    doc_lengths: Sequence[np.ndarray],
    is_padding: np.ndarray | None = None,
) -> dict[str, Any]:
    """Build the training batch from [B, T] token and label arrays and each row's document lengths."""
    ids = np.asarray(input_ids)
    lab = np.array(labels, dtype=np.int64, copy=True)
    if ids.ndim != 2 or lab.shape != ids.shape:
        raise ValueError(f"input_ids and labels must both be [B, T]; got {ids.shape} and {lab.shape}")
    b, t = ids.shape
    if len(doc_lengths) != b:
        raise ValueError(f"{len(doc_lengths)} doc_lengths entries for {b} rows")
    if is_padding is not None:
        pad = np.asarray(is_padding, dtype=bool)
        if pad.shape != (b,):
            raise ValueError(f"is_padding must have shape ({b},), got {pad.shape}")
        lab[pad] = IGNORE_INDEX
    seg = segment_lengths(doc_lengths, t)
    cu = np.zeros(seg.size + 1, dtype=np.int64)
    np.cumsum(seg, out=cu[1:])
    positions = np.arange(b * t, dtype=np.int64) - np.repeat(cu[:-1], seg)
    return {
        "input_ids": torch.from_numpy(ids.astype(np.int64)),
        "labels": torch.from_numpy(lab),
        "position_ids": torch.from_numpy(positions.reshape(b, t)),
        "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
        "max_seqlen": int(seg.max()) if seg.size else 0,
        "num_trainable": int((lab != IGNORE_INDEX).sum()),
    }


def collate_rows(rows: Sequence[RowLike], is_padding: Sequence[bool] | None = None) -> dict[str, Any]:
    """`collate_fn` for a DataLoader over `PackedRow`s (e.g. a map-style view of a `PackedDataset`)."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    ids = np.stack([np.asarray(r.input_ids) for r in rows])
    lab = np.stack([np.asarray(r.labels) for r in rows])
    pad = None if is_padding is None else np.asarray(is_padding, dtype=bool)
    return collate_packed(ids, lab, [r.doc_lengths for r in rows], pad)
