"""`pack --partition I/N` + `merge`: the merged dataset holds exactly the single-machine run's documents,
refuses parts that cannot form one dataset, and reruns are reused or refused by provenance."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.dataprep import main as dataprep_main
from dataprep.partition import Partition, PartitionCounter, parse_partition, select_records
from dataprep.pipeline import PackOptions, pack_dataset
from formats.errors import FormatError
from formats.merge import merge_datasets
from formats.reader import open_dataset
from formats.verify import verify_dataset
from tests.helpers.documents import row_documents


def documents(path: Path) -> Counter:
    """The multiset of (id, input_ids, labels) over every document of every row."""
    docs: Counter = Counter()
    for row in open_dataset(path).iter_rows():
        for doc_id, ids, labels in row_documents(row):
            docs[(doc_id, ids.tobytes(), labels.tobytes())] += 1
    return docs


@pytest.fixture(scope="module")
def tiny(shared_data: Path) -> str:
    return str(shared_data / "alpaca" / "alpaca_tiny_100.json")


def test_partition_spec_and_record_selection_cover_every_record_once():
    assert parse_partition("2/5") == Partition(2, 5)
    for bad in ("5/5", "1", "-1/3", "a/b", "0/0"):
        with pytest.raises(ValueError):
            parse_partition(bad)
    picked = [list(select_records(range(10), Partition(i, 3), PartitionCounter())) for i in range(3)]
    assert picked == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


def test_three_partitions_merge_to_the_single_machine_dataset(tmp_path, shared_data, qwen):
    alpaca = str(shared_data / "alpaca" / "alpaca_gpt4_en_demo_1k.json")
    opts = dict(seq_length=1024, pack_window=200, seed=7, shard_rows=40)
    single = pack_dataset([alpaca], tmp_path / "single", qwen, PackOptions(**opts))
    parts = []
    for i in range(3):
        s = pack_dataset([alpaca], tmp_path / f"p{i}", qwen, PackOptions(**opts, partition=Partition(i, 3)))
        assert s["partition"] == f"{i}/3" and s["records_in"] == single["records_in"]
        parts.append(tmp_path / f"p{i}")
    merged = merge_datasets(parts, tmp_path / "merged")
    assert not merged["reused"] and merged["parts"] == 3

    assert documents(tmp_path / "merged") == documents(tmp_path / "single")
    a, b = open_dataset(tmp_path / "merged").manifest, open_dataset(tmp_path / "single").manifest
    for key in ("num_docs", "num_tokens", "num_trainable", "seq_length", "tokenizer", "template"):
        assert a[key] == b[key], key
    sa, sb = a["packing"]["stats"], b["packing"]["stats"]
    for key in ("records_in", "skipped", "dropped", "truncated", "samples_out", "lower_bound_rows", "tokens"):
        assert sa[key] == sb[key], key
    # Rows differ only in which documents share one; each partition may leave one extra part-full row per window.
    assert b["num_rows"] <= a["num_rows"] <= b["num_rows"] + 3 * (-(-single["samples_out"] // 200))
    checks = [s["checksum"] for p in parts for s in open_dataset(p).manifest["shards"]]
    assert [s["checksum"] for s in a["shards"]] == checks  # shard bytes untouched: same checksums, in part order
    report = verify_dataset(tmp_path / "merged")
    assert report.ok, report.problems
    assert report.docs == single["samples_out"]
    # Hard links: nothing copied, and the merged dataset outlives its parts.
    assert (tmp_path / "merged" / "shard-00000.arrow").stat().st_ino == (tmp_path / "p0" / "shard-00000.arrow").stat().st_ino
    for p in parts:
        shutil.rmtree(p)
    assert verify_dataset(tmp_path / "merged").ok


def test_symlinked_merge_fails_clearly_when_a_part_is_deleted(tmp_path, qwen, tiny):
    parts = [tmp_path / f"p{i}" for i in range(2)]
    for i, p in enumerate(parts):
        pack_dataset([tiny], p, qwen, PackOptions(seq_length=256, partition=Partition(i, 2)))
    merge_datasets(parts, tmp_path / "m", link="symlink")
    assert (tmp_path / "m" / "shard-00000.arrow").is_symlink()
    assert len(open_dataset(tmp_path / "m", verify=True)) == sum(len(open_dataset(p)) for p in parts)
    shutil.rmtree(parts[1])
    with pytest.raises(FormatError, match="deleted or moved"):
        open_dataset(tmp_path / "m")
    report = verify_dataset(tmp_path / "m")
    assert not report.ok and any("p1" in p and "deleted or moved" in p for p in report.problems)
    # A rerun of the merge notices the part is gone instead of reusing the broken output.
    with pytest.raises(FormatError, match="p1"):
        merge_datasets(parts, tmp_path / "m", link="symlink")


def test_merge_refuses_parts_that_cannot_form_one_dataset(tmp_path, shared_data, qwen, tiny):
    whole = dict(seq_length=256)
    pack_dataset([tiny], tmp_path / "a", qwen, PackOptions(**whole))
    pack_dataset([tiny], tmp_path / "b", qwen, PackOptions(**whole, seed=1))
    with pytest.raises(FormatError, match="appear more than once.*alpaca_tiny_100"):
        merge_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    pack_dataset([tiny], tmp_path / "c", qwen, PackOptions(seq_length=512))
    with pytest.raises(FormatError, match="seq_length differs"):
        merge_datasets([tmp_path / "a", tmp_path / "c"], tmp_path / "out")
    llama3 = str(shared_data / "tokenizers" / "llama3_instruct")
    if Path(llama3).is_dir():
        pack_dataset([tiny], tmp_path / "d", llama3, PackOptions(seq_length=256))
        with pytest.raises(FormatError, match="tokenizer fingerprint differs"):
            merge_datasets([tmp_path / "a", tmp_path / "d"], tmp_path / "out")
    p0 = tmp_path / "p0"
    pack_dataset([tiny], p0, qwen, PackOptions(seq_length=256, partition=Partition(0, 3)))
    pack_dataset([tiny], tmp_path / "p2", qwen, PackOptions(seq_length=256, partition=Partition(2, 3)))
    pack_dataset([tiny], tmp_path / "q1", qwen, PackOptions(seq_length=256, seed=5, partition=Partition(1, 3)))
    with pytest.raises(FormatError, match="1/3 missing"):
        merge_datasets([p0, tmp_path / "p2"], tmp_path / "out")
    with pytest.raises(FormatError, match="different job"):
        merge_datasets([p0, tmp_path / "q1", tmp_path / "p2"], tmp_path / "out")
    shutil.copytree(p0, tmp_path / "p0copy")
    with pytest.raises(FormatError, match="given twice"):
        merge_datasets([p0, tmp_path / "p0copy"], tmp_path / "out")
    with pytest.raises(FormatError, match="whole datasets"):
        merge_datasets([p0, tmp_path / "a"], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    partial = merge_datasets([p0, tmp_path / "p2"], tmp_path / "out", allow_partial=True)
    expected = open_dataset(p0).manifest["num_docs"] + open_dataset(tmp_path / "p2").manifest["num_docs"]
    assert partial["documents"] == expected and verify_dataset(tmp_path / "out").ok


def invoke(*args: str):
    return CliRunner().invoke(dataprep_main, list(args))


def test_reruns_reuse_same_output_and_refuse_a_different_one(tmp_path, qwen, monkeypatch):
    src = tmp_path / "conv.jsonl"
    rec = '{{"id": "r{0}", "messages": [{{"role": "user", "content": "say {0}"}}, {{"role": "assistant", "content": "{0}"}}]}}\n'
    src.write_text("".join(rec.format(i) for i in range(30)))
    out = tmp_path / "ds"
    args = ["pack", str(src), "-o", str(out), "--tokenizer", qwen, "--seq-length", "128", "--partition", "1/2", "--json"]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["reused"] is False
    manifest_bytes = (out / "index.json").read_bytes()
    again = invoke(*args)
    assert again.exit_code == 0 and json.loads(again.stdout)["reused"] is True
    assert json.loads(again.stdout)["samples_out"] == json.loads(first.stdout)["samples_out"] == 15
    assert (out / "index.json").read_bytes() == manifest_bytes
    # Rewriting the input with identical bytes (an upstream task retried) still reuses: content, not mtime.
    src.write_text(src.read_text())
    assert json.loads(invoke(*args).stdout)["reused"] is True
    monkeypatch.chdir(tmp_path)  # the same input spelled differently is the same input
    assert json.loads(invoke(*[a if a != str(src) else "./conv.jsonl" for a in args]).stdout)["reused"] is True

    other = invoke(*[a if a != "1/2" else "0/2" for a in args])
    assert other.exit_code == 1 and "different inputs or options" in other.output and "partition" in other.output
    src.write_text(src.read_text().replace("say 3", "say 4"))
    changed = invoke(*args)
    assert changed.exit_code == 1 and f"input {src} changed" in changed.output
    rebuilt = invoke(*args, "--overwrite")
    assert rebuilt.exit_code == 0 and json.loads(rebuilt.stdout)["reused"] is False

    (out / "shard-00000.arrow").unlink()
    damaged = invoke(*args)
    assert damaged.exit_code == 1 and "damaged" in damaged.output

    usage = invoke("pack", str(src), "-o", str(tmp_path / "x"), "--tokenizer", qwen, "--seq-length", "128", "--partition", "2/2")
    assert usage.exit_code == 2 and "--partition" in usage.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(src.read_text() + "{oops\n")
    broken = invoke("pack", str(bad), "-o", str(tmp_path / "b"), "--tokenizer", qwen, "--seq-length", "128", "--partition", "0/2")
    assert broken.exit_code == 1 and "bad.jsonl:31" in broken.output


def test_partition_by_file_and_cli_merge(tmp_path, qwen):
    rec = '{{"id": "{1}-{0}", "messages": [{{"role": "user", "content": "q {0}"}}, {{"role": "assistant", "content": "a {0}"}}]}}\n'
    for f in "abcd":
        (tmp_path / f"{f}.jsonl").write_text("".join(rec.format(i, f) for i in range(5)))
    glob = str(tmp_path / "*.jsonl")
    for i in range(2):
        r = invoke("pack", glob, "-o", str(tmp_path / f"p{i}"), "--tokenizer", qwen, "--seq-length", "64",
                   "--partition", f"{i}/2", "--partition-by", "file", "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["records_in"] == 10  # only its own two files were read
    ids0 = {d for row in open_dataset(tmp_path / "p0").iter_rows() for d in row.doc_ids}
    assert {i.split("-")[0] for i in ids0} == {"a", "c"}
    merged = invoke("merge", str(tmp_path / "p0"), str(tmp_path / "p1"), "-o", str(tmp_path / "m"), "--json")
    assert merged.exit_code == 0, merged.output
    summary = json.loads(merged.stdout)
    assert summary["documents"] == 20 and summary["records_in"] == 20
    assert invoke("verify", str(tmp_path / "m")).exit_code == 0
    assert json.loads(invoke("merge", str(tmp_path / "p0"), str(tmp_path / "p1"), "-o", str(tmp_path / "m"), "--json").stdout)["reused"]
    refused = invoke("merge", str(tmp_path / "p0"), "-o", str(tmp_path / "m"), "--allow-partial")
    assert refused.exit_code == 1 and "not merged from these parts" in refused.output
    three = invoke("pack", glob, "-o", str(tmp_path / "p9"), "--tokenizer", qwen, "--seq-length", "64",
                   "--partition", "4/5", "--partition-by", "file")
    assert three.exit_code == 1 and "gets no input file" in three.output
    assert np.all(open_dataset(tmp_path / "m").take([0])[0] >= 0)


def test_skipped_records_are_counted_once_for_the_whole_job(tmp_path, qwen):
    rec = '{{"id": "r{0}", "messages": [{{"role": "user", "content": "q {0}"}}, {{"role": "assistant", "content": "a {0}"}}]}}\n'
    lines = [rec.format(i) for i in range(12)]
    lines.insert(5, '{"id": "bad", "messages": []}\n')
    src = tmp_path / "conv.jsonl"
    src.write_text("".join(lines))
    opts = dict(seq_length=64, on_error="skip")
    single = pack_dataset([str(src)], tmp_path / "single", qwen, PackOptions(**opts))
    parts = [tmp_path / f"p{i}" for i in range(3)]
    for i, p in enumerate(parts):
        pack_dataset([str(src)], p, qwen, PackOptions(**opts, partition=Partition(i, 3)))
    merged = merge_datasets(parts, tmp_path / "m")
    assert single["records_in"] == merged["records_in"] == 13
    assert sum(single["skipped"].values()) == sum(merged["skipped"].values()) == 1
    assert merged["skipped"] == single["skipped"]
    assert documents(tmp_path / "m") == documents(tmp_path / "single")
    # An input rewritten (same size) between two partitions' runs is caught by the content hashes.
    src.write_text("".join(lines).replace('"a 7"', '"b 7"'))
    pack_dataset([str(src)], parts[1], qwen, PackOptions(**opts, partition=Partition(1, 3), overwrite=True))
    with pytest.raises(FormatError, match="different input contents"):
        merge_datasets(parts, tmp_path / "m2")
