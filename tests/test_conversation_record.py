"""The grown conversation record: tools, tool calls, tool results, reasoning, per-turn `train`, unmapped fields.

Every reader maps its form onto the one record (CONTRACTS.md); convert writes it and reads it back
unchanged; every bad new shape is refused with the file and line.
"""

from __future__ import annotations

import json
import os

import pytest

from dataprep.convert import ConvertOptions, ConvertStats, convert_files, iter_conversations
from dataprep.errors import DataError

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

OPENAI_RECORD = {
    "id": "t1",
    "tools": [WEATHER_TOOL],
    "messages": [
        {"role": "system", "content": "You can look up the weather."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "I should call the tool.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "{\"temp_c\": 18}"},
        {"role": "assistant", "content": "<think>\nIt is 18 C.\n</think>\n\nIt is 18 °C in Paris.", "train": False},
        {"role": "user", "content": "And in Rome?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "content": "{\"temp_c\": 24}"},
        {"role": "assistant", "content": "24 °C.", "weight": 1},
    ],
}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return str(path)


def convert_one(tmp_path, raw, **options):
    return list(iter_conversations([write_jsonl(tmp_path / "in.jsonl", [raw])], ConvertOptions(**options), ConvertStats()))


def test_openai_record_maps_every_field(tmp_path):
    (rec,) = convert_one(tmp_path, OPENAI_RECORD)
    assert rec["tools"] == [WEATHER_TOOL]
    m = rec["messages"]
    assert [x["role"] for x in m] == ["system", "user", "assistant", "tool", "assistant", "user", "assistant", "tool", "assistant"]
    assert m[2] == {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.",
                    "tool_calls": OPENAI_RECORD["messages"][2]["tool_calls"]}
    # arguments are kept as given: a JSON string stays a string, an object stays an object
    assert m[2]["tool_calls"][0]["function"]["arguments"] == "{\"city\": \"Paris\"}"
    assert m[6]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}
    assert m[3] == {"role": "tool", "content": "{\"temp_c\": 18}", "tool_call_id": "call_1", "name": "get_weather"}
    # a leading <think> block is reasoning (split the way Qwen3's template splits it); train flags kept
    assert m[4] == {"role": "assistant", "content": "It is 18 °C in Paris.", "reasoning_content": "It is 18 C.",
                    "train": False}
    assert m[8] == {"role": "assistant", "content": "24 °C.", "train": True}  # OpenAI weight 1 -> train true


def test_convert_round_trips_the_new_fields(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [OPENAI_RECORD, {**OPENAI_RECORD, "id": "t2", "source": "web"}])
    out = tmp_path / "conv.jsonl"
    stats = convert_files([src], str(out), ConvertOptions())
    first = list(iter_conversations([src], ConvertOptions(), ConvertStats()))
    again = list(iter_conversations([str(out)], ConvertOptions(), ConvertStats()))
    assert again == first  # messages, tools, reasoning, train flags and extras survive convert -> read back
    out2 = tmp_path / "conv2.jsonl"
    convert_files([str(out)], str(out2), ConvertOptions())
    assert out2.read_bytes() == out.read_bytes()
    assert first[1]["extra"] == {"source": "web"}
    assert stats.unknown_fields == {"source": 1}


def test_unknown_fields_are_kept_counted_or_refused(tmp_path):
    raw = {"instruction": "Say hi", "output": "Hi", "text": "### Instruction: Say hi", "category": "greet"}
    msg = {"messages": [{"role": "user", "content": "q", "lang": "en"}, {"role": "assistant", "content": "a"}]}
    src = write_jsonl(tmp_path / "a.jsonl", [raw, raw])
    src2 = write_jsonl(tmp_path / "b.jsonl", [msg])
    stats = ConvertStats()
    recs = list(iter_conversations([src, src2], ConvertOptions(), stats))
    assert recs[0]["extra"] == {"text": "### Instruction: Say hi", "category": "greet"}
    assert recs[2]["messages"][0]["extra"] == {"lang": "en"}
    assert stats.unknown_fields == {"text": 2, "category": 2, "messages.lang": 1}
    assert stats.as_dict()["unknown_fields"] == {"text": 2, "category": 2, "messages.lang": 1}
    with pytest.raises(DataError, match=r"a\.jsonl:1: fields no reader maps: category, text") as e:
        list(iter_conversations([src], ConvertOptions(on_unknown_field="fail"), ConvertStats()))
    assert e.value.reason == "unknown_field"
    skipping = ConvertStats()
    assert list(iter_conversations([src], ConvertOptions(on_unknown_field="fail", on_error="skip"), skipping)) == []
    assert skipping.skipped == {"unknown_field": 2}


def test_llamafactory_sharegpt_with_function_calls(tmp_path):
    raw = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"},
            {"from": "observation", "value": "{\"temp_c\": 18}"},
            {"from": "gpt", "value": "It is 18 °C."},
        ],
        "system": "Be brief.",
        "tools": json.dumps([WEATHER_TOOL["function"]]),
    }
    (rec,) = convert_one(tmp_path, raw)
    assert rec["tools"] == [WEATHER_TOOL["function"]]  # JSON text parsed into the list templates take
    assert rec["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "{\"temp_c\": 18}"},
        {"role": "assistant", "content": "It is 18 °C."},
    ]


