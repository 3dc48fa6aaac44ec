"""Every input format and file form converts to the expected canonical conversations.

Expected records are built here independently (json.load + the rules in BRIEF.md), never read back from
our own output, so a wrong conversion fails.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard

from dataprep.convert import ConvertOptions, ConvertStats, iter_conversations


def convert(paths, **opts) -> tuple[list[dict], ConvertStats]:
    stats = ConvertStats()
    records = list(iter_conversations([str(p) for p in paths], ConvertOptions(**opts), stats))
    return records, stats


def alpaca_expected(rec: dict) -> list[dict]:
    user = rec["instruction"] + ("\n\n" + rec["input"] if rec.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# ------------------------------------------------------------------ real files in ../shared/data


@pytest.mark.parametrize("name", ["alpaca_tiny_100.json", "alpaca_gpt4_en_demo_1k.json"])
def test_real_alpaca_json_arrays(shared_data, name):
    path = shared_data / "alpaca" / name
    source = json.loads(path.read_text(encoding="utf-8"))
    records, stats = convert([path])
    assert stats.formats == {"alpaca": 1}
    assert stats.records_in == stats.records_out == len(source) and not stats.skipped
    assert [r["messages"] for r in records] == [alpaca_expected(s) for s in source]
    assert [r["id"] for r in records] == [f"{name}[{i}]" for i in range(len(source))]


def test_real_alpaca_tiny_has_46_records_with_input(shared_data):
    # The data README says 46 of the 100 have an input: each of those becomes instruction + "\n\n" + input.
    path = shared_data / "alpaca" / "alpaca_tiny_100.json"
    source = json.loads(path.read_text(encoding="utf-8"))
    records, _ = convert([path])
    joined = [r for r, s in zip(records, source, strict=True) if r["messages"][0]["content"] == s["instruction"] + "\n\n" + s["input"]]
    assert len(joined) == 46


def test_real_self_instruct_seed_tasks(shared_data):
    path = shared_data / "alpaca" / "stanford_alpaca_seed_tasks.jsonl"
    source = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    records, stats = convert([path])
    assert stats.formats == {"self-instruct": 1}
    assert stats.records_in == stats.records_out == 175
    expected = [alpaca_expected({"instruction": s["instruction"], **s["instances"][0]}) for s in source]
    assert [r["messages"] for r in records] == expected
    assert [r["id"] for r in records] == [s["id"] for s in source]


@pytest.mark.parametrize("name,count", [("paddlenlp_advertisegen_train.json", 20), ("paddlenlp_advertisegen_dev.json", 5)])
def test_real_paddlenlp_src_tgt_without_trailing_newline(shared_data, name, count):
    path = shared_data / "sft_src_tgt" / name
    raw = path.read_bytes()
    assert not raw.endswith(b"\n")  # the case under test: the last line has no newline
    source = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
    records, stats = convert([path])
    assert stats.formats == {"src-tgt": 1}
    assert len(records) == count == len(source)
    assert [r["messages"] for r in records] == [
        [{"role": "user", "content": s["src"]}, {"role": "assistant", "content": s["tgt"]}] for s in source
    ]
    assert [r["id"] for r in records] == [f"{name}:{i + 1}" for i in range(count)]


def test_several_inputs_and_globs_keep_order(shared_data, tmp_path):
    src_dir = shared_data / "sft_src_tgt"
    records, stats = convert([src_dir / "paddlenlp_advertisegen_train.json", src_dir / "paddlenlp_advertisegen_dev.json"])
    globbed, gstats = convert([src_dir / "paddlenlp_advertisegen_*.json"])
    assert stats.files == gstats.files == 2 and len(records) == len(globbed) == 25
    # globs expand sorted: dev before train
    assert [r["id"] for r in globbed[:5]] == [f"paddlenlp_advertisegen_dev.json:{i}" for i in range(1, 6)]
    assert sorted(r["id"] for r in records) == sorted(r["id"] for r in globbed)


# ------------------------------------------------------------------ synthetic files for the other formats

SHAREGPT = [
    {"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    {
        "id": "b",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "user", "value": "2+2?"},
            {"from": "assistant", "value": "4"},
            {"from": "human", "value": "3+3?"},
            {"from": "gpt", "value": "6"},
        ],
    },
    {"system": "Top-level system.", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
]
SHAREGPT_EXPECTED = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
    ],
    [{"role": "system", "content": "Top-level system."}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
]


def test_sharegpt_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "sharegpt.jsonl", SHAREGPT)
    records, stats = convert([path])
    assert stats.formats == {"sharegpt": 1}
    assert [r["messages"] for r in records] == SHAREGPT_EXPECTED
    assert [r["id"] for r in records] == ["a", "b", "sharegpt.jsonl:3"]


def test_mindformers_json_array_as_written_by_its_converter(tmp_path):
    # MindFormers' alpaca converter writes json.dump(..., ensure_ascii=False, indent=2) with string ids.
    data = [
        {"id": str(i + 1), "conversations": [{"from": "human", "value": f"问题 {i} }}, {{"}, {"from": "gpt", "value": f"答案 {i}"}]}
        for i in range(5)
    ]
    path = tmp_path / "mf.json"
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    records, stats = convert([path])
    assert stats.formats == {"sharegpt": 1}
    assert [r["id"] for r in records] == ["1", "2", "3", "4", "5"]
    assert records[3]["messages"] == [{"role": "user", "content": "问题 3 }, {"}, {"role": "assistant", "content": "答案 3"}]


def test_openai_messages_with_text_parts(tmp_path):
    data = [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "part1 "}, {"type": "text", "text": "part2"}]},
                      {"role": "assistant", "content": "ok"}]},
    ]
    records, stats = convert([write_jsonl(tmp_path / "m.jsonl", data)])
    assert stats.formats == {"messages": 1}
    assert records[0]["messages"] == data[0]["messages"]
    assert records[1]["messages"][0] == {"role": "user", "content": "part1 part2"}


def test_alpaca_system_history_and_empty_input(tmp_path):
    data = [
        {"instruction": "Q2", "input": "", "output": "A2", "system": "Sys", "history": [["Q1", "A1"]]},
        {"instruction": "Q", "input": "  ", "output": "A"},  # whitespace-only input counts as no input
        {"instruction": "Q", "output": "A", "system": "", "history": None},  # absent / null optional fields
    ]
    records, _ = convert([write_jsonl(tmp_path / "a.jsonl", data)])
    assert records[0]["messages"] == [
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    assert records[1]["messages"][0]["content"] == "Q"
    assert records[2]["messages"] == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_src_tgt_multi_turn_and_context_system(tmp_path):
    data = [{"src": ["a", "b"], "tgt": ["1", "2"], "context": {"system": "sys"}}]
    records, _ = convert([write_jsonl(tmp_path / "st.jsonl", data)])
    assert records[0]["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "2"},
    ]


def test_self_instruct_with_several_instances_keeps_each(tmp_path):
    data = [{"id": "t", "instruction": "Do", "instances": [{"input": "x", "output": "1"}, {"input": "", "output": "2"}]}]
    records, stats = convert([write_jsonl(tmp_path / "s.jsonl", data)])
    assert stats.records_in == 1 and stats.records_out == 2
    assert [r["id"] for r in records] == ["t-0", "t-1"]
    assert [r["messages"][0]["content"] for r in records] == ["Do\n\nx", "Do"]


def test_input_format_override_and_alias(tmp_path):
    # Auto detection would call this src-tgt; forcing alpaca makes each record a missing-field error.
    path = write_jsonl(tmp_path / "x.jsonl", [{"src": "a", "tgt": "b", "instruction": "I", "output": "O"}])
    auto, _ = convert([path])
    assert auto[0]["messages"][0]["content"] == "a"
    forced, stats = convert([path], input_format="alpaca")
    assert forced[0]["messages"][0]["content"] == "I" and stats.formats == {"alpaca": 1}
    mf, stats = convert([write_jsonl(tmp_path / "y.jsonl", SHAREGPT)], input_format="MindFormers")
    assert stats.formats == {"sharegpt": 1} and len(mf) == 3


def test_system_option_adds_only_where_missing(tmp_path):
    records, _ = convert([write_jsonl(tmp_path / "s.jsonl", SHAREGPT)], system="Default")
    assert records[0]["messages"][0] == {"role": "system", "content": "Default"}
    assert records[1]["messages"][0] == {"role": "system", "content": "Be brief."}


# ------------------------------------------------------------------ file forms


@pytest.mark.parametrize("as_array", [False, True])
@pytest.mark.parametrize("compression", ["gz", "zst"])
def test_compressed_inputs_match_plain(tmp_path, compression, as_array):
    data = [{"instruction": f"I{i}", "input": "in" if i % 2 else "", "output": f"O{i} 中文"} for i in range(300)]
    text = json.dumps(data, ensure_ascii=False, indent=1) if as_array else "".join(json.dumps(r) + "\n" for r in data)
    plain = tmp_path / ("p.json" if as_array else "p.jsonl")
    plain.write_text(text, encoding="utf-8")
    packed = tmp_path / f"c.data.{compression}"  # the name says nothing about the inner form: sniffed, not guessed
    raw = text.encode("utf-8")
    packed.write_bytes(gzip.compress(raw) if compression == "gz" else zstandard.ZstdCompressor().compress(raw))
    expected, _ = convert([plain])
    got, stats = convert([packed])
    assert [r["messages"] for r in got] == [r["messages"] for r in expected] == [alpaca_expected(d) for d in data]
    assert stats.bytes_in == packed.stat().st_size


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"instruction": "a", "output": "b"}\r\n\r\n{"instruction": "c", "output": "d"}\r\n')
    records, _ = convert([path])
    assert [r["id"] for r in records] == ["bom.jsonl:1", "bom.jsonl:3"]


def test_empty_inputs_give_no_records(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.json").write_text(" [ ] \n")
    records, stats = convert([tmp_path / "empty.jsonl", tmp_path / "empty.json"])
    assert records == [] and stats.records_in == 0 and stats.files == 2


# ------------------------------------------------------------------ Hugging Face datasets


def test_hf_save_to_disk_directory_and_hf_prefix(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": f"q{i}", "input": "ctx" if i == 1 else "", "output": f"a{i}"} for i in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    records, stats = convert([tmp_path / "ds"])
    assert [r["messages"] for r in records] == [alpaca_expected(r) for r in rows]
    assert [r["id"] for r in records] == [f"ds[{i}]" for i in range(4)]
    again, _ = convert([f"hf:{tmp_path / 'ds'}"])
    assert again == records


def test_hf_dataset_dict_split_choice(tmp_path):
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_list([{"conversations": [{"from": "human", "value": "t"}, {"from": "gpt", "value": "T"}]}])
    test = datasets.Dataset.from_list([{"conversations": [{"from": "human", "value": "e"}, {"from": "gpt", "value": "E"}]}] * 2)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    records, _ = convert([tmp_path / "dd"])
    assert [r["messages"][0]["content"] for r in records] == ["t"]
    records, _ = convert([f"hf:{tmp_path / 'dd'}:test"])
    assert [r["messages"][0]["content"] for r in records] == ["e", "e"]


def test_hf_load_dataset_offline_from_local_folder(tmp_path):
    # The machine has no hub access; load_dataset on a local folder exercises the same hf:NAME path.
    pytest.importorskip("datasets")
    folder = tmp_path / "local_hub_like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"src": "s", "tgt": "t"}, {"src": ["a", "b"], "tgt": ["1", "2"]}])
    records, stats = convert([f"hf:{folder}"])
    assert stats.formats == {"src-tgt": 1}
    assert [len(r["messages"]) for r in records] == [2, 4]


def test_hf_missing_hub_name_is_a_clear_error():
    pytest.importorskip("datasets")
    from dataprep.errors import DataError

    with pytest.raises(DataError, match="cannot open Hugging Face dataset offline"):
        convert(["hf:no-such-owner/no-such-dataset-xyz"])
