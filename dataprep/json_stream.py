"""Stream records out of JSON Lines and JSON-array byte streams, in batches, with their locations.

Neither form is ever loaded whole: the input arrives in chunks (1 MiB) and records are handed out in
batches as soon as they are complete. Batches, rather than single records, because at millions of
records the per-record Python overhead (generator hops, tuples) costs as much as parsing.

JSON arrays: a whole chunk's worth of elements is parsed with one orjson call, by cutting the text at
the last `}` followed by `,`/`]` and parsing `[` + slice + `]`. A cut that falls inside a string or a
nested value cannot produce a list of objects (a prefix of an object never parses as a complete
object), so such a cut fails and an earlier candidate is tried; if several fail (or an element is not
an object, or the text is invalid), that stretch is re-read one element at a time, which finds the
exact element and line of any error. Lines of batch-parsed elements are computed only when asked for
(error messages), by re-scanning that batch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from dataprep import conversation as cv
from dataprep.errors import DataError

# A record larger than this is reported instead of reading an unterminated file into memory.
MAX_RECORD_BYTES = 64 << 20
# Candidate cuts tried (from the end of the buffer backwards) before falling back to one-by-one.
_BATCH_TRIES = 4
# Records per batch in the one-by-one fallback.
_SLOW_BATCH = 4096
# Candidate cuts `cut` looks at for one that matches the array's layout before taking the last one.
_LAYOUT_TRIES = 16

_SPACE = re.compile(rb"[ \t\r\n]*")
# A candidate end of an array element: "}" then "," or "]", plus the whitespace after ",", so that
# match.end() is where the next element starts. Group 1 is set for "," and unset for "]".
_RECORD_END = re.compile(rb"\}[ \t\r\n]*(?:(,)|\])[ \t\r\n]*")
_EOF_MESSAGE = "unexpected end of data"


@dataclass(frozen=True)
class BadRecord:
    """A JSON Lines line that could not be parsed: the located error and the line's text (for rejects)."""

    error: DataError
    text: str


@dataclass
class RecordBatch:
    """Consecutive records of one source. `records` may hold BadRecord items (JSON Lines only).

    `lines` gives each record's first line when it is known up front (JSON Lines, one-by-one array
    reads); `first_index` is the array/dataset index of records[0] (None for JSON Lines, where the
    line is the identity). `line(i)` works in every case, computing array lines on demand.
    """

    records: list[Any]
    lines: list[int] | None = None
    first_index: int | None = None
    _text: bytes | None = field(default=None, repr=False)  # "[" + the batch-parsed elements + "]"
    _text_line: int = 0

    def line(self, i: int) -> int | None:
        if self.lines is None and self._text is not None:
            self.lines = _element_lines(self._text, self._text_line)  # one re-scan, then cached
            self._text = None
        return None if self.lines is None else self.lines[i]

    def index(self, i: int) -> int | None:
        return None if self.first_index is None else self.first_index + i


def decode_error(text: bytes | memoryview, exc: orjson.JSONDecodeError, source: str, line: int, record: int | None) -> DataError:
    """A DataError for text orjson rejected: invalid UTF-8 is told apart from bad JSON, with the exact line."""
    data = bytes(text)
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError as bad:
        at = line + data.count(b"\n", 0, bad.start)
        err = DataError(f"invalid UTF-8 (byte 0x{data[bad.start]:02x} at offset {bad.start} of the record)", reason=cv.INVALID_UTF8)
        return cv.located(err, source, at, record)
    pos = min(exc.pos, len(decoded))  # orjson reports a character offset, not a byte offset
    at = line + decoded.count("\n", 0, pos)
    column = pos - (decoded.rfind("\n", 0, pos) + 1) + 1
    err = DataError(f"invalid JSON: {exc.msg} (column {column})", reason=cv.INVALID_JSON)
    return cv.located(err, source, at, record)


# ---------------------------------------------------------------- JSON Lines


def _bad_line(line: bytes, exc: orjson.JSONDecodeError, name: str, lineno: int) -> BadRecord:
    return BadRecord(decode_error(line, exc, name, lineno, None), line.decode("utf-8", "replace").rstrip("\r"))


def jsonl_batches(name: str, head: bytes, chunks: Iterator[bytes]) -> Iterator[RecordBatch]:
    """One batch per chunk; blank lines are skipped, unparsable lines become BadRecord items.

    Each line is parsed on its own (joining lines into one array would let a broken line and a
    neighbour pair up into valid JSON and shift every later line number).
    """
    for text, lineno, _offset in jsonl_cuts(head, chunks):
        batch = parse_jsonl(name, text, lineno)
        if batch.records:
            yield batch