def test_alpaca_and_src_tgt_reasoning(tmp_path):
    (rec,) = convert_one(tmp_path, {"instruction": "2+2?", "output": "<think>add</think>4"})
    assert rec["messages"][1] == {"role": "assistant", "content": "4", "reasoning_content": "add"}
    (rec,) = convert_one(tmp_path, {"src": ["a", "b"], "tgt": ["<think>\nx\n</think>\n\ny", "z"]})
    assert rec["messages"][1] == {"role": "assistant", "content": "y", "reasoning_content": "x"}


@pytest.mark.parametrize(
    ("messages", "reason", "text"),
    [
        ([{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}],
         "tool_result_without_call", "turn 1 is a tool result with no tool call before it"),
        ([{"role": "user", "content": "q"},
          {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"arguments": {}}}]}],
         "bad_tool_call", "turn 1 tool_calls\\[0\\] has no function name"),
        ([{"role": "user", "content": "q"},
          {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}],
         "bad_tool_call", "turn 1 tool_calls\\[0\\] arguments are not JSON"),
        ([{"role": "user", "content": "q"},
          {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}],
         "bad_tool_call", "turn 1 tool_calls\\[0\\] arguments must be a JSON object"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": "no"}],
         "wrong_type", "'train' must be true or false"),
        ([{"role": "user", "content": "q", "train": True}, {"role": "assistant", "content": "a"}],
         "wrong_type", "only assistant turns are trained"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": 3}],
         "wrong_type", "'reasoning_content' must be a string"),
        ([{"role": "user", "content": "q"},
          {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]},
          {"role": "tool", "content": "r"}],
         "turns_out_of_order", "conversation ends with a tool result that has no assistant answer"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], "empty_assistant_turn", "turn 1 \\(assistant\\) is empty"),
    ],
)
def test_bad_new_shapes_name_file_and_line(tmp_path, messages, reason, text):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "ok"},
                                                              {"role": "assistant", "content": "ok"}]},
                                                {"messages": messages}])
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: (turn \d.*)?{text}") as e:
        list(iter_conversations([path], ConvertOptions(), ConvertStats()))
    assert e.value.reason == reason


