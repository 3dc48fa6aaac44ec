"""The packed-shard format: exact round trip, integrity checks that catch real corruption, crash safety."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from formats.errors import FormatError
from formats.manifest import read_manifest
from formats.reader import open_dataset
from formats.schema import FORMAT_VERSION, IGNORE_INDEX, MANIFEST_NAME
from formats.verify import verify_dataset
from formats.writer import DatasetWriter
from tests.helpers.documents import recover_documents

REPO = Path(__file__).resolve().parents[1]
PAD = 7


def make_docs(
    rng: np.random.Generator, n_docs: int, max_len: int
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Documents with pre-shifted labels: a random prompt part masked, the last position always -100."""
    docs = []
    for d in range(n_docs):
        length = int(rng.integers(1, max_len + 1))
        ids = rng.integers(10, 1000, size=length, dtype=np.int32)
        labels = np.full(length, IGNORE_INDEX, dtype=np.int32)
        start = int(rng.integers(0, length))
        labels[start : length - 1] = ids[start + 1 :]
        docs.append((f"rec-{d}", ids, labels))
    return docs


def pack_naively(docs, seq_length: int):
    """Rows built by simple next-fit, so the format tests do not depend on the packer."""
    rows, cur, used = [], [], 0
    for doc in docs:
        if used + len(doc[1]) > seq_length:
            rows.append(cur)
            cur, used = [], 0
        cur.append(doc)
        used += len(doc[1])
    if cur:
        rows.append(cur)
    return rows


def write_rows(out: Path, rows, seq_length: int, **kw) -> dict:
    with DatasetWriter(out, seq_length, PAD, **kw) as w:
        for row in rows:
            ids = np.full(seq_length, PAD, dtype=np.int32)
            labels = np.full(seq_length, IGNORE_INDEX, dtype=np.int32)
            pos = 0
            for _, d_ids, d_labels in row:
                ids[pos : pos + len(d_ids)] = d_ids
                labels[pos : pos + len(d_ids)] = d_labels
                pos += len(d_ids)
            w.write_row(ids, labels, [len(d[1]) for d in row], [d[0] for d in row])
        return w.finish(
            tokenizer={"fingerprint": "tok-fp", "name": "test"},
            packing={"stats": {"samples_out": sum(len(r) for r in rows)}},
        )