def parse_jsonl(name: str, text: bytes, first_line: int) -> RecordBatch:
    """The records of whole JSON Lines (`text` ends with a newline, or at the end of the file)."""
    loads = orjson.loads
    decode_failed = orjson.JSONDecodeError
    pieces = text.split(b"\n")
    if not pieces[-1]:
        pieces.pop()
    records: list[Any] = []
    lines: list[int] = []
    lineno = first_line - 1
    for piece in pieces:
        lineno += 1
        try:
            records.append(loads(piece))
        except decode_failed as exc:
            if not piece.strip():
                continue
            records.append(_bad_line(piece, exc, name, lineno))
        lines.append(lineno)
    return RecordBatch(records, lines)


def jsonl_cuts(head: bytes, chunks: Iterator[bytes]) -> Iterator[tuple[bytes, int, int]]:
    """`(whole lines, first line number, offset in the stream)` for `parse_jsonl`, about a chunk at a
    time, without parsing (`convert --num-proc` parses them in worker processes)."""
    lineno = 1
    offset = 0
    carry = b""
    pending: list[bytes] = []  # chunks of one long line with no newline yet: joined once, not once per chunk
    for chunk in _prepend(head, chunks):
        if b"\n" not in chunk:
            pending.append(chunk)
            continue
        if pending:
            carry += b"".join(pending)
            pending = []
        text = carry + chunk if carry else chunk
        cut = text.rfind(b"\n") + 1
        carry = text[cut:]
        if cut:
            piece = text[:cut] if carry else text
            yield piece, lineno, offset
            lineno += piece.count(b"\n")
            offset += cut
    if pending:
        carry += b"".join(pending)
    if carry.strip():  # a last line without a trailing newline (PaddleNLP's files end like this)
        yield carry, lineno, offset


def _prepend(head: bytes, chunks: Iterator[bytes]) -> Iterator[bytes]:
    yield head
    yield from chunks


# ---------------------------------------------------------------- JSON arrays


def array_batches(name: str, head: bytes, first: int, chunks: Iterator[bytes]) -> Iterator[RecordBatch]:
    """Stream the objects of a top-level JSON array (head[first] is its "[") in batches."""
    scanner = ArrayScanner(name, head, first, chunks)
    while not scanner.done:
        if scanner.offset >= scanner.slow_until:
            batch = scanner.batch()
            if batch is not None:
                yield batch
                continue
        yield scanner.one_by_one()


