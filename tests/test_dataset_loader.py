"""The streaming loader over real packed datasets (written with formats.writer) through a real DataLoader."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from formats.writer import DatasetWriter
from trainer.collate import IGNORE_INDEX
from trainer.dataset import DatasetMismatchError, LoaderStateError, PackedIterableDataset

SEQ = 16
SHARD_ROWS = 7  # several shards of several record batches (batch_rows=3): rows cross both boundaries


def write_dataset(path: Path, rows: int, tag: int = 0, seq: int = SEQ, tokenizer: str = "tok-a") -> Path:
    """Row r of dataset `tag` holds token 1000*tag + r in every real position, so reads are checkable.
    Documents: r % 3 + 1 documents of seq/4 tokens each, then padding; labels pre-shifted within documents."""
    dl = seq // 4
    with DatasetWriter(path, seq_length=seq, pad_id=0, shard_rows=SHARD_ROWS, batch_rows=3) as w:
        for r in range(rows):
            n_docs = r % 3 + 1
            ids = np.zeros(seq, dtype=np.int32)
            labels = np.full(seq, IGNORE_INDEX, dtype=np.int32)
            ids[: dl * n_docs] = 1000 * tag + r
            for d in range(n_docs):
                labels[dl * d : dl * d + dl - 1] = 1000 * tag + r  # last position of each document is -100
            w.write_row(ids, labels, [dl] * n_docs, [f"t{tag}-r{r}-d{d}" for d in range(n_docs)])
        w.finish(tokenizer={"fingerprint": tokenizer})
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packed")
    return {
        "a": write_dataset(root / "a", 37, tag=0),
        "b": write_dataset(root / "b", 11, tag=1),
        "other_tok": write_dataset(root / "c", 5, tag=2, tokenizer="tok-b"),
        "other_seq": write_dataset(root / "d", 5, tag=3, seq=8),
    }


def run_loader(ds: PackedIterableDataset, num_workers: int, stop_after_steps: int | None = None):
    """Iterate like a trainer: mark each batch consumed after its step; optionally stop after N steps."""
    loader = DataLoader(ds, batch_size=None, num_workers=num_workers)
    seen, steps = [], 0
    for batch in loader:
        # the batch carries what it read: check the tokens are that row's tokens
        tokens = batch["input_ids"][:, 0].numpy()
        expected = 1000 * batch["sample_source"].numpy() + batch["sample_row"].numpy()
        assert np.array_equal(tokens, expected)
        for s, r, pad in zip(
            batch["sample_source"].tolist(),
            batch["sample_row"].tolist(),
            batch["sample_is_padding"].tolist(),
            strict=True,
        ):
            seen.append((batch["loader"]["epoch"], s, r, pad))
        ds.mark_consumed(batch)
        if batch["loader"]["last_in_step"]:
            steps += 1
            if stop_after_steps is not None and steps == stop_after_steps:
                break
    return seen


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_row_once_per_epoch_across_ranks_and_workers(data, num_workers: int) -> None:
    world, epochs = 2, 2
    seen = []
    for rank in range(world):
        ds = PackedIterableDataset(
            data["a"],
            global_batch_size=4,
            micro_batch_size=1,
            rank=rank,
            world_size=world,
            seed=3,
            epochs=epochs,
            remainder="pad",
        )
        seen += run_loader(ds, num_workers)
    for e in range(epochs):
        real = Counter(r for ep, _, r, pad in seen if ep == e and not pad)
        assert real == Counter(range(37))
        assert sum(1 for ep, *_, pad in seen if ep == e and pad) == 3  # 37 rows -> 10 steps of 4
    first = [r for ep, _, r, pad in seen if ep == 0 and not pad]
    second = [r for ep, _, r, pad in seen if ep == 1 and not pad]
    assert first != second, "each epoch must be a new permutation"


def test_a_batch_from_a_worker_arrives_whole_in_one_shared_block(data) -> None:
    """Worker batches must equal in-process ones and still share one storage after the hand-over."""
    kwargs = dict(global_batch_size=4, micro_batch_size=2, rank=0, world_size=1, seed=3)
    local = list(DataLoader(PackedIterableDataset(data["a"], **kwargs), batch_size=None, num_workers=0))
    remote = list(DataLoader(PackedIterableDataset(data["a"], **kwargs), batch_size=None, num_workers=2))
    assert len(local) == len(remote) > 0
    for a, b in zip(local, remote, strict=True):
        tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
        assert len(tensors) == 7
        for k in tensors:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        assert len({b[k].untyped_storage().data_ptr() for k in tensors}) == 1
        assert a["loader"] == b["loader"]


def test_drop_remainder_reads_the_kept_rows_once_and_reports_the_rest(data) -> None:
    ds = PackedIterableDataset(
        data["a"], global_batch_size=8, micro_batch_size=2, seed=1, remainder="drop", rank=0, world_size=1
    )
    assert ds.plan().dropped == 5 and ds.describe()["rows_dropped_per_epoch"] == 5
    seen = run_loader(ds, 0)
    rows = [r for _, _, r, _ in seen]
    assert len(rows) == len(set(rows)) == 32
    assert ds.state_dict()["epoch"] == 1 and ds.state_dict()["rows_consumed_in_epoch"] == 0


def test_padding_rows_are_marked_and_never_trained(data) -> None:
    ds = PackedIterableDataset(
        data["b"],
        global_batch_size=4,
        micro_batch_size=4,
        shuffle=False,
        remainder="pad",
        rank=0,
        world_size=1,
    )
    batches = list(DataLoader(ds, batch_size=None))
    last = batches[-1]
    assert last["sample_is_padding"].tolist() == [False, False, False, True]
    assert (last["labels"][3] == IGNORE_INDEX).all()
    assert last["num_trainable"] == int((last["labels"] != IGNORE_INDEX).sum()) > 0
    assert [r for b in batches for r in b["sample_row"].tolist()] == [
        *range(11),
        0,
    ]  # file order, then filler


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_with_prefetching_workers_continues_exactly(data, num_workers: int) -> None:
    kwargs = dict(global_batch_size=4, micro_batch_size=2, seed=7, epochs=2, rank=0, world_size=1)
    full = run_loader(PackedIterableDataset(data["a"], **kwargs), num_workers)

    first = PackedIterableDataset(data["a"], **kwargs)
    head = run_loader(first, num_workers, stop_after_steps=5)  # workers have prefetched beyond step 5
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    assert state["epoch"] == 0 and state["rows_consumed_in_epoch"] == 20

    second = PackedIterableDataset(data["a"], **kwargs)
    second.load_state_dict(state)
    tail = run_loader(second, num_workers)
    assert head + tail == full


def test_resume_on_a_different_world_size_reads_each_row_once(data) -> None:
    def make(rank, world, micro):
        return PackedIterableDataset(
            data["a"],
            global_batch_size=8,
            micro_batch_size=micro,
            seed=5,
            remainder="pad",
            rank=rank,
            world_size=world,
        )

    seen, states = [], []
    for rank in range(4):  # 4 ranks, stop after 2 steps (16 rows)
        ds = make(rank, 4, 2)
        seen += run_loader(ds, 2, stop_after_steps=2)
        states.append(ds.state_dict())
    assert all(s == states[0] for s in states)  # every rank agrees on the position
    for rank in range(2):  # continue on 2 ranks with micro-batch 2 and 2 accumulation steps
        ds = make(rank, 2, 2)
        ds.load_state_dict(states[0])
        seen += run_loader(ds, 1)
    assert Counter(r for *_, r, pad in seen if not pad) == Counter(range(37))


def test_mixing_two_datasets_follows_the_weights(data) -> None:
    ds = PackedIterableDataset(
        [data["a"], data["b"]],
        weights=[1, 3],
        samples_per_epoch=40,
        global_batch_size=4,
        micro_batch_size=4,
        rank=0,
        world_size=1,
        seed=2,
        epochs=2,
    )
    assert ds.order.counts == (10, 30)
    seen = run_loader(ds, 2)
    per_epoch = Counter((ep, s) for ep, s, _, _ in seen)
    assert per_epoch == {(0, 0): 10, (0, 1): 30, (1, 0): 10, (1, 1): 30}
    # dataset b (11 rows) is up-weighted: within each pass of 11 draws no row repeats
    b_rows = [r for _, s, r, _ in seen if s == 1]
    for p in range(len(b_rows) // 11):
        assert sorted(b_rows[11 * p : 11 * (p + 1)]) == list(range(11))


def test_refuses_data_that_does_not_fit_the_model(data) -> None:
    with pytest.raises(DatasetMismatchError, match=r"seq_length 16, but the run expects 32"):
        PackedIterableDataset(
            data["a"], global_batch_size=1, micro_batch_size=1, expected_seq_length=32, rank=0, world_size=1
        )
    with pytest.raises(
        DatasetMismatchError, match="tokenized with tokenizer tok-a, but the model's tokenizer is x"
    ):
        PackedIterableDataset(
            data["a"],
            global_batch_size=1,
            micro_batch_size=1,
            expected_tokenizer_fingerprint="x",
            rank=0,
            world_size=1,
        )
    with pytest.raises(DatasetMismatchError, match="must share a tokenizer"):
        PackedIterableDataset(
            [data["a"], data["other_tok"]], global_batch_size=1, micro_batch_size=1, rank=0, world_size=1
        )
    with pytest.raises(DatasetMismatchError, match="seq_length 8 differs"):
        PackedIterableDataset(
            [data["a"], data["other_seq"]], global_batch_size=1, micro_batch_size=1, rank=0, world_size=1
        )
    with pytest.raises(DatasetMismatchError, match="fewer than one global batch"):
        PackedIterableDataset(data["b"], global_batch_size=16, micro_batch_size=1, rank=0, world_size=1)


def test_refuses_a_state_from_another_order(data) -> None:
    base = dict(global_batch_size=4, micro_batch_size=1, rank=0, world_size=1)
    state = PackedIterableDataset(data["a"], seed=1, **base).state_dict()
    with pytest.raises(LoaderStateError, match="the seed changed"):
        PackedIterableDataset(data["a"], seed=2, **base).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="dataset contents changed"):
        PackedIterableDataset(data["b"], seed=1, **base).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="missing"):
        PackedIterableDataset(data["a"], seed=1, **base).load_state_dict({"epoch": 0})
    bad = dict(state, rows_consumed_in_epoch=10_000)
    with pytest.raises(LoaderStateError, match="invalid position"):
        PackedIterableDataset(data["a"], seed=1, **base).load_state_dict(bad)
    # Another global batch: the steps after the saved one would not be those of the run it continues.
    other = dict(base, global_batch_size=2)
    with pytest.raises(LoaderStateError, match="global batch changed .checkpoint 4 rows per step, now 2"):
        PackedIterableDataset(data["a"], seed=1, **other).load_state_dict(state)


def test_pickles_without_open_shards(data) -> None:
    ds = PackedIterableDataset(data["a"], global_batch_size=4, micro_batch_size=1, rank=0, world_size=1)
    next(iter(ds))  # opens the shards in this process
    assert ds._handles is not None
    blob = pickle.dumps(ds)
    assert len(blob) < 4096
    clone = pickle.loads(blob)
    assert clone._handles is None
    assert next(iter(clone))["sample_row"].tolist() == next(iter(ds))["sample_row"].tolist()


def test_len_counts_micro_batches_from_the_cursor(data) -> None:
    ds = PackedIterableDataset(
        data["a"], global_batch_size=4, micro_batch_size=2, remainder="drop", epochs=2, rank=0, world_size=1
    )
    assert len(ds) == 2 * 9 * 2 == len(list(ds))


def test_rank_and_world_size_come_from_torch_distributed(data, monkeypatch) -> None:
    """Without explicit rank/world_size the loader asks torch.distributed (as under torchrun)."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    ds = PackedIterableDataset(data["a"], global_batch_size=8, micro_batch_size=2)
    assert (ds.rank, ds.world_size) == (3, 4)
    first = next(iter(ds))
    explicit = PackedIterableDataset(data["a"], global_batch_size=8, micro_batch_size=2, rank=3, world_size=4)
    assert (
        first["sample_row"].tolist() == next(iter(explicit))["sample_row"].tolist()
    )  # rank 3's slice of step 0
    with pytest.raises(ValueError, match="give both rank and world_size"):
        PackedIterableDataset(data["a"], global_batch_size=4, micro_batch_size=4, rank=0)
