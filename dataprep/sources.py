"""Open instruction-data inputs and stream their raw records with locations.

Inputs: JSON Lines or one JSON array per file, optionally gzip or zstd compressed (detected from the
magic bytes, not the name), shell globs, a Hugging Face `save_to_disk` directory, or `hf:NAME[:SPLIT]`
for a dataset `datasets.load_dataset` can open offline (a locally cached hub name or a local folder).

Memory: JSONL is read in 4 MiB chunks and split into lines; a JSON array is scanned the same way, cutting
the text at candidate record ends and letting orjson parse each record (see `_array_records`), so neither
form is ever loaded whole. A Hugging Face dataset is memory-mapped Arrow, read in batches.

`read_records` yields `(raw, line, record)`: `raw` is the parsed record, or a `BadRecord` for a JSONL line
that is not valid JSON / UTF-8 (so the caller's on-error policy decides, and the next line still reads);
`line` is the 1-based line where the record starts (None for datasets) and `record` the 0-based index of
the record in a JSON array or dataset (None for JSONL, where the line says it all).
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import itertools
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson
import zstandard

from dataprep import conversation as cv
from dataprep.errors import DataError

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20
# A JSON-array record is cut out of the byte stream before parsing; past this size we stop looking for
# its end and report it, instead of reading an unterminated file into memory.
MAX_RECORD_BYTES = 64 << 20

FILE = "file"
HF_DISK = "hf_disk"
HF_HUB = "hf_hub"

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BOM = b"\xef\xbb\xbf"
# A candidate end of an array element: a closing brace followed by "," or "]". Braces inside strings or
# nested objects match too; orjson then reports "unexpected end of data" and we try the next candidate.
_RECORD_END = re.compile(rb"\}[ \t\r\n]*[,\]]")
_SPACE = re.compile(rb"[ \t\r\n]*")

Progress = Callable[[int], None]


@dataclass(frozen=True)
class BadRecord:
    """A JSONL line that could not be parsed: the located error and the line's text (for --rejects)."""

    error: DataError
    text: str


def _bad(line: bytes, exc: orjson.JSONDecodeError, name: str, lineno: int) -> BadRecord:
    return BadRecord(decode_error(line, exc, name, lineno, None), line.decode("utf-8", "replace").rstrip("\r"))


@dataclass(frozen=True)
class InputSource:
    """One input after glob expansion. `name` appears in error messages; `stem` prefixes derived ids."""

    name: str
    kind: str = FILE
    path: str | None = None
    split: str | None = None

    @property
    def stem(self) -> str:
        base = self.path if self.kind != HF_HUB else self.path or self.name
        return os.path.basename(os.path.normpath(base or self.name))

    @property
    def size(self) -> int | None:
        """Bytes on disk (compressed size for compressed files): the progress bar's total."""
        if self.kind == FILE and self.path:
            return os.path.getsize(self.path)
        return None


def is_saved_dataset(path: str) -> bool:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def _split_spec(spec: str) -> tuple[str, str | None]:
    """`NAME[:SPLIT]`; a colon that is part of an existing path is not a split separator."""
    if ":" in spec and not os.path.exists(spec):
        name, split = spec.rsplit(":", 1)
        if split and "/" not in split:
            return name, split
    return spec, None


def expand_inputs(inputs: Sequence[str]) -> list[InputSource]:
    """Resolve INPUT arguments to sources, in the order given (glob matches sorted, so runs are reproducible).

    Raises FileNotFoundError naming the input that matched nothing.
    """
    sources: list[InputSource] = []
    for item in inputs:
        if item.startswith("hf:"):
            name, split = _split_spec(item[3:])
            kind = HF_DISK if os.path.isdir(name) and is_saved_dataset(name) else HF_HUB
            sources.append(InputSource(name=item, kind=kind, path=name, split=split))
        elif os.path.isdir(item):
            if not is_saved_dataset(item):
                raise FileNotFoundError(
                    f"{item} is a directory but not a saved Hugging Face dataset; pass files or a glob like '{item}/*.jsonl'"
                )
            sources.append(InputSource(name=item, kind=HF_DISK, path=item))
        elif os.path.isfile(item):
            sources.append(InputSource(name=item, path=item))
        elif glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"no input file matches {item!r}")
            sources.extend(InputSource(name=p, path=p) for p in matches)
        else:
            raise FileNotFoundError(f"input not found: {item} (for a Hugging Face hub dataset use hf:NAME)")
    return sources


def read_records(source: InputSource, progress: Progress | None = None) -> Iterator[tuple[Any, int | None, int | None]]:
    """Stream `(raw, line, record)` from one source (see the module docstring)."""
    if source.kind == FILE:
        yield from _read_file(source, progress)
    else:
        yield from _read_dataset(source)


# ---------------------------------------------------------------- files


