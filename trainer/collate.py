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
    """Lengths of all segments of the batch in order: each row's documents, then its padding tail if any."""
    parts: list[np.ndarray] = []
    for r, lengths in enumerate(doc_lengths):
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.size and lengths.min() < 0:
            raise ValueError(f"row {r}: negative document length in {lengths.tolist()}")
        lengths = lengths[lengths > 0]
        used = int(lengths.sum())
        if used > seq_length:
            raise ValueError(f"row {r}: document lengths sum to {used} > seq_length {seq_length}")
        parts.append(lengths)
        if used < seq_length:
            parts.append(np.array([seq_length - used], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


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
