"""Convert one batch of parsed input records to canonical records: the per-record hot loop of convert.

Shared by the single-process reader (`convert.iter_converted`, which `pack` also uses) and the worker
processes of `convert --num-proc` (`convert_parallel`), so both apply exactly the same rules, ids and
error messages, and their outputs can be compared byte for byte.

The loop is written for the common case (every record valid, format known, no system prompt, ids
derived): one type check, one converter call, one dict per record. Anything unusual leaves the fast
line through a branch that is taken once per unusual record, not once per record.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from dataprep import conversation as cv
from dataprep import input_formats as fmts
from dataprep.errors import DataError
from dataprep.json_stream import BadRecord

log = logging.getLogger("dataprep.convert")

# `limit` meaning "no limit" (a plain int keeps the per-record comparison cheap).
NO_LIMIT = 1 << 62

# What convert does with input fields no reader maps (CONTRACTS.md): keep them under "extra" and
# count them by name, or refuse the record (then the on-error policy decides: stop, or skip and count).
OnUnknownField = Literal["keep", "fail"]
ON_UNKNOWN_FIELD: tuple[str, ...] = ("keep", "fail")


@dataclass
class SourceState:
    """What is known about the input being read: its name (for messages), id stem and, once the first
    good record was seen, its format (`forced` when --input-format was given)."""

    name: str
    stem: str
    fmt: str | None = None


@dataclass
class Converted:
    """The outcome of one batch.

    `records[k]` came from `sources[k]` (the parsed input record, or one instance of a self-instruct
    task); output styles that need more than the canonical record read it. `used` is how many input
    records were looked at (fewer than the batch only when `limit` was reached). `errors` holds
    `(index in batch, unlocated DataError, raw)` for bad records in input order; with `fail` the
    batch stops at the first. `placeholders` lists, per derived id that contains `token`, the batch
    index whose absolute record number replaces it (JSON-array chunks converted before the index of
    their first element is known).
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    sources: list[Any] = field(default_factory=list)
    fmt: str | None = None
    used: int = 0
    errors: list[tuple[int, DataError, Any]] = field(default_factory=list)
    placeholders: list[int] = field(default_factory=list)
    detected: bool = False
    unknown_fields: Counter = field(default_factory=Counter)


def convert_batch(
    state: SourceState,
    records: list[Any],
    lines: list[int] | None,
    base: int | None,
    system: str | None,
    fail: bool,
    limit: int = NO_LIMIT,
    token: str | None = None,
    keep_sources: bool = False,
    on_unknown_field: OnUnknownField = "keep",
) -> Converted:
    """Convert `records` (a RecordBatch's) under the source's format, detecting it on the first good one.

    Ids without an input id: `stem:LINE` when `base` is None (JSON Lines; `lines` gives each record's
    line), else `stem[base + i]`; with `token` set, `base` is unknown and `stem[<token>]` is written
    with the batch index remembered in `placeholders`. `keep_sources` fills `Converted.sources`.
    Unmapped input fields are counted in `Converted.unknown_fields`; with `on_unknown_field="fail"` such a
    record is a bad record (reason "unknown_field").
    """
    out = Converted(fmt=state.fmt)
    converted = out.records
    append = converted.append
    keep = out.sources.append if keep_sources else None
    fmt = state.fmt
    converter = fmts.CONVERTERS[fmt] if fmt is not None else None
    special = fmt == fmts.SELF_INSTRUCT
    stem = state.stem
    add_system = cv.add_system
    dict_type = dict
    n = len(records)
    i = 0
    converted_body: tuple[int, Any] | None = None  # (index, body) the fast loop converted before leaving
    while i < n:
        if converter is not None and not special:
            # Fast loop: known format, one output per input; it leaves at the first record needing care.
            start = i
            for i in range(start, n):  # noqa: B020 - the index carries on after the loop
                raw = records[i]
                if type(raw) is not dict_type:
                    break
                try:
                    messages = converter(raw)
                except DataError:
                    break
                if type(messages) is not list:  # tools or unmapped fields: the careful path, given this body
                    converted_body = (i, messages)
                    break
                rid = raw.get("id")
                if rid is None:
                    if base is None:
                        rid = f"{stem}:{lines[i]}"  # type: ignore[index]
                    elif token is None:
                        rid = f"{stem}[{base + i}]"
                    else:
                        rid = f"{stem}[{token}]"
                        out.placeholders.append(i)
                elif type(rid) is not str:
                    break
                if system:
                    messages = add_system(messages, system)
                append({"id": rid, "messages": messages})
                if keep is not None:
                    keep(raw)
                if len(converted) >= limit:
                    out.used = i + 1
                    return out
            else:
                break  # the whole rest of the batch was fine
        # Careful path for record i: detection, errors, non-string ids, self-instruct expansion.
        raw = records[i]
        try:
            if type(raw) is BadRecord:
                raise raw.error
            if converter is None:
                fmt = fmts.detect_format(raw)
                converter = fmts.CONVERTERS[fmt]
                special = fmt == fmts.SELF_INSTRUCT
                state.fmt = out.fmt = fmt
                out.detected = True
                log.info("%s: detected input format %s", state.name, fmt)
            fallback = _derived_id(stem, lines, base, token, i)
            unknown = out.unknown_fields
            if special:
                pairs = _expand_self_instruct(raw, system, fallback, on_unknown_field, unknown)
            else:
                body = converted_body[1] if converted_body is not None and converted_body[0] == i else None
                pairs = [(_convert_one(converter, raw, system, fallback, on_unknown_field, unknown, body), raw)]
            converted_body = None
        except DataError as err:
            out.errors.append((i, err, raw))
            if fail:
                out.used = i + 1
                return out
        else:
            for rec, src in pairs:
                if token is not None and src.get("id") is None:  # a derived id, not the input's own
                    out.placeholders.append(i)
                append(rec)
                if keep is not None:
                    keep(src)
        i += 1
        if len(converted) >= limit:
            out.used = i
            del converted[limit:]
            del out.sources[limit:]
            return out
    out.used = n
    return out


