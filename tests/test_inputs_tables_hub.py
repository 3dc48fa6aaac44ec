"""Inputs people have: Parquet files and hub-layout directories, Arrow files, CSV with Alpaca columns, and hub
dataset / tokenizer ids resolved through a local Hugging Face cache (a fake one, laid out as huggingface_hub
lays it out: <cache>/<kind>s--ORG--NAME/{refs/main, snapshots/<commit>/..., blobs/<hash>}). Nothing here
touches the network."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprep.convert import ConvertOptions, ConvertStats, convert_files, iter_conversations
from dataprep.errors import DataError
from dataprep.sources import expand_inputs
from dataprep.tokenizer import load_tokenizer
from formats.hub import HubNotCachedError, resolve

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!\nHow are you?"},
    {"instruction": "Name a colour.", "input": "", "output": "42"},
]


def convert(inputs, **options):
    stats = ConvertStats()
    return list(iter_conversations([str(i) for i in inputs], ConvertOptions(**options), stats)), stats


def messages_of(records):
    return [r["messages"] for r in records]


def test_parquet_file_reads_like_json(tmp_path):
    rows = [{**r, "category": "math"} for r in ALPACA]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet", row_group_size=2)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got, stats = convert([tmp_path / "train.parquet"])
    want, _ = convert([tmp_path / "train.jsonl"])
    assert messages_of(got) == messages_of(want)
    assert [r["id"] for r in got] == ["train.parquet[0]", "train.parquet[1]", "train.parquet[2]"]
    assert got[0]["extra"] == {"category": "math"} and stats.unknown_fields == {"category": 3}


def test_hub_layout_directory_picks_the_split(tmp_path):
    data = tmp_path / "ds" / "data"
    data.mkdir(parents=True)
    for k in range(2):
        pq.write_table(pa.Table.from_pylist([{**ALPACA[k], "id": f"tr{k}"}]), data / f"train-0000{k}-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist([{**ALPACA[2], "id": "te0"}]), data / "test-00000-of-00001.parquet")
    (tmp_path / "ds" / "README.md").write_text("# card")
    got, _ = convert([tmp_path / "ds"])
    assert [r["id"] for r in got] == ["tr0", "tr1"]
    got, _ = convert([f"hf:{tmp_path / 'ds'}:test"])
    assert [r["id"] for r in got] == ["te0"]


def test_messages_parquet_with_struct_columns_and_tool_calls(tmp_path):
    """Columnar messages fill absent struct fields with null: that is no value, not an unknown field."""
    rows = [
        {"messages": [{"role": "user", "content": "Weather?", "tool_calls": None},
                      {"role": "assistant", "content": None, "tool_calls": [
                          {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{\"c\": 1}"}}]},
                      {"role": "tool", "content": "sunny", "tool_calls": None},
                      {"role": "assistant", "content": "Sunny.", "tool_calls": None}]},
        {"messages": [{"role": "user", "content": "Hi", "tool_calls": None},
                      {"role": "assistant", "content": "Hello", "tool_calls": None}]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    got, stats = convert([tmp_path / "m.parquet"])
    assert got[0]["messages"][1] == {"role": "assistant", "content": "", "tool_calls": rows[0]["messages"][1]["tool_calls"]}
    assert got[1]["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert not stats.unknown_fields


@pytest.mark.parametrize("form", ["file", "stream"])
def test_arrow_files(tmp_path, form):
    table = pa.Table.from_pylist(ALPACA)
    path = tmp_path / "data.arrow"
    with pa.OSFile(str(path), "wb") as sink:
        writer = (pa.ipc.new_file if form == "file" else pa.ipc.new_stream)(sink, table.schema)
        for batch in table.to_batches(max_chunksize=2):
            writer.write_batch(batch)
        writer.close()
    got, _ = convert([path])
    assert [m[1]["content"] for m in messages_of(got)] == ["5", "Hi!\nHow are you?", "42"]


def test_csv_with_alpaca_columns(tmp_path):
    path = tmp_path / "alpaca.csv"
    path.write_text('instruction,input,output\n"Add the numbers.","2 and 3",5\n"Say hi.",,"Hi!\nHow are you?"\n'
                    '"Name a colour.",,42\n', encoding="utf-8")
    got, _ = convert([path])
    assert messages_of(got)[0] == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                                   {"role": "assistant", "content": "5"}]  # digits stay text
    assert messages_of(got)[1][1]["content"] == "Hi!\nHow are you?"  # a quoted newline inside a cell
    assert [r["id"] for r in got] == ["alpaca.csv[0]", "alpaca.csv[1]", "alpaca.csv[2]"]


def test_bad_parquet_is_one_clear_error(tmp_path):
    path = tmp_path / "broken.parquet"
    pq.write_table(pa.Table.from_pylist(ALPACA), path)
    path.write_bytes(path.read_bytes()[:40] + b"PAR1")
    with pytest.raises(DataError, match=r"broken\.parquet: cannot read Parquet"):
        convert([path])


# ---- the local Hugging Face cache ------------------------------------------------------------------------------


def fake_hub_repo(cache: Path, kind: str, repo_id: str, files: dict[str, bytes], commit: str = "a" * 40) -> Path:
    """A repository in the cache exactly as huggingface_hub lays it out (snapshot files link to blobs)."""
    base = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snapshot = base / "snapshots" / commit
    for rel, data in files.items():
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def parquet_bytes(rows) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def test_cached_hub_dataset_id(hub_cache):
    fake_hub_repo(hub_cache, "dataset", "org/alpaca-mini", {
        "data/train-00000-of-00001.parquet": parquet_bytes([{**r, "id": f"a{k}"} for k, r in enumerate(ALPACA)]),
        "data/test-00000-of-00001.parquet": parquet_bytes([{**ALPACA[0], "id": "t0"}]),
        "README.md": b"# card"})
    got, _ = convert(["hf:org/alpaca-mini"])
    assert [r["id"] for r in got] == ["a0", "a1", "a2"]
    got, _ = convert(["hf:org/alpaca-mini:test"])
    assert [r["id"] for r in got] == ["t0"]
    (source,) = expand_inputs(["hf:org/alpaca-mini"])
    assert source.name.endswith("datasets--org--alpaca-mini/snapshots/" + "a" * 40 + "/data/train-00000-of-00001.parquet")


def test_pack_reads_a_cached_hub_dataset(hub_cache, shared_data, tmp_path):
    from dataprep.pipeline import PackOptions, pack_dataset

    fake_hub_repo(hub_cache, "dataset", "org/alpaca-mini", {
        "data/train-00000-of-00001.parquet": parquet_bytes([{**r, "id": f"a{k}"} for k, r in enumerate(ALPACA)])})
    summary = pack_dataset(["hf:org/alpaca-mini"], tmp_path / "d", shared_data / "tokenizers" / "qwen2_5",
                           PackOptions(seq_length=128))
    assert summary["samples_out"] == 3


def test_uncached_hub_dataset_says_what_to_run(hub_cache):
    with pytest.raises(DataError, match=r"hf download org/missing --repo-type dataset"):
        convert(["hf:org/missing"])


def test_cached_hub_tokenizer_id(hub_cache, shared_data):
    d = shared_data / "tokenizers" / "qwen2_5"
    snapshot = fake_hub_repo(hub_cache, "model", "Qwen/Qwen2.5-7B-Instruct", {
        "tokenizer.json": (d / "tokenizer.json").read_bytes(),
        "tokenizer_config.json": (d / "tokenizer_config.json").read_bytes()})
    assert resolve("Qwen/Qwen2.5-7B-Instruct") == snapshot
    tok = load_tokenizer("Qwen/Qwen2.5-7B-Instruct")
    assert tok.fingerprint == load_tokenizer(d).fingerprint and tok.chat_template
    with pytest.raises(HubNotCachedError, match=r"fetch it with `hf download Qwen/Qwen3-8B`"):
        load_tokenizer("Qwen/Qwen3-8B")
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        load_tokenizer("./no/such/dir")


def test_pack_cli_takes_a_cached_hub_tokenizer(hub_cache, shared_data, tmp_path):
    from click.testing import CliRunner

    from cli.pack import pack

    d = shared_data / "tokenizers" / "qwen2_5"
    fake_hub_repo(hub_cache, "model", "Qwen/Qwen2.5-7B-Instruct", {
        "tokenizer.json": (d / "tokenizer.json").read_bytes(),
        "tokenizer_config.json": (d / "tokenizer_config.json").read_bytes()})
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    runner = CliRunner()
    ok = runner.invoke(pack, [str(src), "-o", str(tmp_path / "out"), "--tokenizer", "Qwen/Qwen2.5-7B-Instruct",
                              "--seq-length", "128", "--json"])
    assert ok.exit_code == 0, ok.output
    missing = runner.invoke(pack, [str(src), "-o", str(tmp_path / "o2"), "--tokenizer", "Qwen/Qwen3-8B",
                                   "--seq-length", "128"])
    assert missing.exit_code == 2 and "hf download Qwen/Qwen3-8B" in missing.output


# ---- memory stays flat in the input size ------------------------------------------------------------------------

_PEAK = textwrap.dedent("""
    import resource, sys
    from dataprep.convert import ConvertOptions, convert_files
    convert_files([sys.argv[1]], sys.argv[2], ConvertOptions())
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def _peak_kib(src: Path, out: Path) -> int:
    done = subprocess.run([sys.executable, "-c", _PEAK, str(src), str(out)], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    return int(done.stdout.split()[-1])


def _write_big(path: Path, rows: int) -> None:
    writer = None
    for start in range(0, rows, 10_000):
        table = pa.table({
            "instruction": [f"Instruction number {i}: explain item {i} in plain words." for i in range(start, start + 10_000)],
            "input": ["" if i % 3 else f"context {i} " * 8 for i in range(start, start + 10_000)],
            "output": [f"Answer {i}. " * 20 for i in range(start, start + 10_000)],
        })
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=5_000)
    writer.close()