def _open_stream(path: str) -> tuple[BinaryIO, BinaryIO]:
    """(decompressed stream, underlying file); the file's position drives the progress bar."""
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller through the returned pair
    magic = raw.read(4)
    raw.seek(0)
    if magic[:2] == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if magic == _ZSTD_MAGIC:
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True), raw
    return raw, raw


def _chunks(source: InputSource, progress: Progress | None) -> Iterator[bytes]:
    stream, raw = _open_stream(source.path or "")
    try:
        seen = 0
        while True:
            try:
                chunk = stream.read(CHUNK_BYTES)
            except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
                raise DataError(f"cannot decompress: {exc}", source=source.name, reason="unreadable") from exc
            if progress is not None:
                pos = raw.tell()
                progress(pos - seen)
                seen = pos
            if not chunk:
                return
            yield chunk
    finally:
        stream.close()
        raw.close()


def _read_file(source: InputSource, progress: Progress | None) -> Iterator[tuple[Any, int | None, int | None]]:
    chunks = _chunks(source, progress)
    head = b""
    for chunk in chunks:
        head += chunk
        if head.startswith(_BOM):
            head = head[len(_BOM) :]
        first = _SPACE.match(head).end()
        if first < len(head):
            break
    else:
        log.warning("%s is empty", source.name)
        return
    if head[first : first + 1] == b"[":
        yield from _array_records(source.name, head, first, chunks)
    else:
        yield from _jsonl_records(source.name, head, chunks)


def decode_error(text: bytes | memoryview, exc: orjson.JSONDecodeError, source: str, line: int, record: int | None) -> DataError:
    """A DataError for text orjson rejected: invalid UTF-8 is told apart from bad JSON, with the exact line."""
    data = bytes(text)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as bad:
        at = line + data.count(b"\n", 0, bad.start)
        err = DataError(f"invalid UTF-8 (byte 0x{data[bad.start]:02x} at offset {bad.start} of the record)", reason=cv.INVALID_UTF8)
        return cv.located(err, source, at, record)
    text = data.decode("utf-8")
    pos = min(exc.pos, len(text))  # orjson reports a character offset, not a byte offset
    at = line + text.count("\n", 0, pos)
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    err = DataError(f"invalid JSON: {exc.msg} (column {column})", reason=cv.INVALID_JSON)
    return cv.located(err, source, at, record)


def _jsonl_records(name: str, head: bytes, chunks: Iterator[bytes]) -> Iterator[tuple[Any, int | None, int | None]]:
    loads = orjson.loads
    decode_failed = orjson.JSONDecodeError
    lineno = 0
    carry = b""
    for chunk in itertools.chain((head,), chunks):
        lines = (carry + chunk).split(b"\n") if carry else chunk.split(b"\n")
        carry = lines.pop()
        for line in lines:
            lineno += 1
            try:
                obj = loads(line)
            except decode_failed as exc:
                if line.strip():
                    yield _bad(line, exc, name, lineno), lineno, None
                continue
            yield obj, lineno, None
    if carry.strip():  # last line without a trailing newline (PaddleNLP's files end like this)
        lineno += 1
        try:
            obj = loads(carry)
        except decode_failed as exc:
            yield _bad(carry, exc, name, lineno), lineno, None
        else:
            yield obj, lineno, None


def _skip_space(name: str, buf: bytes, pos: int, line: int, chunks: Iterator[bytes], after: str) -> tuple[bytes, int, int]:
    """Advance past whitespace, reading more input as needed; returns (buf, pos, line) at the next byte."""
    while True:
        end = _SPACE.match(buf, pos).end()
        line += buf.count(b"\n", pos, end)
        if end < len(buf):
            return buf, end, line
        chunk = next(chunks, None)
        if chunk is None:
            err = DataError(f"unexpected end of file after {after} (the JSON array is not closed)", reason=cv.INVALID_JSON)
            raise cv.located(err, name, line, None)
        buf, pos = chunk, 0


