"""`pack_dataset` and the pack / inspect / verify commands, end to end on the real Alpaca-GPT4 sample."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from cli.dataprep import main as dataprep_main
from dataprep.pipeline import PackOptions, pack_dataset, spill_samples, write_packed
from formats.reader import open_dataset
from formats.verify import verify_dataset
from tests.helpers.documents import recover_documents


def reference_samples(shared_data: Path, seq_length: int, overlong: str = "drop") -> dict[str, tuple]:
    from dataprep.convert import ConvertOptions, ConvertStats, iter_conversations
    from dataprep.tokenize import TokenizeOptions, TokenizeStats, tokenize_conversations
    from dataprep.tokenizer import load_tokenizer

    tok = load_tokenizer(shared_data / "tokenizers" / "qwen2_5")
    records = iter_conversations(
        [str(shared_data / "alpaca" / "alpaca_gpt4_en_demo_1k.json")], ConvertOptions(), ConvertStats()
    )
    opts = TokenizeOptions(max_length=seq_length, overlong=overlong)
    return {
        s.id: (s.input_ids, s.labels) for s in tokenize_conversations(records, tok, opts, TokenizeStats())
    }


@pytest.fixture(scope="module")
def alpaca(shared_data: Path) -> str:
    return str(shared_data / "alpaca" / "alpaca_gpt4_en_demo_1k.json")


def test_round_trip_every_accepted_record_is_recovered_exactly(tmp_path, shared_data, alpaca, qwen):
    summary = pack_dataset([alpaca], tmp_path / "ds", qwen, PackOptions(seq_length=2048, shard_rows=40))
    ds = open_dataset(tmp_path / "ds", verify=True)
    expected = reference_samples(shared_data, 2048)
    got = recover_documents(ds.iter_rows())
    assert set(got) == set(expected) and len(got) == 999
    for sample_id, (ids, labels) in expected.items():
        np.testing.assert_array_equal(got[sample_id][0], ids)
        np.testing.assert_array_equal(got[sample_id][1], labels)
    assert summary["samples_out"] == summary["records_in"] == 999
    assert summary["rows"] == len(ds) == summary["lower_bound_rows"]  # the real sample packs to the bound
    assert summary["tokens"] == sum(len(v[0]) for v in expected.values())
    assert summary["trainable_tokens"] == sum(int((v[1] != -100).sum()) for v in expected.values())
    assert ds.manifest["tokenizer"]["pad_id"] == 151643 and ds.manifest["template"] == "chatml"
    assert ds.manifest["tokenizer"]["fingerprint"].startswith("tok1:")
    assert ds.num_shards == 3
    assert verify_dataset(tmp_path / "ds").ok


def test_overlong_samples_are_counted_not_lost(tmp_path, shared_data, alpaca, qwen):
    dropped = pack_dataset([alpaca], tmp_path / "drop", qwen, PackOptions(seq_length=256, overlong="drop"))
    expected = reference_samples(shared_data, 256, "drop")
    assert dropped["samples_out"] == len(expected) < 999
    assert dropped["samples_out"] + sum(dropped["dropped"].values()) == 999
    split = pack_dataset(
        [alpaca], tmp_path / "split", qwen, PackOptions(seq_length=256, overlong="split", algorithm="ffd")
    )
    got = recover_documents(open_dataset(tmp_path / "split").iter_rows())
    expected = reference_samples(shared_data, 256, "split")
    assert set(got) == set(expected) and split["samples_out"] == len(expected)
    assert verify_dataset(tmp_path / "split").ok


def fake_samples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        length = int(rng.integers(2, 60))
        ids = rng.integers(5, 100, size=length).astype(np.int32)
        labels = np.full(length, -100, dtype=np.int32)
        labels[:-1] = np.where(rng.random(length - 1) < 0.5, ids[1:], -100)
        yield SimpleNamespace(id=f"s{i}", input_ids=ids, labels=labels)


@pytest.mark.parametrize("algorithm", ["ffd", "bfd", "none"])
def test_pack_stages_without_a_tokenizer_are_deterministic_per_seed(tmp_path, algorithm):
    def run(name: str, seed: int) -> str:
        spill_dir = tmp_path / f"spill-{name}"
        spill_dir.mkdir()
        spill = spill_samples(fake_samples(700), spill_dir, 64)
        opts = PackOptions(seq_length=64, algorithm=algorithm, seed=seed, shard_rows=50, max_docs_per_row=4)
        write_packed(spill, tmp_path / name, opts, pad_id=1, tokenizer_info={"fingerprint": "t"})
        return open_dataset(tmp_path / name).fingerprint

    assert run("a", 1) == run("b", 1) != run("c", 2)
    ds = open_dataset(tmp_path / "a")
    assert max(len(ds.row(i).doc_ids) for i in range(len(ds))) <= 4
    got = recover_documents(ds.iter_rows())
    for s in fake_samples(700):
        np.testing.assert_array_equal(got[s.id][0], s.input_ids)
        np.testing.assert_array_equal(got[s.id][1], s.labels)
    assert verify_dataset(tmp_path / "a").ok


def invoke(*args: str):
    return CliRunner().invoke(dataprep_main, list(args))


def test_cli_pack_inspect_verify_and_exit_codes(tmp_path, shared_data, qwen):
    tiny = str(shared_data / "alpaca" / "alpaca_tiny_100.json")
    out = str(tmp_path / "ds")
    result = invoke(
        "pack",
        tiny,
        "-o",
        out,
        "--tokenizer",
        qwen,
        "--seq-length",
        "1024",
        "--json",
        "--compression",
        "zstd",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["samples_out"] == 100 and summary["rows"] >= summary["lower_bound_rows"]
    manifest = open_dataset(out).manifest
    assert manifest["compression"] == "zstd" and isinstance(manifest["command"], list)
    assert manifest["tokenizer"]["path"] == str(Path(qwen).absolute())

    again = invoke("pack", tiny, "-o", out, "--tokenizer", qwen, "--seq-length", "1024", "--compression", "zstd")
    assert again.exit_code == 0 and "reused:                  yes" in again.output  # same inputs + options
    differs = invoke("pack", tiny, "-o", out, "--tokenizer", qwen, "--seq-length", "1024")
    assert differs.exit_code == 1 and "already exists" in differs.output and "compression 'zstd' -> 'none'" in differs.output
    assert (
        invoke("pack", tiny, "-o", out, "--tokenizer", qwen, "--seq-length", "512", "--overwrite").exit_code
        == 0
    )
    assert open_dataset(out).seq_length == 512

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    refused = invoke("pack", tiny, "-o", str(precious), "--tokenizer", qwen, "--seq-length", "512", "--overwrite")
    assert refused.exit_code == 1 and "not a dataset" in refused.output
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]

    usage = invoke("pack", tiny, "-o", out, "--tokenizer", str(tmp_path / "nope"), "--seq-length", "512")
    assert usage.exit_code == 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"id": "x", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n'
    )
    broken = invoke("pack", str(bad), "-o", str(tmp_path / "b"), "--tokenizer", qwen, "--seq-length", "64")
    assert broken.exit_code == 1 and "bad.jsonl:2" in broken.output
    assert (
        not (tmp_path / "b").exists()
        and not list(tmp_path.glob("*.spill-*"))
        and not list(tmp_path.glob(".b.*"))
    )

    shown = invoke("inspect", out, "--row", "0")
    assert shown.exit_code == 0, shown.output
    assert (
        "[[" in shown.stdout
        and "<|im_start|>assistant" in shown.stdout
        and "--- doc alpaca_tiny_100.json" in shown.stdout
    )
    assert invoke("inspect", out, "--row", "100000").exit_code == 1
    as_json = json.loads(invoke("inspect", out, "--json").stdout)
    assert sum(b["count"] for b in as_json["doc_length_histogram"]) == 100

    assert invoke("verify", out).exit_code == 0
    shard = Path(out) / "shard-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0xFF
    shard.write_bytes(bytes(data))
    failed = invoke("verify", out, "--json")
    assert failed.exit_code == 1
    report = json.loads(failed.stdout)
    assert report["ok"] is False and any("checksum" in p for p in report["problem_list"])
    assert invoke("verify", str(tmp_path / "missing")).exit_code == 1
