"""The training batch built from packed rows, checked against transformers' own packed-sequence collator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.collate import IGNORE_INDEX, collate_packed, collate_rows

transformers = pytest.importorskip("transformers")


@st.composite
def packed_batches(draw):
    """Random rows: documents of random length filling a random part of each row, the rest padding."""
    t = draw(st.integers(1, 40))
    b = draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    doc_lengths = []
    for _ in range(b):
        lengths, room = [], t
        while room and draw(st.booleans()):
            n = draw(st.integers(1, room))
            lengths.append(n)
            room -= n
        doc_lengths.append(np.array(lengths, dtype=np.int32))
    ids = rng.integers(0, 1000, size=(b, t), dtype=np.int32)
    labels = np.where(rng.random((b, t)) < 0.5, IGNORE_INDEX, rng.integers(0, 1000, size=(b, t))).astype(
        np.int32
    )
    return ids, labels, doc_lengths


def _hf_reference(ids: np.ndarray, doc_lengths: list[np.ndarray]) -> dict:
    """Split every row into its documents plus its padding tail and let transformers flatten them."""
    features = []
    t = ids.shape[1]
    for row, lengths in zip(ids, doc_lengths, strict=True):
        start = 0
        for n in [*lengths.tolist(), t - int(lengths.sum())]:
            if n:
                features.append({"input_ids": row[start : start + n].tolist()})
            start += n
    collator = transformers.DataCollatorWithFlattening(
        return_position_ids=True, return_flash_attn_kwargs=True, return_tensors="np"
    )
    return collator(features)


@settings(max_examples=60, deadline=None)
@given(batch=packed_batches())
def test_positions_and_boundaries_match_transformers_flattening(batch) -> None:
    ids, labels, doc_lengths = batch
    out = collate_packed(ids, labels, doc_lengths)
    ref = _hf_reference(ids, doc_lengths)
    b, t = ids.shape
    assert out["input_ids"].dtype == torch.int64 and out["input_ids"].shape == (b, t)
    assert np.array_equal(out["input_ids"].numpy(), ids)
    assert np.array_equal(out["input_ids"].numpy().reshape(-1), ref["input_ids"].reshape(-1))
    assert out["position_ids"].dtype == torch.int64
    assert np.array_equal(out["position_ids"].numpy().reshape(-1), ref["position_ids"].reshape(-1))
    assert out["cu_seqlens"].dtype == torch.int32
    assert out["cu_seqlens"].tolist() == ref["cu_seq_lens_q"].tolist()
    assert out["cu_seqlens"][0] == 0 and out["cu_seqlens"][-1] == b * t
    assert out["max_seqlen"] == ref["max_length_q"]
    # labels are pre-shifted by the packer: passed through unchanged
    assert np.array_equal(out["labels"].numpy(), labels)
    assert out["num_trainable"] == int((labels != IGNORE_INDEX).sum())


def test_segments_never_cross_rows_or_documents() -> None:
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    labels = np.zeros((2, 6), dtype=np.int32)
    out = collate_packed(ids, labels, [np.array([2, 3]), np.array([6])])
    assert out["cu_seqlens"].tolist() == [0, 2, 5, 6, 12]  # row 0: docs 2,3 + tail 1; row 1: one full doc
    assert out["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]
    assert out["max_seqlen"] == 6


def test_padding_rows_are_never_trained() -> None:
    ids = np.ones((3, 4), dtype=np.int32)
    labels = np.full((3, 4), 7, dtype=np.int32)
    labels[:, -1] = IGNORE_INDEX
    out = collate_packed(ids, labels, [np.array([4])] * 3, is_padding=np.array([False, True, False]))
    assert out["labels"][1].tolist() == [IGNORE_INDEX] * 4
    assert out["labels"][0].tolist() == [7, 7, 7, IGNORE_INDEX]
    assert out["num_trainable"] == 6
    assert out["input_ids"][1].tolist() == [1, 1, 1, 1]  # still run through the model
    assert labels[1, 0] == 7  # caller's array untouched


def test_collate_rows_accepts_row_objects() -> None:
    class Row:
        def __init__(self, n: int) -> None:
            self.input_ids = np.arange(5, dtype=np.int32)
            self.labels = np.full(5, IGNORE_INDEX, dtype=np.int32)
            self.doc_lengths = np.array([n], dtype=np.int32)

    out = collate_rows([Row(5), Row(3)], is_padding=[False, True])
    assert out["cu_seqlens"].tolist() == [0, 5, 8, 10]
    assert out["num_trainable"] == 0


@pytest.mark.parametrize(
    ("lengths", "message"),
    [([[5, 2]], "sum to 7 > seq_length 6"), ([[-1]], "negative document length")],
)
def test_bad_document_lengths_are_refused(lengths, message) -> None:
    ids = np.zeros((1, 6), dtype=np.int32)
    with pytest.raises(ValueError, match=message):
        collate_packed(ids, ids, [np.array(x) for x in lengths])


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        collate_packed(np.zeros((2, 3)), np.zeros((2, 4)), [np.array([3])] * 2)
    with pytest.raises(ValueError, match="doc_lengths"):
        collate_packed(np.zeros((2, 3)), np.zeros((2, 3)), [np.array([3])])


def test_empty_rows_and_zero_length_documents_make_no_empty_segments() -> None:
    ids = np.zeros((3, 4), dtype=np.int32)
    out = collate_packed(ids, ids, [np.array([0, 3]), np.array([], dtype=np.int32), np.array([2, 0, 2])])
    assert out["cu_seqlens"].tolist() == [0, 3, 4, 8, 10, 12]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 1]]


def test_a_batch_is_one_memory_block_with_its_extra_arrays() -> None:
    """One storage per batch is what makes handing it from a DataLoader worker cheap (one shm segment)."""
    ids = np.arange(24, dtype=np.int32).reshape(3, 8)
    rows = np.array([7, 3, 9], dtype=np.int64)
    pad = np.array([False, False, True])
    out = collate_packed(ids, ids, [np.array([8])] * 3, pad, extra={"sample_row": rows, "sample_is_padding": pad})
    tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    assert set(tensors) == {"input_ids", "labels", "position_ids", "cu_seqlens", "sample_row", "sample_is_padding"}
    assert len({v.untyped_storage().data_ptr() for v in tensors.values()}) == 1
    assert out["sample_row"].dtype == torch.int64 and out["sample_row"].tolist() == [7, 3, 9]
    assert out["sample_is_padding"].dtype == torch.bool and out["sample_is_padding"].tolist() == [False, False, True]
    # the views do not overlap: writing one leaves the others intact
    out["position_ids"].fill_(-5)
    assert out["input_ids"].tolist() == ids.tolist() and out["cu_seqlens"].tolist() == [0, 8, 16, 24]
    assert out["sample_row"].tolist() == [7, 3, 9]


def test_an_extra_array_cannot_replace_a_batch_key() -> None:
    ids = np.zeros((1, 4), dtype=np.int32)
    with pytest.raises(ValueError, match="'labels'"):
        collate_packed(ids, ids, [np.array([4])], extra={"labels": np.zeros(1, np.int64)})