def test_parquet_memory_is_flat_in_input_size(tmp_path):
    _write_big(tmp_path / "small.parquet", 20_000)
    _write_big(tmp_path / "large.parquet", 200_000)
    assert (tmp_path / "large.parquet").stat().st_size > 8 * (tmp_path / "small.parquet").stat().st_size
    small = _peak_kib(tmp_path / "small.parquet", tmp_path / "s.jsonl")
    large = _peak_kib(tmp_path / "large.parquet", tmp_path / "l.jsonl")
    assert (tmp_path / "l.jsonl").stat().st_size > 9 * (tmp_path / "s.jsonl").stat().st_size
    # ten times the rows, about the same peak: one row group (plus a 1024-row batch) is alive at a time
    assert large < 1.25 * small, (small, large)


def test_convert_cli_reads_parquet(tmp_path):
    pq.write_table(pa.Table.from_pylist(ALPACA), tmp_path / "train.parquet")
    stats = convert_files([str(tmp_path / "train.parquet")], str(tmp_path / "o.jsonl"), ConvertOptions())
    assert stats.records_out == 3 and stats.formats == {"alpaca": 1}


def test_plain_data_directory_reads_every_data_file_but_metadata(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "alpaca_part1.json").write_text(json.dumps(ALPACA[:2]))
    (d / "more.jsonl").write_text(json.dumps(ALPACA[2]) + "\n")
    (d / "dataset_info.json").write_text(json.dumps({"description": "not data"}))
    got, _ = convert([d])
    assert len(got) == 3


def test_trainer_model_path_takes_a_cached_hub_id(hub_cache, tmp_path):
    """`model.path: org/name` trains the snapshot in the local cache; an uncached id says what to run."""
    from tests.helpers.tiny_run import make_tokenizer_and_model, pack_rows
    from trainer.config import load_config
    from trainer.loop import train

    model_dir = make_tokenizer_and_model(tmp_path / "m", layers=1)
    snapshot = fake_hub_repo(hub_cache, "model", "org/tiny-qwen3",
                             {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()})
    data = pack_rows(model_dir, tmp_path / "data", n_records=40, seq_length=64)
    sets = [f"data.train=[{data}]", "train.max_steps=2", "logging.progress_bar=false", "checkpoint.export=false"]
    result = train(load_config(None, ["model.path=org/tiny-qwen3", f"logging.output_dir={tmp_path / 'run'}", *sets]))
    assert result.steps == 2
    assert f"path: {snapshot}" in (tmp_path / "run" / "config.resolved.yaml").read_text()
    with pytest.raises(FileNotFoundError, match="hf download org/not-cached"):
        train(load_config(None, ["model.path=org/not-cached", f"logging.output_dir={tmp_path / 'run2'}", *sets]))
