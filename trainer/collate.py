"""Turn packed rows into the training batch the model consumes (CONTRACTS.md "Training batch").

Packed rows hold several documents; the model must treat each as its own sequence. So besides the tokens
we build, from each row's document lengths, ``position_ids`` that restart at 0 in every document (RoPE sees
each document from its own start) and ``cu_seqlens``, the segment boundaries over the flattened B*T tokens
that varlen attention uses so no token attends across documents. A row's padding tail is one more segment
(positions 0.. again) so it cannot attend into, or be attended by, the last real document.

Labels are pre-shifted by the packer and used as they are. Rows flagged ``is_padding`` (the remainder policy's
filler, see ``trainer.data_partition``) get all labels -100: they run through the forward pass so every rank
does the same work, but contribute neither loss nor trainable tokens.

Every array of a batch is a view into one memory block. A DataLoader worker hands a batch to the trainer by
moving each tensor's storage into shared memory and passing a file descriptor per storage; on a 2-core
machine that costs about 0.4 ms per storage, close to the 0.6 ms of reading and collating a whole 8 x 4096
micro-batch. One block per batch pays it once: handing over the same contents with 2 workers went from
2,450 to 5,400 rows/s, and the whole loader from ~1,800 to ~4,200 rows/s. Keeping one array of a batch
keeps its whole block (about 3 x B x T x 8 bytes) alive.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from formats.schema import IGNORE_INDEX

_ALIGN = 64  # bytes; every array in a batch block starts on a cache line
_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32, np.dtype(np.bool_): torch.bool}


class RowLike(Protocol):
    input_ids: np.ndarray
    labels: np.ndarray
    doc_lengths: np.ndarray


def segment_lengths(doc_lengths: Sequence[np.ndarray], seq_length: int) -> np.ndarray:
    """Lengths of all segments of the batch in order: each row's documents, then its padding tail if any.

    A plain loop: a micro-batch holds a few rows of at most a few dozen documents, where it is several
    times faster than vectorised numpy (measured 10 vs 49 us for 8 rows of 3 documents), and it runs once per
    micro-batch in every worker.
    """
    out: list[int] = []
    for r, d in enumerate(doc_lengths):
        lens = np.asarray(d).ravel().tolist()
        if lens and min(lens) < 0:
            raise ValueError(f"row {r}: negative document length in {lens}")
        used = sum(lens)
        if used > seq_length:
            raise ValueError(f"row {r}: document lengths sum to {used} > seq_length {seq_length}")
        out.extend(n for n in lens if n)  # a zero-length document is no segment
        if used < seq_length:
            out.append(seq_length - used)
    return np.array(out, dtype=np.int64)


def one_block(fields: Sequence[tuple[str, Any, tuple[int, ...]]]) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """Allocate arrays of the given (name, numpy dtype, shape) inside one buffer.

    Returns numpy views to fill and torch views of the same bytes, which share one storage: pickled across a
    process boundary it becomes one shared-memory segment (see the module docstring). Runs once per
    micro-batch, hence one strided view per field rather than a chain of slicing and reshaping.
    """
    places, total = [], 0
    for name, dtype, shape in fields:
        dt = np.dtype(dtype)
        if dt not in _TORCH_DTYPES:
            raise TypeError(f"{name}: dtype {dt} is not supported in a batch block")
        total = -(-total // _ALIGN) * _ALIGN
        count = math.prod(shape)
        places.append((name, dt, tuple(shape), total, count))
        total += count * dt.itemsize
    # From numpy, not torch.empty: torch's aligned allocation of ~1 MB blocks, interleaved with the reader's
    # small long-lived objects, fragmented the heap (anonymous memory grew ~0.4 MB per record batch read).
    raw = np.empty(-(-max(total, 1) // _ALIGN) * _ALIGN, dtype=np.uint8)  # whole multiple of every itemsize
    block = torch.from_numpy(raw)
    typed: dict[np.dtype, torch.Tensor] = {}
    arrays, tensors = {}, {}
    for name, dt, shape, offset, count in places:
        if dt not in typed:
            typed[dt] = block.view(_TORCH_DTYPES[dt])
        strides = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        tensors[name] = typed[dt].as_strided(shape, strides, offset // dt.itemsize)
        arrays[name] = raw[offset : offset + count * dt.itemsize].view(dt).reshape(shape)
    return arrays, tensors


def _batch_shape(input_ids: Any, labels: Any) -> tuple[int, int]:
    """(B, T) of two [B, T] arrays or two sequences of B rows of T, refusing anything ragged."""
    if isinstance(input_ids, np.ndarray) and isinstance(labels, np.ndarray):
        if input_ids.ndim != 2 or labels.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and labels must both be [B, T]; got {input_ids.shape} and {labels.shape}"
            )
        return input_ids.shape
    if not len(input_ids):
        raise ValueError("cannot collate an empty batch")
    shapes = {np.shape(r) for r in itertools.chain(input_ids, labels)}
    if len(input_ids) != len(labels) or len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(
            f"input_ids and labels must both be [B, T]; got {len(input_ids)} and {len(labels)} rows "
            f"of shapes {sorted(shapes)}"
        )
    return len(input_ids), next(iter(shapes))[0]


def _copy_rows(dst: np.ndarray, src: Any) -> None:
    if isinstance(src, np.ndarray):
        dst[...] = src
    else:
        for k, row in enumerate(src):
            dst[k] = row


_positions_base = np.arange(0, dtype=np.int64)


def _arange(n: int) -> np.ndarray:
    """0..n-1 from one cached array: the same few sizes recur every micro-batch."""
    global _positions_base
    if _positions_base.size < n:
        _positions_base = np.arange(n, dtype=np.int64)
        _positions_base.flags.writeable = False
    return _positions_base[:n]


def collate_packed(
    input_ids: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray | Sequence[np.ndarray],
    doc_lengths: Sequence[np.ndarray],
    is_padding: np.ndarray | None = None,
    extra: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Build the training batch from tokens, labels and each row's document lengths.

    Tokens and labels are [B, T] arrays or sequences of B rows (e.g. memory-mapped shard rows, copied
    straight into the batch with no intermediate stack). `extra` arrays (e.g. which dataset row each batch
    row came from) are copied into the same block under their own keys, so they cost nothing more to move
    between processes.
    """
    b, t = _batch_shape(input_ids, labels)
    if len(doc_lengths) != b:
        raise ValueError(f"{len(doc_lengths)} doc_lengths entries for {b} rows")
    pad = None
    if is_padding is not None:
        pad = np.asarray(is_padding, dtype=bool)
        if pad.shape != (b,):
            raise ValueError(f"is_padding must have shape ({b},), got {pad.shape}")
    seg = segment_lengths(doc_lengths, t)
    extra = {k: np.asarray(v) for k, v in (extra or {}).items()}
    fields = [
        ("input_ids", np.int64, (b, t)),
        ("labels", np.int64, (b, t)),
        ("position_ids", np.int64, (b, t)),
        ("cu_seqlens", np.int32, (seg.size + 1,)),
    ]
    for name, arr in extra.items():
        if any(name == f[0] for f in fields):
            raise ValueError(f"extra array {name!r} would replace the batch's own {name!r}")
        fields.append((name, arr.dtype, arr.shape))
    arrays, batch = one_block(fields)
    _copy_rows(arrays["input_ids"], input_ids)
    out_lab = arrays["labels"]
    _copy_rows(out_lab, labels)
    if pad is not None:
        out_lab[pad] = IGNORE_INDEX
    cu = arrays["cu_seqlens"]
    cu[0] = 0
    np.cumsum(seg, out=cu[1:])
    starts = np.repeat(cu[:-1].astype(np.int64), seg)
    np.subtract(_arange(b * t), starts, out=arrays["position_ids"].reshape(-1))
    for name, arr in extra.items():
        arrays[name][...] = arr
    batch["max_seqlen"] = int(seg.max()) if seg.size else 0
    batch["num_trainable"] = int(np.count_nonzero(out_lab != IGNORE_INDEX))
    return batch


def collate_rows(rows: Sequence[RowLike], is_padding: Sequence[bool] | None = None) -> dict[str, Any]:
    """`collate_fn` for a DataLoader over `PackedRow`s (e.g. a map-style view of a `PackedDataset`)."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    pad = None if is_padding is None else np.asarray(is_padding, dtype=bool)
    return collate_packed([r.input_ids for r in rows], [r.labels for r in rows], [r.doc_lengths for r in rows], pad)
