"""Per-record converters from the instruction formats users actually have to canonical messages.

Each converter takes one parsed record and returns its `messages` list, already validated
(`conversation.validate_messages` rules), or -- when the record has tools or fields the format does not
map -- a record body {"messages", "tools"?, "extra"?, UNKNOWN_NAMES?} (`with_extra`); it raises DataError
(without a location; the caller adds file and line). The bare list keeps the common case as cheap as it was. The format is detected once per file from its first record,
because real files are homogeneous and per-record guessing would silently turn a broken Alpaca record
(say, a typo in "output") into "some other format".

Formats:
- `alpaca`: instruction, output, optional input / system / history ([[user, assistant], ...]).
  The user turn is instruction + "\\n\\n" + input when input is non-empty.
- `self-instruct`: Stanford Alpaca's seed tasks, instruction + instances[{input, output}]; each instance
  becomes one Alpaca record (expanded before conversion, see `expand_self_instruct`).
- `src-tgt`: PaddleNLP/ERNIEKit src/tgt, both strings (one turn) or equal-length lists (multi-turn),
  optional context.system.
- `sharegpt`: ShareGPT / MindFormers / LLaMA-Factory `conversations` [{from, value}] with from =
  human|user, gpt|assistant, system, function_call (value: JSON call(s)), observation|tool; optional
  top-level `system` and `tools` (a list or JSON text).
- `messages`: OpenAI-style / canonical `messages` [{role, content, tool_calls, ...}] and `tools`; content
  may be a list of text parts; OpenAI fine-tuning's `weight` 0/1 becomes `train`.
An assistant content that starts with `<think>...</think>` is split into `reasoning_content` + content.
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
ALIASES = {"mindformers": SHAREGPT, "llamafactory": SHAREGPT, "conversations": SHAREGPT, "openai": MESSAGES,
           "paddlenlp": SRC_TGT}

SHAREGPT_ROLES = {
    "human": cv.USER,
    "user": cv.USER,
    "gpt": cv.ASSISTANT,
    "assistant": cv.ASSISTANT,
    "system": cv.SYSTEM,
    "function_call": cv.ASSISTANT,  # LLaMA-Factory: an assistant turn that calls tools
    "observation": cv.TOOL,  # LLaMA-Factory: a tool result
    "tool": cv.TOOL,
    "function": cv.TOOL,
}


# Input fields each format maps; anything else is kept under `extra` and counted (`with_extra`).
# (A record's own "extra" is not in these: it is merged by `with_extra`, never passed over by a fast path.)
ALPACA_FIELDS = frozenset({"id", "instruction", "input", "output", "system", "history"})
SELF_INSTRUCT_FIELDS = frozenset({"id", "instruction", "instances"})
SRC_TGT_FIELDS = frozenset({"id", "src", "tgt", "context"})
SHAREGPT_FIELDS = frozenset({"id", "conversations", "system", "tools"})
SHAREGPT_TURN_FIELDS = frozenset({"from", "value"})
MESSAGES_FIELDS = cv.RECORD_FIELDS
# OpenAI's fine-tuning files mark an assistant message to skip with "weight": 0; it maps onto `train`.
MESSAGE_INPUT_FIELDS = cv.MESSAGE_FIELDS | {"weight"}


def assistant_message(content: str, reasoning: str | None = None) -> dict[str, Any]:
    """An assistant turn; a leading `<think>...</think>` block becomes `reasoning_content`."""
    if reasoning is None:
        reasoning, content = cv.split_think(content)
    out: dict[str, Any] = {"role": cv.ASSISTANT, "content": content}
    if reasoning is not None:
        out["reasoning_content"] = reasoning
    return out


def with_extra(messages: list[dict[str, Any]], raw: dict[str, Any], known: frozenset[str],
               unknown: list[str] | None = None, tools: list | None = None) -> list[dict[str, Any]] | dict[str, Any]:
    """The converter's result: the bare messages list in the common case, else a record body with
    `tools`, the record's unmapped fields under `extra` and their names (record- and message-level, the
    latter passed in `unknown`) for the counts."""
    names = list(unknown or ())
    # a null is no value (columnar inputs fill absent fields with null): nothing to keep or count
    extra = {k: v for k, v in raw.items()
             if k not in known and k != cv.EXTRA and k != cv.UNKNOWN_NAMES and v is not None}
    names += extra
    names += raw.get(cv.UNKNOWN_NAMES) or ()  # noted earlier (self-instruct expansion)
    own = raw.get(cv.EXTRA)
    if own is not None:
        if not isinstance(own, dict):
            raise DataError(f"'{cv.EXTRA}' must be an object, got {type(own).__name__}", reason=cv.WRONG_TYPE)
        extra = {**own, **extra}
    if not extra and not names and tools is None:
        return messages
    body: dict[str, Any] = {"messages": messages}
    if tools is not None:
        body["tools"] = tools
    if extra:
        body[cv.EXTRA] = extra
    if names:
        body[cv.UNKNOWN_NAMES] = names
    return body


def _turn_extra(turn: dict[str, Any], out: dict[str, Any], known: frozenset[str], prefix: str,
                unknown: list[str]) -> None:
    """Keep a turn's unmapped fields under the message's `extra` and note their names."""
    extra = {k: v for k, v in turn.items() if k not in known and v is not None}
    if extra:
        out[cv.EXTRA] = {**out.get(cv.EXTRA, {}), **extra}
        unknown += [f"{prefix}.{k}" for k in extra]


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


def alpaca_messages(raw: Any) -> list[dict[str, Any]] | dict[str, Any]:
    """Fast path for the shape nearly every Alpaca record has (strings, no system/history/extra fields, no
    `<think>` block); anything else, including every error, goes through `_alpaca_messages_checked`, which
    gives the precise message.
    """
    try:
        instruction = raw["instruction"]
        output = raw["output"]
        input_text = raw.get("input")
        n = len(raw)  # instruction + output (+ input): surely no unmapped field, without the set comparison
        known = n == 2 or (n == 3 and "input" in raw) or raw.keys() <= ALPACA_FIELDS
        unusual = raw.get("system") or raw.get("history") or not known
    except (KeyError, TypeError, AttributeError):
        return _alpaca_messages_checked(raw)
    if (
        unusual
        or type(instruction) is not str
        or type(output) is not str
        or (input_text is not None and type(input_text) is not str)
        or output.startswith(cv.THINK_OPEN)  # a <think> block: split_think decides (after leading whitespace
    ):  # too, off this path; a whitespace-led block found on it stays inline, which renders the same)
        return _alpaca_messages_checked(raw)
    prompt = f"{instruction}\n\n{input_text}" if input_text and not input_text.isspace() else instruction
    if not prompt or prompt.isspace() or not output or output.isspace():
        return _alpaca_messages_checked(raw)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _alpaca_messages_checked(raw: Any) -> list[dict[str, Any]] | dict[str, Any]:
    instruction, input_text = alpaca_prompt_parts(raw)
    output = _require(raw, "output", str, "alpaca")
    messages: list[dict[str, Any]] = []
    system = _optional(raw, "system", str)
    if system:
        messages.append(cv.message(cv.SYSTEM, system))
    history = _optional(raw, "history", list)
    for k, pair in enumerate(history or ()):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"history[{k}] must be a [user, assistant] pair of strings", reason=cv.WRONG_TYPE)
        messages.append(cv.message(cv.USER, pair[0]))
        messages.append(assistant_message(pair[1]))
    prompt = f"{instruction}\n\n{input_text}" if has_input(input_text) else instruction
    messages.append(cv.message(cv.USER, prompt))
    messages.append(assistant_message(output))
    cv.validate_messages(messages)
    return with_extra(messages, raw, ALPACA_FIELDS)


def expand_self_instruct(raw: Any) -> list[dict[str, Any]]:
    """Turn one seed task into Alpaca records, one per instance, so no instance is dropped.

    Ids: the task id when it has one instance, else `<id>-<k>`; without a task id the caller derives one.
    The task's other fields (name, is_classification, ...) go to each record's `extra`.
    """
    instruction = _require(raw, "instruction", str, "self-instruct")
    instances = _require(raw, "instances", list, "self-instruct")
    if not instances:
        raise DataError("'instances' is empty (self-instruct record)", reason=cv.MISSING_FIELD)
    base_id = record_id(raw)
    task_extra = {k: v for k, v in raw.items() if k not in SELF_INSTRUCT_FIELDS}
    out = []
    for k, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise DataError(f"instances[{k}] must be an object, got {type(inst).__name__}", reason=cv.WRONG_TYPE)
        rec: dict[str, Any] = {
            "instruction": instruction,
            "input": _optional(inst, "input", str) or "",
            "output": _require(inst, "output", str, f"self-instruct instances[{k}]"),
        }
        inst_extra = {f"instances.{key}": v for key, v in inst.items() if key not in ("input", "output")}
        if task_extra or inst_extra:
            rec[cv.EXTRA] = {**task_extra, **inst_extra}
            rec[cv.UNKNOWN_NAMES] = [*task_extra, *inst_extra]
        if base_id is not None:
            rec["id"] = base_id if len(instances) == 1 else f"{base_id}-{k}"
        out.append(rec)
    return out


def src_tgt_messages(raw: Any) -> list[dict[str, Any]] | dict[str, Any]:
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
    messages: list[dict[str, Any]] = []
    context = _optional(raw, "context", dict)
    system = _optional(context, "system", str) if context else None
    if system:
        messages.append(cv.message(cv.SYSTEM, system))
    for user, assistant in pairs:
        messages.append(cv.message(cv.USER, user))
        messages.append(assistant_message(assistant))
    cv.validate_messages(messages)
    if raw.keys() <= SRC_TGT_FIELDS and (not context or context.keys() <= {"system"}):
        return messages
    unknown = [f"context.{k}" for k in (context or {}) if k != "system"]
    body = with_extra(messages, raw, SRC_TGT_FIELDS, unknown)
    if unknown:
        body = body if isinstance(body, dict) else {"messages": body}
        body.setdefault(cv.EXTRA, {})["context"] = {k: v for k, v in context.items() if k != "system"}  # type: ignore[union-attr]
    return body


def _src_tgt_field(raw: Any, key: str) -> str | list:
    if not isinstance(raw, dict):
        raise DataError(f"record must be a JSON object, got {type(raw).__name__}", reason=cv.NOT_AN_OBJECT)
    if key not in raw or raw[key] is None:
        raise DataError(f"missing field '{key}' (src-tgt record)", reason=cv.MISSING_FIELD)
    value = raw[key]
    if not isinstance(value, str | list):
        raise DataError(f"'{key}' must be a string or a list, got {type(value).__name__}", reason=cv.WRONG_TYPE)
    return value


def _function_calls(value: Any, k: int) -> list[dict[str, Any]]:
    """A LLaMA-Factory `function_call` turn's value: one {"name", "arguments"} or a list of them, as JSON
    text; becomes OpenAI `tool_calls` with `arguments` kept as given (object or JSON string)."""
    parsed = cv.parse_json_text(value, f"conversations[{k}] (function_call) value", cv.BAD_TOOL_CALL)
    calls = parsed if isinstance(parsed, list) else [parsed]
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise DataError(f"conversations[{k}] (function_call) needs a JSON object with a 'name'", reason=cv.BAD_TOOL_CALL)
        out.append({"type": "function", "function": {"name": call["name"], "arguments": call.get("arguments", {})}})
    return out


def _parse_tools(value: Any) -> list | None:
    """`tools` as a list or as JSON text (LLaMA-Factory writes a string); empty means none."""
    if value is None or value == "":
        return None
    tools = cv.parse_json_text(value, "'tools'", cv.BAD_TOOLS)
    cv.validate_tools(tools)
    return tools or None


def sharegpt_messages(raw: Any) -> list[dict[str, Any]] | dict[str, Any]:
    """ShareGPT / MindFormers / LLaMA-Factory: human|user, gpt|assistant, system, function_call (an
    assistant tool call), observation|tool (its result); a gpt turn right after a function_call turn is a
    new assistant turn, and two function_call turns in a row stay two calls of one turn each."""
    turns = _require(raw, "conversations", list, "sharegpt")
    messages: list[dict[str, Any]] = []
    unknown: list[str] = []
    system = _optional(raw, "system", str)
    if system:
        messages.append(cv.message(cv.SYSTEM, system))
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"conversations[{k}] must be an object, got {type(turn).__name__}", reason=cv.WRONG_TYPE)
        if "from" not in turn or "value" not in turn:
            missing = "from" if "from" not in turn else "value"
            raise DataError(f"conversations[{k}] is missing '{missing}'", reason=cv.MISSING_FIELD)
        speaker = turn["from"]
        role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise DataError(
                f"conversations[{k}] has unknown speaker {speaker!r} (expected human/user, gpt/assistant, system, "
                "function_call, observation/tool)",
                reason=cv.UNKNOWN_ROLE,
            )
        value = turn["value"]
        if speaker == "function_call":
            out: dict[str, Any] = {"role": cv.ASSISTANT, "content": "", "tool_calls": _function_calls(value, k)}
        elif role == cv.ASSISTANT and isinstance(value, str):
            out = assistant_message(value)
        else:
            out = cv.message(role, value)
        if len(turn) > 2:
            _turn_extra(turn, out, SHAREGPT_TURN_FIELDS, "conversations", unknown)
        messages.append(out)
    tools = _parse_tools(raw.get("tools"))
    cv.validate_messages(messages)
    if raw.keys() <= SHAREGPT_FIELDS and not unknown and tools is None:
        return messages
    return with_extra(messages, raw, SHAREGPT_FIELDS, unknown, tools)


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


def _openai_tool_calls(calls: Any, k: int) -> Any:
    """OpenAI `tool_calls`; the bare {"name", "arguments"} form some datasets write is wrapped in
    {"type": "function", "function": ...}. Arguments stay as given (object or JSON string)."""
    if not isinstance(calls, list):
        return calls  # validation names the wrong type
    out = []
    for call in calls:
        if isinstance(call, dict) and "function" not in call and "name" in call:
            call = {"type": "function", "function": {"name": call["name"], "arguments": call.get("arguments", {})}}
        out.append(call)
    return out


def _openai_turn(turn: dict[str, Any], k: int, unknown: list[str]) -> dict[str, Any]:
    role = turn["role"]
    content = _text_content(turn["content"], k) if "content" in turn else None
    calls = turn.get("tool_calls")
    if content is None and role == cv.ASSISTANT and calls:
        content = ""  # OpenAI writes null content beside tool calls; the record keeps strings only
    if role == cv.ASSISTANT and isinstance(content, str) and turn.get("reasoning_content") is None:
        out = assistant_message(content)
    else:
        out = {"role": role, "content": content}
    for key in ("reasoning_content", "tool_call_id", "name", "train", cv.EXTRA):
        if turn.get(key) is not None:
            out[key] = turn[key]
    if calls is not None:
        out["tool_calls"] = _openai_tool_calls(calls, k)
    if turn.get("weight") is not None and turn.get("train") is None:
        if turn["weight"] not in (0, 1) or type(turn["weight"]) is bool:
            raise DataError(f"messages[{k}] 'weight' must be 0 or 1, got {turn['weight']!r}", reason=cv.WRONG_TYPE)
        out["train"] = turn["weight"] == 1
    if not turn.keys() <= MESSAGE_INPUT_FIELDS:
        _turn_extra(turn, out, MESSAGE_INPUT_FIELDS, "messages", unknown)
    return out


def openai_messages(raw: Any) -> list[dict[str, Any]] | dict[str, Any]:
    """OpenAI chat / fine-tuning records and our own output: `messages` with tool calls, tool results,
    reasoning and `train` flags, record-level `tools` (a list, or JSON text)."""
    turns = _require(raw, "messages", list, "messages")
    messages: list[dict[str, Any]] = []
    unknown: list[str] = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"messages[{k}] must be an object, got {type(turn).__name__}", reason=cv.WRONG_TYPE)
        if "role" not in turn or ("content" not in turn and not turn.get("tool_calls")):
            missing = "role" if "role" not in turn else "content"
            raise DataError(f"messages[{k}] is missing '{missing}'", reason=cv.MISSING_FIELD)
        if len(turn) == 2 and turn["role"] != cv.ASSISTANT and "content" in turn:
            messages.append(cv.message(turn["role"], _text_content(turn["content"], k)))
        else:
            messages.append(_openai_turn(turn, k, unknown))
    tools = _parse_tools(raw.get("tools"))
    cv.validate_messages(messages)
    if raw.keys() <= MESSAGES_FIELDS and not unknown and tools is None and raw.get(cv.EXTRA) is None:
        return messages
    return with_extra(messages, raw, MESSAGES_FIELDS - {cv.EXTRA}, unknown, tools)


Converter = Callable[[Any], "list[dict[str, Any]] | dict[str, Any]"]
CONVERTERS: dict[str, Converter] = {
    ALPACA: alpaca_messages,
    SELF_INSTRUCT: alpaca_messages,  # applied to the records `expand_self_instruct` makes
    SRC_TGT: src_tgt_messages,
    SHAREGPT: sharegpt_messages,
    MESSAGES: openai_messages,
}
