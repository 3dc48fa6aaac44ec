"""What convert writes: round-trips, the MindFormers style, atomic all-or-nothing output, take and shuffle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dataprep import output_styles
from dataprep.conversation import validate_record
from dataprep.convert import ConvertOptions, ConvertStats, convert_files, iter_conversations
from dataprep.errors import DataError

# The two Stanford Alpaca training prompts, written out in full here (not built from our constants),
# so a typo in output_styles fails this test.
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nNAME THE COLOR.\n\n### Response:"
)
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\nADD.\n\n### Input:\n2 and 3\n\n### Response:"
)


def read_back(path: Path, **opts) -> list[dict]:
    return list(iter_conversations([str(path)], ConvertOptions(**opts), ConvertStats()))


def jsonl_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_round_trip_real_data(shared_data, tmp_path):
    inputs = [
        str(shared_data / "alpaca" / "alpaca_gpt4_en_demo_1k.json"),
        str(shared_data / "alpaca" / "stanford_alpaca_seed_tasks.jsonl"),
        str(shared_data / "sft_src_tgt" / "*.json"),
    ]
    direct = list(iter_conversations(inputs, ConvertOptions(), ConvertStats()))
    out = tmp_path / "conv.jsonl"
    stats = convert_files(inputs, str(out), ConvertOptions())
    assert stats.records_out == len(direct) == 999 + 175 + 25
    back = read_back(out)
    assert back == direct  # ids and messages survive a write and a re-read unchanged
    for rec in jsonl_lines(out):
        validate_record(rec)
        # the seed tasks' name and is_classification have no place in a conversation: kept under "extra"
        seed = "is_classification" in rec.get("extra", {})
        assert set(rec) == ({"id", "extra", "messages"} if seed else {"id", "messages"})
    assert stats.unknown_fields == {"name": 175, "is_classification": 175}
    assert len({r["id"] for r in back}) == len(back)


def test_round_trip_example_data_with_system(repo_root, tmp_path):
    inputs = [str(repo_root / "examples" / "data" / "alpaca_example.json"), str(repo_root / "examples" / "data" / "src_tgt_example.jsonl")]
    out = tmp_path / "conv.jsonl"
    stats = convert_files(inputs, str(out), ConvertOptions(system="Be helpful."))
    assert stats.records_out == 60 and not stats.skipped
    back = read_back(out)
    assert back == list(iter_conversations(inputs, ConvertOptions(system="Be helpful."), ConvertStats()))
    assert all(r["messages"][0]["role"] == "system" for r in back)
    # records with their own system prompt keep it
    assert sum(r["messages"][0]["content"] != "Be helpful." for r in back) == 4 + 5


def test_mindformers_style_matches_its_converter(tmp_path):
    data = [
        {"instruction": "NAME THE COLOR.", "input": "", "output": "Blue."},
        {"instruction": "ADD.", "input": "2 and 3", "output": "5"},
        {"instruction": "ADD.", "input": "2 and 3", "output": "5", "history": [["hi", "hello"]], "system": "S"},
    ]
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps(data))
    out = tmp_path / "mf.json"
    convert_files([str(src)], str(out), ConvertOptions(output_style="mindformers"))
    written = json.loads(out.read_text(encoding="utf-8"))  # one JSON array
    assert written[0] == {
        "id": "alpaca.json[0]",
        "conversations": [{"from": "human", "value": PROMPT_NO_INPUT}, {"from": "gpt", "value": "Blue."}],
    }
    assert written[1]["conversations"] == [{"from": "human", "value": PROMPT_INPUT}, {"from": "gpt", "value": "5"}]
    assert written[2]["conversations"] == [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "hello"},
        {"from": "human", "value": PROMPT_INPUT},
        {"from": "gpt", "value": "5"},
    ]
    # and it reads back as ShareGPT/MindFormers input
    back = read_back(out)
    assert [m["content"] for m in back[1]["messages"]] == [PROMPT_INPUT, "5"]


def test_mindformers_style_for_non_alpaca_keeps_user_turns(tmp_path):
    src = tmp_path / "st.jsonl"
    src.write_text(json.dumps({"src": ["a", "b"], "tgt": ["1", "2"]}) + "\n")
    out = tmp_path / "mf.json"
    convert_files([str(src)], str(out), ConvertOptions(output_style="mindformers"))
    assert json.loads(out.read_text())[0]["conversations"] == [
        {"from": "human", "value": "a"}, {"from": "gpt", "value": "1"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "2"}
    ]


def test_mindformers_style_empty_output_is_an_empty_array(tmp_path):
    src = tmp_path / "e.jsonl"
    src.write_text("")
    out = tmp_path / "mf.json"
    convert_files([str(src)], str(out), ConvertOptions(output_style="mindformers"))
    assert json.loads(out.read_text()) == []


def test_alpaca_prompt_helper_without_input():
    assert output_styles.alpaca_prompt("NAME THE COLOR.") == PROMPT_NO_INPUT
    assert output_styles.alpaca_prompt("ADD.", "2 and 3") == PROMPT_INPUT


# ------------------------------------------------------------------ atomicity and overwrite


def _bad_at_end(tmp_path: Path, n: int = 2000) -> Path:
    src = tmp_path / "bad_end.jsonl"
    lines = [json.dumps({"instruction": f"q{i}", "output": "a"}) for i in range(n)] + ['{"instruction": "q"}']
    src.write_text("\n".join(lines) + "\n")
    return src


def test_failure_leaves_no_output_and_no_temp_files(tmp_path):
    src = _bad_at_end(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(DataError, match=r"bad_end\.jsonl:2001: missing field 'output'"):
        convert_files([str(src)], str(out_dir / "conv.jsonl"), ConvertOptions(rejects=None))
    assert os.listdir(out_dir) == []


def test_failure_keeps_the_previous_output(tmp_path):
    src = _bad_at_end(tmp_path)
    out = tmp_path / "conv.jsonl"
    out.write_text("previous\n")
    with pytest.raises(DataError):
        convert_files([str(src)], str(out), ConvertOptions(overwrite=True, shuffle=True))
    assert out.read_text() == "previous\n"
    assert sorted(os.listdir(tmp_path)) == ["bad_end.jsonl", "conv.jsonl"]


def test_refuses_to_overwrite_without_flag(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    out = tmp_path / "conv.jsonl"
    out.write_text("keep me\n")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_files([str(src)], str(out), ConvertOptions())
    assert out.read_text() == "keep me\n"
    rejects = tmp_path / "rej.jsonl"
    rejects.write_text("old rejects\n")
    with pytest.raises(FileExistsError):
        convert_files([str(src)], str(tmp_path / "new.jsonl"), ConvertOptions(on_error="skip", rejects=str(rejects)))
    assert not (tmp_path / "new.jsonl").exists()
    convert_files([str(src)], str(out), ConvertOptions(overwrite=True))
    assert jsonl_lines(out)[0]["id"] == "a.jsonl:1"


# ------------------------------------------------------------------ take, shuffle, ids


def _numbered(tmp_path: Path, n: int) -> Path:
    src = tmp_path / "n.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(n)))
    return src


def test_take_stops_after_n_output_records(tmp_path):
    src = _numbered(tmp_path, 50)
    bad_first = tmp_path / "b.jsonl"
    bad_first.write_text('{"instruction": "x"}\n')
    stats = ConvertStats()
    records = list(iter_conversations([str(bad_first), str(src)], ConvertOptions(take=7, on_error="skip"), stats))
    assert [r["id"] for r in records] == [f"r{i}" for i in range(7)]
    assert stats.records_out == 7 and stats.take_reached and stats.records_in == 8  # stopped reading early


def test_shuffle_is_a_seeded_permutation(tmp_path):
    src = _numbered(tmp_path, 200)
    ids = [r["id"] for r in read_back(src)]
    a = [r["id"] for r in read_back(src, shuffle=True, seed=1)]
    b = [r["id"] for r in read_back(src, shuffle=True, seed=1)]
    c = [r["id"] for r in read_back(src, shuffle=True, seed=2)]
    assert a == b and a != c and a != ids
    assert sorted(a) == sorted(ids) == sorted(c)


def test_shuffle_in_files_matches_library_and_respects_take(tmp_path):
    src = _numbered(tmp_path, 100)
    out = tmp_path / "s.jsonl"
    convert_files([str(src)], str(out), ConvertOptions(shuffle=True, seed=3, take=10))
    got = [r["id"] for r in jsonl_lines(out)]
    assert sorted(got) == sorted(f"r{i}" for i in range(10)) and got != [f"r{i}" for i in range(10)]
    assert got == [r["id"] for r in read_back(src, shuffle=True, seed=3, take=10)]
    mf = tmp_path / "s.json"
    convert_files([str(src)], str(mf), ConvertOptions(shuffle=True, seed=3, take=10, output_style="mindformers"))
    assert [r["id"] for r in json.loads(mf.read_text())] == got


def test_ids_are_stable_across_runs_and_locations(tmp_path):
    src = tmp_path / "x.json"
    src.write_text(json.dumps([{"instruction": "q", "output": "a"}, {"id": 7, "instruction": "q", "output": "a"}]))
    first = [r["id"] for r in read_back(src)]
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "x.json").write_bytes(src.read_bytes())
    assert first == ["x.json[0]", "7"] == [r["id"] for r in read_back(moved / "x.json")]
