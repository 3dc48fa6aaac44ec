"""The documents packed in a dataset's rows, for tests that check what packing kept (one walk for all of them)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from formats.reader import PackedRow


def row_documents(row: PackedRow) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(source id, input_ids, labels) of each document in `row`, in row order; the arrays are views of the row."""
    pos = 0
    for doc_id, n in zip(row.doc_ids, row.doc_lengths, strict=True):
        yield doc_id, row.input_ids[pos : pos + n], row.labels[pos : pos + n]
        pos += n


def recover_documents(rows: Iterable[PackedRow]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every document of `rows` by source id (copies); an id packed twice fails the test, naming it."""
    got: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for row in rows:
        for doc_id, ids, labels in row_documents(row):
            assert doc_id not in got, f"document {doc_id!r} is packed twice"
            got[doc_id] = (ids.copy(), labels.copy())
    return got