class ArrayScanner:
    """Where we are in one JSON array: the buffered text, the next element's position, line and index.

    `consumed` is how many bytes of the stream precede `buf`, so positions can be compared across
    refills (`offset` is the absolute position of the next element).
    """

    def __init__(self, name: str, buf: bytes, first: int, chunks: Iterator[bytes]) -> None:
        self.name = name
        self.chunks = chunks
        self.buf = buf
        self.consumed = 0
        self.line = 1 + buf.count(b"\n", 0, first)
        self.pos = first + 1
        self.index = 0
        self.done = False
        self.slow_until = 0
        self.pending: DataError | None = None
        self._skip_space("'['")
        # The whitespace before the first element: when it has a newline (pretty-printed files), cuts
        # followed by the same whitespace are element boundaries, not "}," inside nested values.
        lead = self.buf[first + 1 : self.pos] if self.consumed == 0 else b""
        self.layout = lead if b"\n" in lead else None
        self._between = None if self.layout is None else re.compile(re.escape(b"}," + self.layout + b"{"))
        if self.buf[self.pos] == 0x5D:  # "]": an empty array
            self._finish(self.pos + 1)

    @property
    def offset(self) -> int:
        return self.consumed + self.pos

    def _refill(self) -> bool:
        """Append the next chunk, dropping what was consumed; False at the end of the input."""
        chunk = next(self.chunks, None)
        if chunk is None:
            return False
        self.consumed += self.pos
        self.buf = self.buf[self.pos :] + chunk
        self.pos = 0
        return True

    def _skip_space(self, after: str) -> None:
        while True:
            end = _SPACE.match(self.buf, self.pos).end()
            self.line += self.buf.count(b"\n", self.pos, end)
            self.pos = end
            if end < len(self.buf):
                return
            if not self._refill():
                err = DataError(f"unexpected end of file after {after} (the JSON array is not closed)", reason=cv.INVALID_JSON)
                raise cv.located(err, self.name, self.line, None)

    def _finish(self, pos: int) -> None:
        """After the closing "]": only whitespace may follow."""
        self.done = True
        rest = self.buf[pos:]
        line = self.line
        while rest is not None:
            extra = _SPACE.match(rest).end()
            if extra < len(rest):
                line += rest.count(b"\n", 0, extra)
                raise cv.located(DataError("unexpected data after the end of the JSON array", reason=cv.INVALID_JSON), self.name, line, None)
            line += rest.count(b"\n")
            rest = next(self.chunks, None)

    def _advance(self, match: re.Match, count: int) -> None:
        end = match.end()
        self.line += self.buf.count(b"\n", self.pos, end)
        self.pos = end
        self.index += count
        try:
            if match.lastindex is None:
                self._finish(end)
            elif end == len(self.buf):  # the buffer ended in the whitespace after ","
                self._skip_space("','")
        except DataError as err:
            # Raised on the next read, after the records before it were handed out: errors come
            # in input order, however the input happened to be chunked.
            self.done = False
            self.pending = err

    def _candidates(self) -> Iterator[re.Match]:
        """Candidate cuts from the end of the buffer backwards."""
        hi = len(self.buf)
        while True:
            j = self.buf.rfind(b"}", self.pos, hi)
            if j < 0:
                return
            match = _RECORD_END.match(self.buf, j)
            if match is not None:
                yield match
            hi = j

    def batch(self) -> RecordBatch | None:
        """Parse all complete elements in the buffer with one orjson call, or None to go one by one."""
        if self.pending is not None:
            raise self.pending
        while True:
            tried = 0
            for match in self._candidates():
                if tried == 0:
                    self.slow_until = self.consumed + match.end()
                tried += 1
                text = b"".join((b"[", memoryview(self.buf)[self.pos : match.start() + 1], b"]"))
                try:
                    records = orjson.loads(text)
                except orjson.JSONDecodeError:
                    records = None
                if records is not None and _all_objects(records):
                    batch = RecordBatch(records, first_index=self.index, _text=text, _text_line=self.line)
                    self._advance(match, len(records))
                    return batch
                if tried == _BATCH_TRIES:
                    return None
            if tried:
                return None
            # not one complete element in the buffer yet: read more
            if len(self.buf) - self.pos > MAX_RECORD_BYTES or not self._refill():
                return None

    # ---- unparsed cuts for worker processes (`convert --num-proc`)

    def cut(self) -> tuple[bytes, bytes, int | None, int] | None:
        """The next run of elements as unparsed text, about a chunk of it: `(elements, sep, count, offset)`.

        `elements` is what lies between "[" and "]" for `parse_array_chunk` (starting at `offset` in
        the stream); `sep` the separator after
        it (`elements + sep` is what `rewind` takes back); `count` the number of elements if the
        array's layout tells (pretty-printed: "}," + the layout + "{" only occurs between elements,
        since JSON strings hold no raw newline), else None. All of it is only a candidate: whoever
        parses it learns whether the cut and count were right, and `rewind` goes back if not.
        Neither `index` nor `line` is kept up to date here (set both before `batch`/`one_by_one`).
        None means: read on with `batch`/`one_by_one` from here (no candidate before a record too
        large, or an ending that needs their checks).
        """
        if self.pending is not None:
            raise self.pending
        while True:
            match = self._last_cut()
            if match is not None:
                end = match.end()
                if match.lastindex is not None and end < len(self.buf):
                    break  # "}," with the next element already in the buffer
                if match.lastindex is None and end == len(self.buf) and not self._refill():
                    self.done = True  # "}]" and nothing but whitespace to the end of the input
                    break
                if match.lastindex is not None and not self._refill():
                    return None  # a "," at the very end of the input: the careful path reports it
                continue
            if len(self.buf) - self.pos > MAX_RECORD_BYTES or not self._refill():
                return None
        elements = self.buf[self.pos : match.start() + 1]
        sep = self.buf[match.start() + 1 : end]
        offset = self.offset
        self.pos = end
        count = None if self._between is None else len(self._between.findall(elements)) + 1  # findall beats bytes.count here
        return elements, sep, count, offset

    def _last_cut(self) -> re.Match | None:
        """The last candidate end of an element in the buffer (preferring one that matches the layout)."""
        first = None
        for k, match in enumerate(self._candidates()):
            if match.lastindex is None and match.end() < len(self.buf):
                continue  # "}]" followed by more text: not the end of the array
            if first is None:
                first = match
                if self.layout is None or match.lastindex is None:
                    return match
            if self.buf[match.start(1) + 1 : match.end()] == self.layout:
                return match
            if k == _LAYOUT_TRIES:
                break
        return first

    def rewind(self, span: bytes, line: int, index: int) -> int:
        """Step back over `span` (text that `cut` handed out and that did not parse) to re-read it with
        `batch`/`one_by_one`; returns the input offset where the span ends."""
        end = self.offset
        self.buf = span + self.buf[self.pos :]
        self.consumed = end - len(span)
        self.pos = 0
        self.line = line
        self.index = index
        self.slow_until = 0
        self.done = False
        self.pending = None
        return end

    def one_by_one(self) -> RecordBatch:
        """Read elements singly up to `slow_until` (at least one); exact errors come from here."""
        if self.pending is not None:
            raise self.pending
        records: list[Any] = []
        lines: list[int] = []
        first_index = self.index
        while not self.done and self.pending is None and (not records or (self.offset < self.slow_until and len(records) < _SLOW_BATCH)):
            line = self.line
            try:
                records.append(self._one())
            except DataError:
                if not records:
                    raise
                break  # hand out the records before it first; the next call raises it again
            lines.append(line)
        return RecordBatch(records, lines, first_index)

    def _one(self) -> Any:
        """Parse exactly one element at `pos`: the first candidate cut at which orjson parses the slice."""
        if self.buf[self.pos] != 0x7B:  # "{"
            while len(self.buf) - self.pos < 20 and self._refill():
                pass  # the same snippet however the input was chunked
            snippet = self.buf[self.pos : self.pos + 20].decode("utf-8", "replace")
            err = DataError(f"array element must be a JSON object, found {snippet!r}", reason=cv.NOT_AN_OBJECT)
            raise cv.located(err, self.name, self.line, self.index)
        search = self.pos
        while True:
            match = _RECORD_END.search(self.buf, search)
            if match is None:
                start = self.pos
                if len(self.buf) - start > MAX_RECORD_BYTES or not self._refill():
                    raise self._unfinished(at_eof=len(self.buf) - start <= MAX_RECORD_BYTES)
                search -= start
                continue
            cut = match.start() + 1
            try:
                obj = orjson.loads(memoryview(self.buf)[self.pos : cut])
            except orjson.JSONDecodeError as exc:
                if exc.msg.startswith(_EOF_MESSAGE):
                    search = cut  # the cut fell inside a string or a nested value
                    continue
                raise decode_error(self.buf[self.pos : cut], exc, self.name, self.line, self.index) from None
            self._advance(match, 1)
            return obj

    def _unfinished(self, at_eof: bool) -> DataError:
        """The error for an element whose end was never found: the real syntax error if there is one."""
        text = self.buf[self.pos :].rstrip()
        try:
            orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            if not exc.msg.startswith(_EOF_MESSAGE):
                return decode_error(text, exc, self.name, self.line, self.index)
        if at_eof:
            err = DataError("unexpected end of file inside this record (the JSON array is not closed)", reason=cv.INVALID_JSON)
        else:
            err = DataError(f"record is larger than {MAX_RECORD_BYTES >> 20} MiB or never ends", reason=cv.INVALID_JSON)
        return cv.located(err, self.name, self.line, self.index)


