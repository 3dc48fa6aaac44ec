"""The on-error policy of convert (and pack's reading): what happens to one bad input record.

One home for it, below both the one-process reader (`convert`) and the worker pool (`convert_parallel`),
so the two apply the same rule and write the same rejects lines, and neither imports the other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from dataprep import conversation as cv
from dataprep.errors import DataError

OnError = Literal["fail", "skip"]
ON_ERROR: tuple[str, ...] = ("fail", "skip")


@dataclass(frozen=True)
class Reject:
    """One skipped record, as written to `--rejects` (a JSONL line)."""

    source: str
    line: int | None
    record: int | None
    reason: str
    error: str
    raw: Any = None
    text: str | None = None

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {"source": self.source, "line": self.line, "record": self.record, "reason": self.reason, "error": self.error}
        if self.text is not None:
            doc["text"] = self.text
        else:
            doc["raw"] = self.raw
        return orjson.dumps(doc, default=str, option=orjson.OPT_APPEND_NEWLINE)


OnReject = Callable[[Reject], None]


def handle_bad_record(
    err: DataError,
    source: str,
    line: int | None,
    record: int | None,
    fail: bool,
    skipped: Counter,
    on_reject: OnReject | None,
    raw: Any = None,
    text: str | None = None,
) -> None:
    """Apply the on-error policy to one bad record: raise it located (`fail`), or count it under its
    reason in `skipped` and hand it to `on_reject` (`raw`: the parsed record, `text`: the line that did
    not parse)."""
    if err.source is None:
        err = cv.located(err, source, line, record)
    if fail:
        raise err from None
    skipped[err.reason] += 1
    if on_reject is not None:
        on_reject(Reject(source, line, record, err.reason, str(err), raw=raw, text=text))
