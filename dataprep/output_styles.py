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


def _messages_items(batch: list[tuple[dict[str, Any], Any, str]]) -> list[bytes]:
    dumps = orjson.dumps
    newline = orjson.OPT_APPEND_NEWLINE
    return [dumps(record, option=newline) for record, _raw, _fmt in batch]


def mindformers_conversations(record: dict[str, Any], raw: Any, fmt: str) -> dict[str, Any]:
    turns = [{"from": _FROM[m["role"]], "value": m["content"]} for m in record["messages"]]
    if fmt in (fmts.ALPACA, fmts.SELF_INSTRUCT):
        # The instruction turn is the last user turn; Alpaca history turns come before it.
        instruction, input_text = fmts.alpaca_prompt_parts(raw)
        last_user = max(i for i, t in enumerate(turns) if t["from"] == "human")
        turns[last_user]["value"] = alpaca_prompt(instruction, input_text)
    return {"id": record["id"], "conversations": turns}


def _mindformers_items(batch: list[tuple[dict[str, Any], Any, str]]) -> list[bytes]:
    return [orjson.dumps(mindformers_conversations(record, raw, fmt)) for record, raw, fmt in batch]


@dataclass(frozen=True)
class OutputStyle:
    """Serialize converted records (a batch of (record, source record, format)) and frame them in a file."""

    name: str
    serialize: Callable[[list[tuple[dict[str, Any], Any, str]]], list[bytes]]
    header: bytes
    separator: bytes
    footer: bytes
    empty: bytes


STYLE_TABLE = {
    MESSAGES: OutputStyle(MESSAGES, _messages_items, b"", b"", b"", b""),
    MINDFORMERS: OutputStyle(MINDFORMERS, _mindformers_items, b"[\n", b",\n", b"\n]\n", b"[]\n"),
}


def get_style(name: str) -> OutputStyle:
    if name not in STYLE_TABLE:
        raise ValueError(f"unknown output style {name!r}; choose {', '.join(STYLES)}")
    return STYLE_TABLE[name]


def write_batches(out: BinaryIO, style: OutputStyle, batches: Iterable[list[bytes]]) -> int:
    """Write batches of serialized items with the style's framing (one write per batch); returns the count."""
    count = 0
    join = style.separator.join
    for items in batches:
        if items:
            out.write(style.header if count == 0 else style.separator)
            out.write(join(items))
            count += len(items)
    out.write(style.footer if count else style.empty)
    return count
