"""The canonical conversation record every input format is converted to, and its validation.

A record (CONTRACTS.md, "Conversation record") is what transformers' chat templates take, so its
`messages` and `tools` can be handed to `apply_chat_template` unchanged:

    {"id": str, "tools"?: [function spec, ...], "extra"?: {...},
     "messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str,
                   "reasoning_content"?: str, "tool_calls"?: [...], "tool_call_id"?: str, "name"?: str,
                   "train"?: bool, "extra"?: {...}}, ...]}

Validation lives here, once, so that every reader (Alpaca, src/tgt, ShareGPT / LLaMA-Factory, OpenAI
messages, Hugging Face datasets) rejects the same bad shapes with the same reason keys, and `pack` can
trust what `convert` wrote. Input fields a reader does not map are never dropped: they are kept under
`extra` (record or message level) and counted by name (`UNKNOWN_NAMES`).

Errors raised here carry no location; the caller knows the file and line and re-raises them with it
(`located`).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from dataprep.errors import DataError

SYSTEM = "system"
USER = "user"
ASSISTANT = "assistant"
TOOL = "tool"
Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = (SYSTEM, USER, ASSISTANT, TOOL)

# The documented key under which input fields without a place in the record are kept (record and message).
EXTRA = "extra"
# Converters put the names of unmapped input fields here; `convert_batch` pops and counts them.
UNKNOWN_NAMES = "_unknown_fields"
RECORD_FIELDS = frozenset({"id", "messages", "tools", EXTRA})
MESSAGE_FIELDS = frozenset(
    {"role", "content", "reasoning_content", "tool_calls", "tool_call_id", "name", "train", EXTRA}
)
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# Stable reason keys: skipped records are counted under these, and tests and pipelines match on them.
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_ASSISTANT = "empty_assistant_turn"
EMPTY_USER = "empty_user_turn"
OUT_OF_ORDER = "turns_out_of_order"
NO_ASSISTANT = "no_assistant_turn"
UNKNOWN_ROLE = "unknown_role"
LENGTH_MISMATCH = "length_mismatch"
NOT_AN_OBJECT = "not_an_object"
UNKNOWN_FORMAT = "unknown_format"
INVALID_JSON = "invalid_json"
INVALID_UTF8 = "invalid_utf8"
BAD_TOOL_CALL = "bad_tool_call"
BAD_TOOLS = "bad_tools"
ORPHAN_TOOL_RESULT = "tool_result_without_call"
UNKNOWN_FIELD = "unknown_field"


def message(role: str, content: str) -> dict[str, Any]:
    return {"role": role, "content": content}


def make_record(record_id: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": record_id, "messages": messages}


def add_system(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """Prepend `system` unless the record already has its own system turn.

    A record's own system prompt is more specific than a command-line default, so it wins.
    """
    if not system or (messages and messages[0].get("role") == SYSTEM):
        return messages
    return [message(SYSTEM, system), *messages]


def split_think(content: str) -> tuple[str | None, str]:
    """(reasoning, answer) of an assistant content that starts with a `<think>...</think>` block, else
    (None, content). The split is the one Qwen3's chat template applies to such content, so a record
    normalised here renders exactly as the raw content would."""
    if THINK_CLOSE not in content or not content.lstrip().startswith(THINK_OPEN):
        return None, content
    head, _, answer = content.partition(THINK_CLOSE)
    reasoning = head.rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n")
    return reasoning, answer.lstrip("\n")


def parse_json_text(value: Any, what: str, reason: str) -> Any:
    """A field that some formats write as a JSON string (LLaMA-Factory `tools`, tool-call arguments)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"{what} is not valid JSON: {e.msg} at character {e.pos}", reason=reason) from None


def validate_tools(tools: Any) -> None:
    """A record's `tools`: a list of function specs, OpenAI form {"type": "function", "function": {...}}
    or the bare {"name", "description", "parameters"} form; kept as given."""
    if not isinstance(tools, list):
        raise DataError(f"'tools' must be a list, got {type(tools).__name__}", reason=BAD_TOOLS)
    for k, tool in enumerate(tools):
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise DataError(f"tools[{k}] must be a function spec with a non-empty 'name'", reason=BAD_TOOLS)


def _validate_tool_calls(calls: Any, i: int) -> None:
    if not isinstance(calls, list) or not calls:
        raise DataError(f"turn {i} (assistant) 'tool_calls' must be a non-empty list", reason=BAD_TOOL_CALL)
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise DataError(f"turn {i} tool_calls[{k}] must be an object with a 'function' object", reason=BAD_TOOL_CALL)
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(f"turn {i} tool_calls[{k}] has no function name", reason=BAD_TOOL_CALL)
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"turn {i} tool_calls[{k}] arguments are not JSON: {e.msg} at character {e.pos}",
                    reason=BAD_TOOL_CALL,
                ) from None
        if not isinstance(args, dict):
            raise DataError(
                f"turn {i} tool_calls[{k}] arguments must be a JSON object, got {type(args).__name__}",
                reason=BAD_TOOL_CALL,
            )
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise DataError(f"turn {i} tool_calls[{k}] 'id' must be a string", reason=BAD_TOOL_CALL)


