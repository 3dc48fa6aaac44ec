"""`convert --num-proc`: worker processes give the same bytes, counts, rejects and first error as one process."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataprep import convert_parallel, sources
from dataprep.convert import ConvertOptions, ConvertStats, convert_files
from dataprep.errors import DataError

TIMING = ("seconds", "records_per_second")


def convert(inputs, out: Path, num_proc: int, **opts) -> tuple[bytes, dict]:
    stats = ConvertStats()
    convert_files([str(p) for p in inputs], str(out), ConvertOptions(num_proc=num_proc, overwrite=True, **opts), stats)
    return out.read_bytes(), {k: v for k, v in stats.as_dict().items() if k not in TIMING}


def both(inputs, tmp_path: Path, **opts) -> tuple[bytes, dict]:
    """Convert with 1 and with 2 processes; assert the same bytes and counts; return them."""
    one = convert(inputs, tmp_path / "one.out", 1, **opts)
    two = convert(inputs, tmp_path / "two.out", 2, **opts)
    assert two[0] == one[0]
    assert two[1] == one[1]
    return one


def first_error(inputs, out: Path, num_proc: int, **opts) -> DataError:
    with pytest.raises(DataError) as info:
        convert_files([str(p) for p in inputs], str(out), ConvertOptions(num_proc=num_proc, **opts))
    assert not out.exists()
    return info.value


@pytest.fixture
def small_chunks(monkeypatch):
    """4 KiB reads: a few records per chunk, so many chunks are in flight and finish out of order."""
    monkeypatch.setattr(sources, "CHUNK_BYTES", 4096)


def _sync_pool(processes, config):
    """Runs the real worker function in this process, through pickle like the real pool: lets the
    hypothesis test below try hundreds of inputs without starting processes for each."""

    class Done:
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    class Pool:
        def submit(self, fn, job):
            return Done(pickle.loads(pickle.dumps(fn(pickle.loads(pickle.dumps(job)), config))))

        def shutdown(self, wait, cancel_futures):
            pass

    return Pool()


@pytest.mark.parametrize("style", ["messages", "mindformers"])
def test_real_files_same_bytes(shared_data, repo_root, tmp_path, small_chunks, style):
    inputs = [
        shared_data / "alpaca" / "alpaca_gpt4_en_demo_1k.json",
        shared_data / "alpaca" / "stanford_alpaca_seed_tasks.jsonl",
        shared_data / "sft_src_tgt" / "paddlenlp_advertisegen_train.json",
        repo_root / "examples" / "data" / "alpaca_example.json",
        repo_root / "examples" / "data" / "src_tgt_example.jsonl",
    ]
    data, stats = both(inputs, tmp_path, output_style=style, system="Be brief.")
    assert stats["records_out"] == 999 + 175 + 20 + 60
    assert stats["input_formats"] == {"alpaca": 2, "self-instruct": 1, "src-tgt": 2}
    if style == "messages":
        lines = data.decode("utf-8").splitlines()
        assert len(lines) == stats["records_out"] and json.loads(lines[0])["id"] == "alpaca_gpt4_en_demo_1k.json[0]"


def test_compact_array_with_cut_lookalikes_is_reread(tmp_path, small_chunks, caplog):
    # No newlines in the array, and strings full of "}, {": many cuts land inside strings.
    records = [{"instruction": f'q{i} {{"a": 1}}, {{"b": [{{}}, {{}}]}}, ' * (1 + i % 5), "output": f"}}, {{ a{i}"} for i in range(400)]
    path = tmp_path / "compact.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    caplog.set_level(logging.DEBUG, logger="dataprep.convert")
    data, stats = both([path], tmp_path)
    assert stats["records_out"] == 400
    assert [json.loads(x)["id"] for x in data.splitlines()] == [f"compact.json[{i}]" for i in range(400)]
    assert "re-reading" in caplog.text  # the recovery path really ran


@pytest.mark.parametrize("indent", [2, 0])
def test_pretty_printed_nested_array(tmp_path, small_chunks, indent):
    # ShareGPT with "},\n{" inside every record: with indent=2 the layout keeps cuts and counts between
    # records; with indent=0 nested and top-level separators look alike, so counts are wrong and
    # the chunk is re-read (then the file goes on with index tokens).
    convs = [{"conversations": [{"from": "human", "value": f"h{i}"}, {"from": "gpt", "value": f"g{i}"}] * 2} for i in range(300)]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs, indent=indent, ensure_ascii=False), encoding="utf-8")
    _, stats = both([path], tmp_path)
    assert stats["records_out"] == 300 and stats["input_formats"] == {"sharegpt": 1}


def test_index_token_in_the_data_falls_back(tmp_path, small_chunks, monkeypatch):
    monkeypatch.setattr(convert_parallel, "_new_token", lambda: "@@TOKEN@@")
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"instruction": f"say @@TOKEN@@ {i}", "output": "ok"} for i in range(200)], indent=1))
    data, _ = both([path], tmp_path)
    first = json.loads(data.splitlines()[0])
    assert first["id"] == "t.json[0]" and first["messages"][0]["content"] == "say @@TOKEN@@ 0"


def test_first_error_in_input_order_wins(tmp_path, small_chunks):
    lines = [json.dumps({"instruction": f"q{i}", "output": "a"}) for i in range(3000)]
    lines[39] = json.dumps({"instruction": "q"})  # line 40: missing output
    lines[2499] = "{broken"  # line 2500, in a chunk that may well finish first
    path = tmp_path / "e.jsonl"
    path.write_text("\n".join(lines) + "\n")
    one = first_error([path], tmp_path / "one.jsonl", 1)
    two = first_error([path], tmp_path / "two.jsonl", 2)
    assert str(two) == str(one) and two.line == 40 and two.reason == "missing_field"
    assert os.listdir(tmp_path) == ["e.jsonl"]  # no output, no temp file


@pytest.mark.parametrize(
    "bad,reason",
    [({"instruction": "q", "output": ""}, "empty_assistant_turn"), ('{"instruction": oops}', "invalid_json"), ('"text"', "not_an_object")],
)
def test_array_errors_match_one_process(tmp_path, small_chunks, bad, reason):
    good = [json.dumps({"instruction": f"q{i}", "output": "a"}, indent=2) for i in range(600)]
    good[450] = bad if isinstance(bad, str) else json.dumps(bad, indent=2)
    path = tmp_path / "a.json"
    path.write_text("[\n" + ",\n".join(good) + "\n]\n")
    one = first_error([path], tmp_path / "one.jsonl", 1)
    two = first_error([path], tmp_path / "two.jsonl", 2)
    assert str(two) == str(one) and two.reason == reason and two.record == 450


def test_skip_counts_and_rejects_match(tmp_path, small_chunks):
    lines = []
    for i in range(2000):
        if i % 97 == 5:
            lines.append(b'{"instruction": "x", "output": "\xff"}')
        elif i % 89 == 3:
            lines.append(json.dumps({"instruction": "q", "output": 3}).encode())
        else:
            lines.append(json.dumps({"instruction": f"q{i}", "output": "a"}).encode())
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    array = tmp_path / "m.json"
    array.write_text(json.dumps([{"instruction": f"q{i}", "output": "" if i % 50 == 7 else "a"} for i in range(1000)], indent=1))
    results = []
    for n in (1, 2):
        rejects = tmp_path / f"rej{n}.jsonl"
        results.append((*convert([jsonl, array], tmp_path / f"o{n}", n, on_error="skip", rejects=str(rejects)), rejects.read_bytes()))
    assert results[0] == results[1]
    stats = results[0][1]
    assert stats["skipped"] == {"invalid_utf8": 21, "wrong_type": 23, "empty_assistant_turn": 20}
    assert stats["records_in"] == 3000 == stats["records_out"] + stats["skipped_total"]


def test_take_and_shuffle_run_in_one_process(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(50)))
    _, stats = both([path], tmp_path, take=7, shuffle=True, seed=3)
    assert stats["records_out"] == 7 and stats["stopped_at_take"]


def test_num_proc_zero_means_one_per_cpu():
    assert ConvertOptions(num_proc=0).num_proc == (os.cpu_count() or 1)
    with pytest.raises(ValueError):
        ConvertOptions(num_proc=-1)


_text = st.text(alphabet=st.sampled_from(list('ab }{][,"\\:') + ["\n", "中", "@"]), max_size=12)
_rec = st.fixed_dictionaries(
    {"instruction": _text, "output": _text},
    optional={"id": st.one_of(st.integers(0, 5), _text), "input": _text, "meta": st.lists(st.fixed_dictionaries({"k": _text}), max_size=2)},
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(st.one_of(_rec, st.just("not an object")), max_size=14), indent=st.sampled_from([None, 0, 1]),
       chunk=st.sampled_from([3, 16, 64]), as_array=st.booleans(), on_error=st.sampled_from(["fail", "skip"]),
       input_format=st.sampled_from(["auto", "alpaca"]))
def test_cuts_and_recovery_match_one_process(tmp_path, monkeypatch, records, indent, chunk, as_array, on_error, input_format):
    """Any records, any chunking: the parallel reader's bytes, counts or first error equal one process's."""
    monkeypatch.setattr(sources, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(convert_parallel, "_start_pool", _sync_pool)
    path = tmp_path / ("h.json" if as_array else "h.jsonl")
    if as_array:
        path.write_text(json.dumps(records, indent=indent, ensure_ascii=False), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    outcome = []
    for n in (1, 2):
        rejects = tmp_path / f"r{n}.jsonl"
        opts = {"rejects": str(rejects)} if on_error == "skip" else {}
        try:
            result = convert([path], tmp_path / f"o{n}", n, on_error=on_error, input_format=input_format, **opts)
            outcome.append((*result, rejects.read_bytes() if opts else None))
        except DataError as err:
            outcome.append(("error", str(err)))
    assert outcome[0] == outcome[1]


def test_cli_num_proc(tmp_path):
    from click.testing import CliRunner

    from cli.dataprep import main

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(30)))
    outs = []
    for n in ("1", "2"):
        out = tmp_path / f"o{n}.jsonl"
        result = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--num-proc", n, "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["num_proc"] == int(n)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and len(outs[0].splitlines()) == 30
    assert CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "x"), "--num-proc", "-1"]).exit_code == 2


def test_compressed_and_bom_inputs(tmp_path, small_chunks):
    """Workers read plain files by offset (a byte order mark shifts it) and get compressed text sent."""
    import gzip

    rows = [{"instruction": f"q{i} 中文", "output": f"a{i}"} for i in range(400)]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows).encode("utf-8"))
    bom_array = tmp_path / "bom.json"
    bom_array.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, indent=2, ensure_ascii=False).encode("utf-8"))
    packed = tmp_path / "rows.json.gz"
    packed.write_bytes(gzip.compress(json.dumps(rows, indent=1).encode("utf-8")))
    data, stats = both([bom, bom_array, packed], tmp_path)
    assert stats["records_out"] == 1200
    ids = [json.loads(x)["id"] for x in data.splitlines()]
    assert ids[:2] == ["bom.jsonl:1", "bom.jsonl:2"] and ids[400] == "bom.json[0]" and ids[-1] == "rows.json.gz[399]"