@pytest.fixture
def dataset(tmp_path: Path):
    rng = np.random.default_rng(0)
    docs = make_docs(rng, 300, 40)
    rows = pack_naively(docs, 64)
    out = tmp_path / "ds"
    write_rows(out, rows, 64, shard_rows=20, batch_rows=8)
    return out, docs, rows


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_round_trip_recovers_every_document_exactly(tmp_path: Path, compression: str):
    rng = np.random.default_rng(1)
    docs = make_docs(rng, 500, 50)
    rows = pack_naively(docs, 96)
    out = tmp_path / "ds"
    manifest = write_rows(out, rows, 96, shard_rows=17, batch_rows=5, compression=compression)
    ds = open_dataset(out, verify=True)
    assert len(ds) == len(rows) == manifest["num_rows"]
    assert ds.num_shards == -(-len(rows) // 17)
    assert ds.seq_length == 96 and ds.pad_id == PAD and ds.tokenizer_fingerprint == "tok-fp"
    got = recover_documents(ds.iter_rows())
    assert len(got) == len(docs)
    for doc_id, ids, labels in docs:
        np.testing.assert_array_equal(got[doc_id][0], ids)
        np.testing.assert_array_equal(got[doc_id][1], labels)
    assert manifest["num_tokens"] == sum(len(d[1]) for d in docs)
    assert manifest["num_trainable"] == sum(int((d[2] != IGNORE_INDEX).sum()) for d in docs)
    assert verify_dataset(out).ok


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_row_tokens_reads_every_row_in_any_order(tmp_path: Path, compression: str):
    """The training read path (by byte offset for uncompressed shards) returns exactly what was written."""
    rng = np.random.default_rng(2)
    rows = pack_naively(make_docs(rng, 400, 30), 48)
    out = tmp_path / "ds"
    write_rows(out, rows, 48, shard_rows=13, batch_rows=4, compression=compression)
    ds = open_dataset(out)
    for i in [*rng.permutation(len(rows)).tolist(), -1, 0]:  # random order, then revisits
        ids, labels, lengths = ds.row_tokens(i)
        docs = rows[i]
        n = sum(len(d[1]) for d in docs)
        np.testing.assert_array_equal(lengths, [len(d[1]) for d in docs])
        np.testing.assert_array_equal(ids[:n], np.concatenate([d[1] for d in docs]))
        np.testing.assert_array_equal(labels[:n], np.concatenate([d[2] for d in docs]))
        assert (ids[n:] == PAD).all() and (labels[n:] == IGNORE_INDEX).all()
        assert ids.dtype == labels.dtype == lengths.dtype == np.int32
        assert ids.shape == labels.shape == (48,)
    if compression == "none":
        with pytest.raises(ValueError):
            ids[0] = 1  # a view into the read-only mapping, not a copy
    with pytest.raises(IndexError):
        ds.row_tokens(len(rows))


def test_random_access_take_and_negative_index(dataset):
    out, _, rows = dataset
    ds = open_dataset(out)
    idx = np.array([len(rows) - 1, 0, 13, 13, 41, -1])
    ids, labels = ds.take(idx)
    assert ids.shape == (6, 64) and ids.dtype == np.int32
    for k, i in enumerate(idx):
        row = ds.row(int(i))
        np.testing.assert_array_equal(ids[k], row.input_ids)
        np.testing.assert_array_equal(labels[k], row.labels)
    assert ds.row(-1).doc_ids == [d[0] for d in rows[-1]]
    assert [r.doc_ids for r in ds.iter_rows(10, 13)] == [[d[0] for d in rows[i]] for i in range(10, 13)]
    with pytest.raises(IndexError):
        ds.row(len(rows))
    with pytest.raises(IndexError):
        ds.take([len(rows)])


def test_pickled_dataset_reopens(dataset):
    out, _, _ = dataset
    ds = open_dataset(out)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.fingerprint == ds.fingerprint and len(clone) == len(ds)
    np.testing.assert_array_equal(clone.row(5).input_ids, ds.row(5).input_ids)


def test_fingerprint_tracks_content_not_manifest_metadata(dataset, tmp_path: Path):
    out, docs, rows = dataset
    fp = open_dataset(out).fingerprint
    manifest = orjson.loads((out / MANIFEST_NAME).read_bytes())
    manifest["created"] = "1999-01-01T00:00:00+00:00"
    (out / MANIFEST_NAME).write_bytes(orjson.dumps(manifest))
    assert open_dataset(out).fingerprint == fp
    other = tmp_path / "other"
    write_rows(other, rows[:-1], 64, shard_rows=20, batch_rows=8)
    assert open_dataset(other).fingerprint != fp


def test_verify_catches_flipped_byte(dataset):
    out, _, _ = dataset
    shard = out / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    report = verify_dataset(out)
    assert not report.ok and any("checksum" in p and "shard-00001" in p for p in report.problems)
    with pytest.raises(FormatError, match="checksum"):
        open_dataset(out, verify=True)


def test_verify_and_reader_catch_truncated_shard(dataset):
    out, _, _ = dataset
    shard = out / "shard-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert any("size" in p for p in verify_dataset(out).problems)
    with pytest.raises(FormatError, match="size"):
        open_dataset(out)


def test_verify_and_reader_catch_deleted_shard(dataset):
    out, _, _ = dataset
    (out / "shard-00002.arrow").unlink()
    assert any("missing" in p for p in verify_dataset(out).problems)
    with pytest.raises(FormatError, match="shard-00002.arrow.*missing"):
        open_dataset(out)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["shards"][0].__setitem__("rows", m["shards"][0]["rows"] + 1), "num_rows"),
        (lambda m: m.__setitem__("seq_length", 32), "schema"),
        (lambda m: m["shards"][1].__setitem__("checksum", "0" * 32), "checksum"),
        (lambda m: m["format"].__setitem__("version", FORMAT_VERSION + 1), "version"),
        (lambda m: m["shards"][0].__setitem__("file", "../x.arrow"), "plain file name"),
    ],
)
def test_edited_manifest_is_rejected(dataset, edit, message):
    out, _, _ = dataset
    manifest = orjson.loads((out / MANIFEST_NAME).read_bytes())
    edit(manifest)
    (out / MANIFEST_NAME).write_bytes(orjson.dumps(manifest))
    report = verify_dataset(out)
    assert not report.ok and any(message in p for p in report.problems), report.problems
    with pytest.raises(FormatError, match=message):
        open_dataset(out, verify=True)


def test_consistent_manifest_edit_of_counts_is_caught_by_verify(dataset):
    """Editing a shard's rows AND the total keeps the manifest self-consistent; the shard contents disagree."""
    out, _, _ = dataset
    manifest = orjson.loads((out / MANIFEST_NAME).read_bytes())
    manifest["shards"][0]["tokens"] += 5
    manifest["num_tokens"] += 5
    (out / MANIFEST_NAME).write_bytes(orjson.dumps(manifest))
    assert any("tokens=" in p for p in verify_dataset(out).problems)


def test_verify_catches_label_crossing_a_document_end(tmp_path: Path):
    rng = np.random.default_rng(2)
    docs = make_docs(rng, 50, 20)
    first_id, ids, labels = docs[0]
    labels[-1] = 5  # would train the last token of doc 0 to predict the first token of doc 1
    out = tmp_path / "bad"
    write_rows(out, pack_naively(docs, 64), 64)
    problems = verify_dataset(out).problems
    assert any("document end" in p and "row 0" in p for p in problems), problems