def _validate_optional(turn: dict[str, Any], i: int, role: str) -> None:
    for key in ("reasoning_content", "tool_call_id", "name"):
        if key in turn and not isinstance(turn[key], str):
            raise DataError(f"turn {i} ({role}) '{key}' must be a string, got {type(turn[key]).__name__}", reason=WRONG_TYPE)
    if "reasoning_content" in turn and role != ASSISTANT:
        raise DataError(f"turn {i} ({role}) has reasoning_content; only assistant turns reason", reason=WRONG_TYPE)
    if "tool_call_id" in turn and role != TOOL:
        raise DataError(f"turn {i} ({role}) has tool_call_id; only tool turns answer a call", reason=WRONG_TYPE)
    if "train" in turn:
        if type(turn["train"]) is not bool:
            raise DataError(f"turn {i} 'train' must be true or false, got {turn['train']!r}", reason=WRONG_TYPE)
        if role != ASSISTANT:
            raise DataError(f"turn {i} ({role}) has 'train'; only assistant turns are trained", reason=WRONG_TYPE)
    if EXTRA in turn and not isinstance(turn[EXTRA], dict):
        raise DataError(f"turn {i} '{EXTRA}' must be an object", reason=WRONG_TYPE)


def validate_messages(messages: Any) -> None:
    """Raise DataError (no location) unless `messages` is a trainable conversation.

    Rules (CONTRACTS.md): an optional system turn first; then a user turn; a user turn is answered by
    an assistant turn; an assistant turn with `tool_calls` is followed by one or more tool turns, which are
    followed by an assistant turn; an assistant turn without calls is followed by a user turn or ends the
    conversation, which must end with an assistant turn. Every content is a string; no empty user turn and
    no assistant turn with neither content nor tool calls (an empty answer teaches the model to stop at once).
    """
    if not isinstance(messages, list):
        raise DataError(f"'messages' must be a list, got {type(messages).__name__}", reason=WRONG_TYPE)
    start = 0
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == SYSTEM:
        start = 1
    expected: tuple[str, ...] = (USER,)
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict):
            raise DataError(f"turn {i} must be an object, got {type(turn).__name__}", reason=WRONG_TYPE)
        role = turn.get("role")
        content = turn.get("content")
        if role not in ROLES:
            raise DataError(f"turn {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})", reason=UNKNOWN_ROLE)
        if not isinstance(content, str):
            raise DataError(f"turn {i} ({role}) content must be a string, got {type(content).__name__}", reason=WRONG_TYPE)
        if len(turn) > 2:
            _validate_optional(turn, i, role)
        calls = turn.get("tool_calls")
        if calls is not None:
            if role != ASSISTANT:
                raise DataError(f"turn {i} ({role}) has tool_calls; only assistant turns call tools", reason=BAD_TOOL_CALL)
            _validate_tool_calls(calls, i)
        if i < start:
            continue
        if role not in expected:
            if role == SYSTEM:
                where = "a system turn is only allowed first"
            elif role == TOOL:
                raise DataError(f"turn {i} is a tool result with no tool call before it", reason=ORPHAN_TOOL_RESULT)
            else:
                where = f"expected {' or '.join(expected)}, got {role}"
            raise DataError(f"turn {i} is out of order: {where}", reason=OUT_OF_ORDER)
        if role == USER:
            if not content.strip():
                raise DataError(f"turn {i} (user) is empty", reason=EMPTY_USER)
            expected = (ASSISTANT,)
        elif role == ASSISTANT:
            if not calls and not content.strip():
                raise DataError(f"turn {i} (assistant) is empty", reason=EMPTY_ASSISTANT)
            expected = (TOOL,) if calls else (USER,)
        else:  # tool
            expected = (TOOL, ASSISTANT)
    if not any(isinstance(t, dict) and t.get("role") == ASSISTANT for t in messages[start:]):
        raise DataError("conversation has no assistant turn", reason=NO_ASSISTANT)
    if expected != (USER,) and expected != (TOOL,):
        last = "a tool result" if expected == (TOOL, ASSISTANT) else "a user turn"
        raise DataError(f"conversation ends with {last} that has no assistant answer", reason=OUT_OF_ORDER)


def validate_record(record: Any) -> None:
    """Check a canonical record (as `convert` writes it): an object with a string id and valid messages."""
    if not isinstance(record, dict):
        raise DataError(f"record must be an object, got {type(record).__name__}", reason=NOT_AN_OBJECT)
    if "messages" not in record:
        raise DataError("missing field 'messages'", reason=MISSING_FIELD)
    if "id" in record and not isinstance(record["id"], str):
        raise DataError(f"'id' must be a string, got {type(record['id']).__name__}", reason=WRONG_TYPE)
    if record.get("tools") is not None:
        validate_tools(record["tools"])
    validate_messages(record["messages"])


def located(err: DataError, source: str, line: int | None, record: int | None) -> DataError:
    """The same error with the file and line/record filled in (the reason key is kept).

    In a JSON array both are known: the location shows the line, and the message starts with the record
    index, which is what a user counting elements (or `jq '.[N]'`) needs.
    """
    text = f"record {record}: {err.message}" if line is not None and record is not None else err.message
    return DataError(text, source=source, line=line, record=record, reason=err.reason)