def _derived_id(stem: str, lines: list[int] | None, base: int | None, token: str | None, i: int) -> str:
    if base is None:
        return f"{stem}:{lines[i]}"  # type: ignore[index]
    if token is None:
        return f"{stem}[{base + i}]"
    return f"{stem}[{token}]"


def _convert_one(converter: Any, raw: Any, system: str | None, fallback_id: str,
                 on_unknown_field: OnUnknownField = "keep", unknown: Counter | None = None,
                 body: Any = None) -> dict[str, Any]:
    """`body`: the converter's result for `raw` when the caller already has it (converting twice is waste)."""
    if body is None:
        body = converter(raw)  # validated by the converter; a system turn first keeps it valid
    rid = raw.get("id")
    if rid is None:
        rid = fallback_id
    elif type(rid) is not str:
        rid = fmts.record_id(raw)  # an integer id as text, or a wrong-type error
    if type(body) is list:
        return {"id": rid, "messages": cv.add_system(body, system) if system else body}
    names = body.pop(cv.UNKNOWN_NAMES, None)
    if names:
        if on_unknown_field == "fail":
            shown = ", ".join(sorted(set(names)))
            raise DataError(
                f"fields no reader maps: {shown} (--on-unknown-field keep stores them under '{cv.EXTRA}')",
                reason=cv.UNKNOWN_FIELD,
            )
        if unknown is not None:
            unknown.update(names)
    messages = body.pop("messages")
    # "messages" last: every record then ends with "]}", which output_styles.serialize relies on
    return {"id": rid, **body, "messages": cv.add_system(messages, system) if system else messages}


def _expand_self_instruct(raw: Any, system: str | None, fallback_id: str, on_unknown_field: OnUnknownField = "keep",
                          unknown: Counter | None = None) -> list[tuple[dict[str, Any], Any]]:
    """(record, source record) pairs for one seed task: one per instance, all converted before any is
    kept, so a bad instance skips the whole task rather than half of it."""
    items = fmts.expand_self_instruct(raw)
    alpaca = fmts.alpaca_messages
    if len(items) == 1:
        return [(_convert_one(alpaca, items[0], system, fallback_id, on_unknown_field, unknown), items[0])]
    found: Counter = Counter()
    pairs = [(_convert_one(alpaca, item, system, f"{fallback_id}-{k}", on_unknown_field, found), item)
             for k, item in enumerate(items)]
    if unknown is not None:  # a task's fields count once, not once per instance
        unknown.update({name: 1 for name in found})
    return pairs