def test_verify_catches_labels_that_are_not_the_next_token(tmp_path: Path):
    out = tmp_path / "unshifted"
    with DatasetWriter(out, 8, PAD) as w:
        ids = np.array([1, 2, 3, 4, PAD, PAD, PAD, PAD])
        w.write_row(ids, np.array([2, 3, 4, IGNORE_INDEX] + [IGNORE_INDEX] * 4), [4], ["ok"])
        w.write_row(ids, np.array([1, 2, 3, IGNORE_INDEX] + [IGNORE_INDEX] * 4), [4], ["unshifted"])
        w.finish(tokenizer={"fingerprint": "x"})
    problems = verify_dataset(out).problems
    assert len(problems) == 1 and "row 1" in problems[0] and "next input token" in problems[0], problems


def test_verify_catches_duplicate_ids_and_padding_labels(tmp_path: Path):
    out = tmp_path / "dup"
    with DatasetWriter(out, 8, PAD) as w:
        labels = np.full(8, IGNORE_INDEX, np.int32)
        w.write_row(np.array([1, 2, 3, PAD, PAD, PAD, PAD, PAD]), labels, [3], ["a"])
        bad = labels.copy()
        bad[6] = 4
        w.write_row(np.array([1, 2, 3, 4, PAD, PAD, PAD, PAD]), bad, [4], ["a"])
        w.finish(tokenizer={"fingerprint": "x"})
    problems = verify_dataset(out).problems
    assert any("'a' appears 2 times" in p for p in problems), problems
    assert any("padding has labels" in p and "row 1" in p for p in problems), problems


def test_unknown_version_error_is_clear(dataset):
    out, _, _ = dataset
    manifest = orjson.loads((out / MANIFEST_NAME).read_bytes())
    manifest["format"]["version"] = 99
    (out / MANIFEST_NAME).write_bytes(orjson.dumps(manifest))
    with pytest.raises(FormatError, match=r"index.json: format version 99 is not supported"):
        open_dataset(out)


def test_refuses_to_overwrite_unless_asked(dataset):
    out, docs, rows = dataset
    with pytest.raises(FileExistsError):
        DatasetWriter(out, 64, PAD)
    write_rows(out, rows[:3], 64, overwrite=True)
    assert len(open_dataset(out)) == 3
    assert not list(out.parent.glob("ds.tmp-*")) and not list(out.parent.glob("ds.old-*"))


def test_never_overwrites_a_directory_that_is_not_a_dataset(tmp_path: Path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FormatError, match="not a dataset"):
        DatasetWriter(precious, 8, PAD, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_exception_during_write_leaves_nothing(tmp_path: Path):
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="boom"):
        with DatasetWriter(out, 8, PAD, shard_rows=2, batch_rows=1) as w:
            for _ in range(5):
                w.write_row(np.full(8, PAD), np.full(8, IGNORE_INDEX), [1], [str(_)])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_rows_that_overflow(tmp_path: Path):
    with DatasetWriter(tmp_path / "ds", 8, PAD) as w:
        with pytest.raises(ValueError, match="sum to <= 8"):
            w.write_row(np.zeros(8), np.zeros(8), [5, 4], ["a", "b"])


_CRASH_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from formats.writer import DatasetWriter
    out, S = sys.argv[1], 256
    with DatasetWriter(out, S, 0, shard_rows=50, batch_rows=10) as w:
        for i in range(100000):
            w.write_row(np.arange(S), np.full(S, -100), [S], [f"r{i}"])
            if i % 10 == 9:
                print(i, flush=True)
                time.sleep(0.01)
        w.finish(tokenizer={"fingerprint": "x"})
    """
)


def test_killed_writer_leaves_no_acceptable_dataset(tmp_path: Path):
    out = tmp_path / "ds"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASH_SCRIPT, str(out)], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        lines = 0
        deadline = time.monotonic() + 120
        while lines < 12 and time.monotonic() < deadline:  # at least two shards closed, one open
            if proc.stdout.readline():
                lines += 1
        assert lines == 12, "writer subprocess did not make progress"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    leftovers = list(tmp_path.iterdir())
    assert not out.exists()
    assert leftovers and all(".tmp-" in p.name for p in leftovers)
    for candidate in [out, *leftovers]:
        assert not verify_dataset(candidate).ok
        with pytest.raises(FormatError):
            open_dataset(candidate)
        with pytest.raises(FormatError):
            read_manifest(candidate)
    # The next writer to the same target clears the dead process's temp dir and publishes normally.
    write_rows(out, [[("a", np.array([1, 2], np.int32), np.array([2, IGNORE_INDEX], np.int32))]], 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert verify_dataset(out).ok
