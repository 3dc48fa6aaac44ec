"""Errors about input data that a user must be able to find and fix."""

from __future__ import annotations


class DataError(ValueError):
    """A bad input record or file. The message names the file and the line or record, so a user can fix it.

    `source` is the file (or dataset) name, `line` a 1-based line number for line-oriented files, and
    `record` a 0-based record index for JSON arrays and datasets. `reason` is a short stable key
    (e.g. "missing_field") used to count skipped records by reason.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        record: int | None = None,
        reason: str = "invalid",
    ) -> None:
        self.message = message
        self.source = source
        self.line = line
        self.record = record
        self.reason = reason
        super().__init__(str(self))

    @property
    def location(self) -> str:
        where = self.source or "<input>"
        if self.line is not None:
            where += f":{self.line}"
        elif self.record is not None:
            where += f" record {self.record}"
        return where

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"