def parse_array_chunk(elements: bytes, line: int) -> RecordBatch | None:
    """The objects of a `cut`, or None when the cut was not at element boundaries (or the text is bad:
    then re-reading it with `batch`/`one_by_one` finds the exact error). `first_index` is 0: the
    caller knows where the chunk is in the array."""
    text = b"".join((b"[", elements, b"]"))
    try:
        records = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not _all_objects(records):
        return None
    return RecordBatch(records, first_index=0, _text=text, _text_line=line)


def _all_objects(records: list[Any]) -> bool:
    """Every element is a JSON object (a C-level pass: this runs once per batch of a thousand records)."""
    return not records or set(map(type, records)) == {dict}


def _element_lines(text: bytes, line: int) -> list[int]:
    """The line on which each element of a batch-parsed `[...]` text starts (for messages: it re-scans)."""
    lines = []
    pos = 1
    while pos < len(text):
        lines.append(line)
        search = pos
        while True:
            match = _RECORD_END.search(text, search)
            if match is None:  # cannot happen for a region that parsed; stay safe
                return lines
            try:
                orjson.loads(memoryview(text)[pos : match.start() + 1])
                break
            except orjson.JSONDecodeError:
                search = match.start() + 1
        line += text.count(b"\n", pos, match.end())
        pos = match.end()
    return lines
