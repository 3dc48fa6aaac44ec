"""How converted conversations are written: canonical messages JSONL, or MindFormers' alpaca JSON.

`mindformers` reproduces what MindSpore Transformers' `alpaca_converter.py` writes, so a user can move
between tools without re-preparing data: a JSON array of `{"id", "conversations": [{"from": "human",
"value": <Stanford Alpaca prompt>}, {"from": "gpt", "value": <output>}]}`. The Stanford Alpaca prompt only
exists for records that have an instruction and an input; for those (Alpaca, self-instruct) the
instruction turn gets it. Other formats keep their user turns verbatim, history turns too, and a system
turn becomes `{"from": "system"}`. Two deliberate differences from MindFormers' script: ids are our
stable ids, not 1, 2, 3, ...; and the array has one element per line instead of `indent=2` (still one
JSON array, loadable by `json.load`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson

from dataprep import conversation as cv
from dataprep import input_formats as fmts
from dataprep.errors import DataError

MESSAGES = "messages"
MINDFORMERS = "mindformers"
STYLES = (MESSAGES, MINDFORMERS)

# Stanford Alpaca's training prompt (PROMPT_DICT in tatsu-lab/stanford_alpaca train.py), which
# MindFormers' converter applies: the same preamble with or without an "Input" section.
_PREAMBLE_NO_INPUT = "Below is an instruction that describes a task."
_PREAMBLE_INPUT = "Below is an instruction that describes a task, paired with an input that provides further context."
_ASK = "Write a response that appropriately completes the request."


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Stanford Alpaca prompt for one instruction (and input, when non-empty)."""
    if fmts.has_input(input_text):
        return f"{_PREAMBLE_INPUT} {_ASK}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:"
    return f"{_PREAMBLE_NO_INPUT} {_ASK}\n\n### Instruction:\n{instruction}\n\n### Response:"


_FROM = {cv.USER: "human", cv.ASSISTANT: "gpt", cv.SYSTEM: "system"}

# Where one serialized record ends and the next begins inside `orjson.dumps(list_of_records)`. Both
# styles write {"id": str, ..., <list>: [{...}, ...]} with the list last, so a record starts with '{"id":'
# and ends with "]}"; those bytes cannot occur inside a JSON string (orjson escapes every '"' there).
# Nested objects with an "id" key after a list (tool calls with unusual fields) could fake a boundary, so
# `serialize` counts them and falls back to one dump per record when there are more than records - 1.
_BOUNDARY = b']},{"id":'


def _mindformers_turn(m: dict[str, Any], record_id: str) -> dict[str, Any]:
    if m["role"] not in _FROM or "tool_calls" in m or "reasoning_content" in m:
        raise DataError(
            f"record {record_id!r} has tool calls, tool results or reasoning, which --output-style mindformers "
            "cannot represent; use --output-style messages",
            reason="unrepresentable",
        )
    turn = {"from": _FROM[m["role"]], "value": m["content"]}
    if cv.EXTRA in m:
        turn[cv.EXTRA] = m[cv.EXTRA]
    return turn


def mindformers_conversations(record: dict[str, Any], raw: Any, fmt: str | None) -> dict[str, Any]:
    if "tools" in record:
        _mindformers_turn({"role": cv.TOOL}, record["id"])
    turns = [_mindformers_turn(m, record["id"]) for m in record["messages"]]
    if fmt in (fmts.ALPACA, fmts.SELF_INSTRUCT):
        # The instruction turn is the last user turn; Alpaca history turns come before it.
        instruction, input_text = fmts.alpaca_prompt_parts(raw)
        last_user = max(i for i, t in enumerate(turns) if t["from"] == "human")
        turns[last_user]["value"] = alpaca_prompt(instruction, input_text)
    out: dict[str, Any] = {"id": record["id"]}
    if cv.EXTRA in record:
        out[cv.EXTRA] = record[cv.EXTRA]
    out["conversations"] = turns  # last, so the record ends with "]}" (see _BOUNDARY)
    return out


def _messages_objects(records: list[dict[str, Any]], sources: list[Any], fmt: str | None) -> list[dict[str, Any]]:
    return records


def _mindformers_objects(records: list[dict[str, Any]], sources: list[Any], fmt: str | None) -> list[dict[str, Any]]:
    return [mindformers_conversations(record, raw, fmt) for record, raw in zip(records, sources, strict=True)]


@dataclass(frozen=True)
class OutputStyle:
    """How records become bytes: items joined by `item_sep` (plus `item_end` after the last) make a
    blob; a file is `header` + blobs joined by `separator` + `footer`, or `empty` when there are none.
    `needs_sources`: the style reads the source records (`Converted.sources`)."""

    name: str
    objects: Callable[[list[dict[str, Any]], list[Any], str | None], list[dict[str, Any]]]
    needs_sources: bool
    item_sep: bytes
    item_end: bytes
    header: bytes
    separator: bytes
    footer: bytes
    empty: bytes


STYLE_TABLE = {
    MESSAGES: OutputStyle(MESSAGES, _messages_objects, False, b"\n", b"\n", b"", b"", b"", b""),
    MINDFORMERS: OutputStyle(MINDFORMERS, _mindformers_objects, True, b",\n", b"", b"[\n", b",\n", b"\n]\n", b"[]\n"),
}


def get_style(name: str) -> OutputStyle:
    if name not in STYLE_TABLE:
        raise ValueError(f"unknown output style {name!r}; choose {', '.join(STYLES)}")
    return STYLE_TABLE[name]


def serialize(style: OutputStyle, records: list[dict[str, Any]], sources: list[Any], fmt: str | None) -> bytes:
    """One blob for a batch of records, b"" for none.

    One orjson call for the whole batch, then the record boundaries rewritten to the style's item
    separator: a call per record costs twice as much (orjson's per-call buffer set-up dominates at
    about 1 KB a record).
    """
    if not records:
        return b""
    objects = style.objects(records, sources, fmt)
    text = orjson.dumps(objects)
    if text.count(_BOUNDARY) != len(objects) - 1:
        return style.item_sep.join(orjson.dumps(o) for o in objects) + style.item_end
    text = text.replace(_BOUNDARY, b"]}" + style.item_sep + b'{"id":')
    return b"".join((memoryview(text)[1:-1], style.item_end))  # one copy, not a slice and a concatenation


def split_items(style: OutputStyle, blob: bytes) -> list[bytes]:
    """The serialized records of a blob (for shuffling one record at a time)."""
    if not blob:
        return []
    body = blob[: len(blob) - len(style.item_end)] if style.item_end else blob
    return body.split(style.item_sep)  # item_sep has a raw newline, which orjson never writes inside a record


def join_items(style: OutputStyle, items: list[bytes]) -> bytes:
    return style.item_sep.join(items) + style.item_end if items else b""


def write_blobs(out: BinaryIO, style: OutputStyle, blobs: Iterable[bytes]) -> None:
    """Write blobs with the style's framing (one write per blob)."""
    first = True
    for blob in blobs:
        if blob:
            out.write(style.header if first else style.separator)
            out.write(blob)
            first = False
    out.write(style.empty if first else style.footer)
