"""Per-record converters from the instruction formats users actually have to canonical messages.

Each converter takes one parsed record and returns its `messages` list, already validated
(`conversation.validate_messages` rules), or raises DataError (without a location; the caller adds file
and line). The format is detected once per file from its first record,
because real files are homogeneous and per-record guessing would silently turn a broken Alpaca record
(say, a typo in "output") into "some other format".

Formats:
- `alpaca`: instruction, output, optional input / system / history ([[user, assistant], ...]).
  The user turn is instruction + "\\n\\n" + input when input is non-empty.
- `self-instruct`: Stanford Alpaca's seed tasks, instruction + instances[{input, output}]; each instance
  becomes one Alpaca record (expanded before conversion, see `expand_self_instruct`).
- `src-tgt`: PaddleNLP/ERNIEKit src/tgt, both strings (one turn) or equal-length lists (multi-turn),
  optional context.system.
- `sharegpt`: ShareGPT / MindFormers `conversations` [{from, value}] with from = human|user, gpt|assistant,
  system; optional top-level `system`.
- `messages`: OpenAI-style / canonical `messages` [{role, content}]; content may be a list of text parts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dataprep import conversation as cv
from dataprep.errors import DataError

ALPACA = "alpaca"
SELF_INSTRUCT = "self-instruct"
SRC_TGT = "src-tgt"
SHAREGPT = "sharegpt"
MESSAGES = "messages"
FORMATS = (ALPACA, SELF_INSTRUCT, SRC_TGT, SHAREGPT, MESSAGES)
# Names users reach for; they map onto the formats above.
ALIASES = {"mindformers": SHAREGPT, "conversations": SHAREGPT, "openai": MESSAGES, "paddlenlp": SRC_TGT}

SHAREGPT_ROLES = {
    "human": cv.USER,
    "user": cv.USER,
    "gpt": cv.ASSISTANT,
    "assistant": cv.ASSISTANT,
    "system": cv.SYSTEM,
}


def canonical_format_name(name: str) -> str:
    """Map a user-given `--input-format` (including aliases, any case, _ or -) to a format name."""
    key = name.strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in FORMATS and key != "auto":
        raise ValueError(f"unknown input format {name!r}; choose auto, {', '.join(FORMATS)}")
    return key


def detect_format(raw: Any) -> str:
    """Guess a record's format from its field names (used on a file's first record)."""
    if not isinstance(raw, dict):
        raise DataError(f"record must be a JSON object, got {type(raw).__name__}", reason=cv.NOT_AN_OBJECT)
    if "messages" in raw:
        return MESSAGES
    if "conversations" in raw:
        return SHAREGPT
    if "src" in raw or "tgt" in raw:
        return SRC_TGT
    if "instruction" in raw and "instances" in raw and "output" not in raw:
        return SELF_INSTRUCT
    if "instruction" in raw or "output" in raw:
        return ALPACA
    fields = ", ".join(sorted(map(str, raw))) or "none"
    raise DataError(
        f"cannot tell the input format from the fields ({fields}); pass --input-format", reason=cv.UNKNOWN_FORMAT
    )


def record_id(raw: dict[str, Any]) -> str | None:
    """The record's own id when it has one (strings as-is, integers as text); None means derive one."""
    value = raw.get("id")
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"'id' must be a string or an integer, got {type(value).__name__}", reason=cv.WRONG_TYPE)


def _require(raw: Any, key: str, kind: type, what: str) -> Any:
    if not isinstance(raw, dict):
        raise DataError(f"record must be a JSON object, got {type(raw).__name__}", reason=cv.NOT_AN_OBJECT)
    if key not in raw or raw[key] is None:
        raise DataError(f"missing field '{key}' ({what} record)", reason=cv.MISSING_FIELD)
    value = raw[key]
    if not isinstance(value, kind):
        raise DataError(f"'{key}' must be a {kind.__name__}, got {type(value).__name__}", reason=cv.WRONG_TYPE)
    return value