def test_bad_tools_and_function_call(tmp_path):
    ok = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    path = write_jsonl(tmp_path / "t.jsonl", [{"conversations": ok, "tools": "[{\"description\": \"no name\"}]"}])
    with pytest.raises(DataError, match=r"t\.jsonl:1: tools\[0\] must be a function spec") as e:
        list(iter_conversations([path], ConvertOptions(), ConvertStats()))
    assert e.value.reason == "bad_tools"
    bad_call = [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{not json"}]
    path = write_jsonl(tmp_path / "f.jsonl", [{"conversations": bad_call}])
    with pytest.raises(DataError, match=r"f\.jsonl:1: conversations\[1\] \(function_call\) value is not valid JSON"):
        list(iter_conversations([path], ConvertOptions(), ConvertStats()))


def test_mindformers_style_refuses_tool_calls_instead_of_dropping_them(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [OPENAI_RECORD])
    with pytest.raises(DataError, match="cannot represent"):
        convert_files([src], str(tmp_path / "out.json"), ConvertOptions(output_style="mindformers"))
    assert not (tmp_path / "out.json").exists()


def test_parallel_convert_counts_unknown_fields_like_one_process(tmp_path):
    rows = [{"instruction": f"q{i}", "output": "a", "src_url": "u"} if i % 3 == 0 else {"instruction": f"q{i}", "output": "a"}
            for i in range(3000)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    one, many = ConvertStats(), ConvertStats()
    convert_files([src], str(tmp_path / "a.jsonl"), ConvertOptions(), one)
    convert_files([src], str(tmp_path / "b.jsonl"), ConvertOptions(num_proc=2), many)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert one.unknown_fields == many.unknown_fields == {"src_url": 1000}


def test_tool_records_serialize_the_same_in_parallel_and_in_arrays(tmp_path):
    """Records with tools and extras (tool calls carry objects with an "id" key after lists) keep exact record
    boundaries in the batched serializer: JSON Lines and JSON-array inputs, one process and two."""
    rows = []
    for i in range(2500):
        rec = json.loads(json.dumps(OPENAI_RECORD))
        rec["id"] = f"r{i}"
        rec["messages"][2]["tool_calls"][0]["tags"] = ["x", i]  # a list last inside a call object
        if i % 2:
            rec["source"] = {"url": f"u{i}"}
        rows.append(rec)
    jsonl = write_jsonl(tmp_path / "in.jsonl", rows)
    array = tmp_path / "in.json"
    array.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n")
    outs = []
    for src in (jsonl, str(array)):
        for n in (1, 2):
            out = tmp_path / f"o-{n}-{os.path.basename(src)}.jsonl"
            convert_files([src], str(out), ConvertOptions(num_proc=n))
            outs.append(out.read_bytes())
    assert outs[0] == outs[1] and outs[2] == outs[3]
    back = [json.loads(line) for line in outs[0].splitlines()]
    assert len(back) == 2500, len(back)
    assert back[1].get("extra") == {"source": {"url": "u1"}}, back[1]
    assert back[7]["messages"][2]["tool_calls"][0]["tags"] == ["x", 7]  # a call is kept whole, as given


def test_convert_cli_reports_unknown_fields_and_can_refuse_them(tmp_path):
    from click.testing import CliRunner

    from cli.convert import convert

    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "q", "output": "a", "text": "t"}])
    runner = CliRunner()
    ok = runner.invoke(convert, [src, "-o", str(tmp_path / "o.jsonl"), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output)["unknown_fields"] == {"text": 1}
    refused = runner.invoke(convert, [src, "-o", str(tmp_path / "o2.jsonl"), "--on-unknown-field", "fail"])
    assert refused.exit_code == 1 and "in.jsonl:1: fields no reader maps: text" in refused.output
    assert not (tmp_path / "o2.jsonl").exists()


@pytest.mark.parametrize("raw", [
    {"instruction": "q", "output": "a", "extra": {"k": 1}},
    {"src": "q", "tgt": "a", "extra": {"k": 1}},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "extra": {"k": 1}},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "extra": {"k": 1}},
])
def test_a_records_own_extra_is_kept_in_every_format(tmp_path, raw):
    (rec,) = convert_one(tmp_path, raw)
    assert rec["extra"] == {"k": 1}