def _array_records(name: str, buf: bytes, first: int, chunks: Iterator[bytes]) -> Iterator[tuple[Any, int | None, int | None]]:
    """Stream the objects of a top-level JSON array without holding the array.

    Each element is cut at the first `}` followed by `,` or `]` at which orjson parses the slice. A cut
    inside a string or a nested value fails with "unexpected end of data" (the JSON grammar never
    completes an object early), so the first slice that parses is exactly the element. Any other parse
    error is a real error at that position. An invalid element cannot be skipped, because nothing tells
    where the next one starts; it always stops the read.
    """
    loads = orjson.loads
    decode_failed = orjson.JSONDecodeError
    line = 1 + buf.count(b"\n", 0, first)
    buf, pos, line = _skip_space(name, buf, first + 1, line, chunks, "'['")
    if buf[pos] == 0x5D:  # "]": an empty array
        _expect_only_space(name, buf, pos + 1, line, chunks)
        return
    index = 0
    while True:
        if buf[pos] != 0x7B:  # "{"
            snippet = buf[pos : pos + 20].decode("utf-8", "replace")
            err = DataError(f"array element must be a JSON object, found {snippet!r}", reason=cv.NOT_AN_OBJECT)
            raise cv.located(err, name, line, index)
        start = search = pos
        while True:
            match = _RECORD_END.search(buf, search)
            if match is None:
                chunk = next(chunks, None)
                if chunk is None or len(buf) - start > MAX_RECORD_BYTES:
                    raise _unfinished_record(name, buf[start:], line, index, at_eof=chunk is None)
                buf = buf[start:] + chunk
                search -= start
                start = 0
                continue
            cut = match.start() + 1
            try:
                obj = loads(memoryview(buf)[start:cut])
            except decode_failed as exc:
                if exc.msg.startswith("unexpected end of data"):
                    search = cut  # the cut fell inside a string or a nested value
                    continue
                raise decode_error(buf[start:cut], exc, name, line, index) from None
            break
        yield obj, line, index
        index += 1
        line += buf.count(b"\n", start, match.end())
        pos = match.end()
        if buf[pos - 1] == 0x5D:  # "]"
            _expect_only_space(name, buf, pos, line, chunks)
            return
        buf, pos, line = _skip_space(name, buf, pos, line, chunks, "','")


def _unfinished_record(name: str, text: bytes, line: int, index: int, at_eof: bool) -> DataError:
    """The error for an array element whose end was never found: the real syntax error if there is one."""
    try:
        orjson.loads(text.rstrip())
    except orjson.JSONDecodeError as exc:
        if not exc.msg.startswith("unexpected end of data"):
            return decode_error(text.rstrip(), exc, name, line, index)
    if at_eof:
        err = DataError("unexpected end of file inside this record (the JSON array is not closed)", reason=cv.INVALID_JSON)
    else:
        err = DataError(f"record is larger than {MAX_RECORD_BYTES >> 20} MiB or never ends", reason=cv.INVALID_JSON)
    return cv.located(err, name, line, index)


def _expect_only_space(name: str, buf: bytes, pos: int, line: int, chunks: Iterator[bytes]) -> None:
    rest = buf[pos:]
    while True:
        extra = _SPACE.match(rest).end()
        if extra < len(rest):
            line += rest.count(b"\n", 0, extra)
            raise cv.located(DataError("unexpected data after the end of the JSON array", reason=cv.INVALID_JSON), name, line, None)
        line += rest.count(b"\n")
        rest = next(chunks, None)
        if rest is None:
            return


# ---------------------------------------------------------------- Hugging Face datasets


def _read_dataset(source: InputSource) -> Iterator[tuple[Any, int | None, int | None]]:
    ds = _open_dataset(source)
    index = 0
    for batch in ds.iter(batch_size=1024):
        columns = list(batch)
        if not columns:
            continue
        for i in range(len(batch[columns[0]])):
            yield {key: batch[key][i] for key in columns}, None, index
            index += 1


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Offline mode for this call only. The environment variables are read when the libraries are
    imported, which may have happened already in the caller's process, so the flags are set directly."""
    import datasets.config
    import huggingface_hub.constants

    flags = [(mod, name) for mod in (datasets.config, huggingface_hub.constants) for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(mod, name)]
    saved = [getattr(mod, name) for mod, name in flags]
    for mod, name in flags:
        setattr(mod, name, True)
    try:
        yield
    finally:
        for (mod, name), value in zip(flags, saved, strict=True):
            setattr(mod, name, value)


def _open_dataset(source: InputSource) -> Any:
    """A `datasets.Dataset`; never touches the network (the tool runs in batch jobs without hub access)."""
    import datasets

    if source.kind == HF_DISK:
        loaded = datasets.load_from_disk(source.path or source.name)
    else:
        try:
            with _hub_offline():
                loaded = datasets.load_dataset(source.path or source.name, split=source.split)
        except Exception as exc:  # datasets raises many types here; the user needs one clear line
            raise DataError(
                f"cannot open Hugging Face dataset offline (is it in the local cache?): {type(exc).__name__}: {exc}",
                source=source.name, reason="unreadable",
            ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if source.split:
            if source.split not in loaded:
                raise DataError(f"no split {source.split!r}; splits are {', '.join(splits)}", source=source.name, reason="unreadable")
            return loaded[source.split]
        if "train" in loaded:
            split = "train"
        elif len(splits) == 1:
            split = splits[0]
        else:
            raise DataError(
                f"dataset has splits {', '.join(splits)}; choose one with hf:{source.path}:SPLIT", source=source.name, reason="unreadable"
            )
        log.info("%s: using split %r", source.name, split)
        return loaded[split]
    return loaded