def _optional(raw: dict[str, Any], key: str, kind: type) -> Any:
    """Absent and null are the same thing (Hugging Face datasets fill missing columns with None)."""
    value = raw.get(key)
    if value is not None and not isinstance(value, kind):
        raise DataError(f"'{key}' must be a {kind.__name__}, got {type(value).__name__}", reason=cv.WRONG_TYPE)
    return value


def has_input(text: str | None) -> bool:
    """Whether an Alpaca `input` counts as present (whitespace-only does not)."""
    return bool(text) and not text.isspace()


def alpaca_prompt_parts(raw: dict[str, Any]) -> tuple[str, str]:
    """The (instruction, input) of an Alpaca record; input is "" when absent."""
    instruction = _require(raw, "instruction", str, "alpaca")
    return instruction, _optional(raw, "input", str) or ""


def alpaca_messages(raw: Any) -> list[dict[str, str]]:
    """Fast path for the shape nearly every Alpaca record has (strings, no system/history); anything
    else, including every error, goes through `_alpaca_messages_checked`, which gives the precise message.
    """
    try:
        instruction = raw["instruction"]
        output = raw["output"]
        input_text = raw.get("input")
        unusual = raw.get("system") or raw.get("history")
    except (KeyError, TypeError, AttributeError):
        return _alpaca_messages_checked(raw)
    if (
        unusual
        or type(instruction) is not str
        or type(output) is not str
        or (input_text is not None and type(input_text) is not str)
    ):
        return _alpaca_messages_checked(raw)
    prompt = f"{instruction}\n\n{input_text}" if input_text and not input_text.isspace() else instruction
    if not prompt or prompt.isspace() or not output or output.isspace():
        return _alpaca_messages_checked(raw)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _alpaca_messages_checked(raw: Any) -> list[dict[str, str]]:
    instruction, input_text = alpaca_prompt_parts(raw)
    output = _require(raw, "output", str, "alpaca")
    messages: list[dict[str, str]] = []
    system = _optional(raw, "system", str)
    if system:
        messages.append(cv.message(cv.SYSTEM, system))
    history = _optional(raw, "history", list)
    for k, pair in enumerate(history or ()):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"history[{k}] must be a [user, assistant] pair of strings", reason=cv.WRONG_TYPE)
        messages.append(cv.message(cv.USER, pair[0]))
        messages.append(cv.message(cv.ASSISTANT, pair[1]))
    prompt = f"{instruction}\n\n{input_text}" if has_input(input_text) else instruction
    messages.append(cv.message(cv.USER, prompt))
    messages.append(cv.message(cv.ASSISTANT, output))
    cv.validate_messages(messages)
    return messages


def expand_self_instruct(raw: Any) -> list[dict[str, Any]]:
    """Turn one seed task into Alpaca records, one per instance, so no instance is dropped.

    Ids: the task id when it has one instance, else `<id>-<k>`; without a task id the caller derives one.
    """
    instruction = _require(raw, "instruction", str, "self-instruct")
    instances = _require(raw, "instances", list, "self-instruct")
    if not instances:
        raise DataError("'instances' is empty (self-instruct record)", reason=cv.MISSING_FIELD)
    base_id = record_id(raw)
    out = []
    for k, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise DataError(f"instances[{k}] must be an object, got {type(inst).__name__}", reason=cv.WRONG_TYPE)
        rec: dict[str, Any] = {
            "instruction": instruction,
            "input": _optional(inst, "input", str) or "",
            "output": _require(inst, "output", str, f"self-instruct instances[{k}]"),
        }
        if base_id is not None:
            rec["id"] = base_id if len(instances) == 1 else f"{base_id}-{k}"
        out.append(rec)
    return out


