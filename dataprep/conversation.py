"""The canonical conversation record every input format is converted to, and its validation.

A record is `{"id": str, "messages": [{"role": ..., "content": str}, ...]}` (CONTRACTS.md). Validation lives
here, once, so that every reader (Alpaca, src/tgt, ShareGPT, messages, Hugging Face datasets) rejects the
same bad shapes with the same reason keys, and `pack` can trust what `convert` wrote.

Errors raised here carry no location; the caller knows the file and line and re-raises them with it
(`located`).
"""

from __future__ import annotations

from typing import Any

from dataprep.errors import DataError

SYSTEM = "system"
USER = "user"
ASSISTANT = "assistant"
ROLES = (SYSTEM, USER, ASSISTANT)

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


def message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def make_record(record_id: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    return {"id": record_id, "messages": messages}


def add_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """Prepend `system` unless the record already has its own system turn.

    A record's own system prompt is more specific than a command-line default, so it wins.
    """
    if not system or (messages and messages[0].get("role") == SYSTEM):
        return messages
    return [message(SYSTEM, system), *messages]


def validate_messages(messages: Any) -> None:
    """Raise DataError (no location) unless `messages` is a trainable conversation.

    Rules (CONTRACTS.md): an optional system turn first; then user/assistant strictly alternating,
    starting with user and ending with assistant; every content a string; no empty user or assistant
    turn (an empty answer teaches the model to stop at once, an empty prompt is a broken record).
    """
    if not isinstance(messages, list):
        raise DataError(f"'messages' must be a list, got {type(messages).__name__}", reason=WRONG_TYPE)
    start = 0
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == SYSTEM:
        start = 1
    expected = USER
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict):
            raise DataError(f"turn {i} must be an object, got {type(turn).__name__}", reason=WRONG_TYPE)
        role = turn.get("role")
        content = turn.get("content")
        if role not in ROLES:
            raise DataError(f"turn {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})", reason=UNKNOWN_ROLE)
        if not isinstance(content, str):
            raise DataError(f"turn {i} ({role}) content must be a string, got {type(content).__name__}", reason=WRONG_TYPE)
        if i < start:
            continue
        if role != expected:
            where = "a system turn is only allowed first" if role == SYSTEM else f"expected {expected}, got {role}"
            raise DataError(f"turn {i} is out of order: {where}", reason=OUT_OF_ORDER)
        if not content.strip():
            if role == ASSISTANT:
                raise DataError(f"turn {i} (assistant) is empty", reason=EMPTY_ASSISTANT)
            raise DataError(f"turn {i} (user) is empty", reason=EMPTY_USER)
        expected = ASSISTANT if expected == USER else USER
    if len(messages) <= start + 1:
        raise DataError("conversation has no assistant turn", reason=NO_ASSISTANT)
    if expected == ASSISTANT:
        raise DataError("conversation ends with a user turn that has no assistant answer", reason=OUT_OF_ORDER)


def validate_record(record: Any) -> None:
    """Check a canonical record (as `convert` writes it): an object with a string id and valid messages."""
    if not isinstance(record, dict):
        raise DataError(f"record must be an object, got {type(record).__name__}", reason=NOT_AN_OBJECT)
    if "messages" not in record:
        raise DataError("missing field 'messages'", reason=MISSING_FIELD)
    if "id" in record and not isinstance(record["id"], str):
        raise DataError(f"'id' must be a string, got {type(record['id']).__name__}", reason=WRONG_TYPE)
    validate_messages(record["messages"])


def located(err: DataError, source: str, line: int | None, record: int | None) -> DataError:
    """The same error with the file and line/record filled in (the reason key is kept).

    In a JSON array both are known: the location shows the line, and the message starts with the record
    index, which is what a user counting elements (or `jq '.[N]'`) needs.
    """
    text = f"record {record}: {err.message}" if line is not None and record is not None else err.message
    return DataError(text, source=source, line=line, record=record, reason=err.reason)