def src_tgt_messages(raw: Any) -> list[dict[str, str]]:
    src = _src_tgt_field(raw, "src")
    tgt = _src_tgt_field(raw, "tgt")
    if isinstance(src, str) and isinstance(tgt, str):
        pairs = [(src, tgt)]
    elif isinstance(src, list) and isinstance(tgt, list):
        if len(src) != len(tgt):
            raise DataError(
                f"'src' has {len(src)} turns but 'tgt' has {len(tgt)}; multi-turn lists must have equal length",
                reason=cv.LENGTH_MISMATCH,
            )
        for key, seq in (("src", src), ("tgt", tgt)):
            for k, item in enumerate(seq):
                if not isinstance(item, str):
                    raise DataError(f"'{key}[{k}]' must be a string, got {type(item).__name__}", reason=cv.WRONG_TYPE)
        pairs = list(zip(src, tgt, strict=True))
    else:
        raise DataError(
            f"'src' and 'tgt' must both be strings or both be lists, got {type(src).__name__} and {type(tgt).__name__}",
            reason=cv.WRONG_TYPE,
        )
    messages: list[dict[str, str]] = []
    context = _optional(raw, "context", dict)
    system = _optional(context, "system", str) if context else None
    if system:
        messages.append(cv.message(cv.SYSTEM, system))
    for user, assistant in pairs:
        messages.append(cv.message(cv.USER, user))
        messages.append(cv.message(cv.ASSISTANT, assistant))
    cv.validate_messages(messages)
    return messages


def _src_tgt_field(raw: Any, key: str) -> str | list:
    if not isinstance(raw, dict):
        raise DataError(f"record must be a JSON object, got {type(raw).__name__}", reason=cv.NOT_AN_OBJECT)
    if key not in raw or raw[key] is None:
        raise DataError(f"missing field '{key}' (src-tgt record)", reason=cv.MISSING_FIELD)
    value = raw[key]
    if not isinstance(value, str | list):
        raise DataError(f"'{key}' must be a string or a list, got {type(value).__name__}", reason=cv.WRONG_TYPE)
    return value


def sharegpt_messages(raw: Any) -> list[dict[str, str]]:
    turns = _require(raw, "conversations", list, "sharegpt")
    messages: list[dict[str, str]] = []
    system = _optional(raw, "system", str)
    if system:
        messages.append(cv.message(cv.SYSTEM, system))
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"conversations[{k}] must be an object, got {type(turn).__name__}", reason=cv.WRONG_TYPE)
        if "from" not in turn or "value" not in turn:
            missing = "from" if "from" not in turn else "value"
            raise DataError(f"conversations[{k}] is missing '{missing}'", reason=cv.MISSING_FIELD)
        role = SHAREGPT_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise DataError(
                f"conversations[{k}] has unknown speaker {turn['from']!r} (expected human/user, gpt/assistant, system)",
                reason=cv.UNKNOWN_ROLE,
            )
        messages.append(cv.message(role, turn["value"]))
    cv.validate_messages(messages)
    return messages


def _text_content(content: Any, k: int) -> Any:
    """OpenAI content may be a list of parts; only text parts can become a training string."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise DataError(f"messages[{k}] content has a non-text part; only text parts are supported", reason=cv.WRONG_TYPE)
        texts.append(part["text"])
    return "".join(texts)


def openai_messages(raw: Any) -> list[dict[str, str]]:
    turns = _require(raw, "messages", list, "messages")
    messages: list[dict[str, str]] = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"messages[{k}] must be an object, got {type(turn).__name__}", reason=cv.WRONG_TYPE)
        if "role" not in turn or "content" not in turn:
            missing = "role" if "role" not in turn else "content"
            raise DataError(f"messages[{k}] is missing '{missing}'", reason=cv.MISSING_FIELD)
        messages.append(cv.message(turn["role"], _text_content(turn["content"], k)))
    cv.validate_messages(messages)
    return messages


CONVERTERS: dict[str, Callable[[Any], list[dict[str, str]]]] = {
    ALPACA: alpaca_messages,
    SELF_INSTRUCT: alpaca_messages,  # applied to the records `expand_self_instruct` makes
    SRC_TGT: src_tgt_messages,
    SHAREGPT: sharegpt_messages,
    MESSAGES: openai_messages,
}
