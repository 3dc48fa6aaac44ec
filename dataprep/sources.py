"""Open instruction-data inputs and stream their raw records with locations.

Inputs: JSON Lines or one JSON array per file, optionally gzip or zstd compressed (detected from the
magic bytes, not the name), shell globs, a Hugging Face `save_to_disk` directory, or `hf:NAME[:SPLIT]`
for a dataset `datasets.load_dataset` can open offline (a locally cached hub name or a local folder).

Memory: files are read in 1 MiB chunks and records handed out as soon as they are complete (see
`json_stream`), so neither JSONL nor a JSON array is ever loaded whole. A Hugging Face dataset is
memory-mapped Arrow, read in batches of 1024 rows.

`read_batches` yields `json_stream.RecordBatch` objects; `read_records` flattens them to `(raw, line,
record)`: `raw` is the parsed record, or a `BadRecord` for a JSONL line that is not valid JSON / UTF-8 (so
the caller's on-error policy decides, and the next line still reads); `line` is the 1-based line where
the record starts (None for datasets) and `record` the 0-based index of the record in a JSON array or
dataset (None for JSONL, where the line says it all).
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import zstandard

from dataprep.errors import DataError
from dataprep.json_stream import BadRecord, RecordBatch, array_batches, jsonl_batches

__all__ = ["BadRecord", "InputSource", "RecordBatch", "expand_inputs", "read_batches", "read_records"]

log = logging.getLogger(__name__)

# Read size; also the batch size. Bigger buys nothing measurable and costs memory (several buffers
# of this size are alive at once).
CHUNK_BYTES = 1 << 20

FILE = "file"
ARRAY = "array"
JSONL = "jsonl"
HF_DISK = "hf_disk"
HF_HUB = "hf_hub"

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BOM = b"\xef\xbb\xbf"
_SPACE = re.compile(rb"[ \t\r\n]*")

Progress = Callable[[int], None]


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


def read_batches(source: InputSource, progress: Progress | None = None) -> Iterator[RecordBatch]:
    """Stream one source as RecordBatch objects (records plus how to locate each one)."""
    if source.kind == FILE:
        return _read_file(source, progress)
    return _read_dataset(source)


def read_records(source: InputSource, progress: Progress | None = None) -> Iterator[tuple[Any, int | None, int | None]]:
    """`(raw, line, record)` one at a time (see the module docstring); simpler, slower than batches."""
    for batch in read_batches(source, progress):
        for i, raw in enumerate(batch.records):
            yield raw, batch.line(i), batch.index(i)


# ---------------------------------------------------------------- files


def zstd_frames_problem(f: BinaryIO) -> str | None:
    """Why the zstd file `f` ends before its last frame does, or None when every frame is whole.

    python-zstandard's stream reader returns end-of-file quietly when the input stops at a block boundary,
    so a truncated file would lose its tail without a word. The frame format (RFC 8878) lets us walk the
    frame and block headers without decompressing: a few bytes read per 128 KiB block.
    """
    f.seek(0, os.SEEK_END)
    size = f.tell()
    pos = 0
    frame = 0
    while pos < size:
        f.seek(pos)
        magic = f.read(4)
        if len(magic) < 4:
            return f"frame {frame} starts at byte {pos} but the file ends after {size} bytes"
        number = int.from_bytes(magic, "little")
        if 0x184D2A50 <= number <= 0x184D2A5F:  # skippable frame: 4-byte length, then that many bytes
            length = f.read(4)
            if len(length) < 4:
                return f"skippable frame at byte {pos} is cut short"
            pos += 8 + int.from_bytes(length, "little")
        elif magic == _ZSTD_MAGIC:
            descriptor = f.read(1)
            if not descriptor:
                return f"frame {frame} at byte {pos} is cut short in its header"
            fhd = descriptor[0]
            single_segment = (fhd >> 5) & 1
            fcs_flag = fhd >> 6
            fcs_size = (1 if single_segment else 0) if fcs_flag == 0 else (2, 4, 8)[fcs_flag - 1]
            header = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[fhd & 3] + fcs_size
            checksum = 4 if (fhd >> 2) & 1 else 0
            pos += header
            while True:
                f.seek(pos)
                block = f.read(3)
                if len(block) < 3:
                    return f"frame {frame} is cut short: the file ends after {size} bytes, inside it (truncated file)"
                bits = int.from_bytes(block, "little")
                last, kind, block_size = bits & 1, (bits >> 1) & 3, bits >> 3
                if kind == 3:
                    return f"frame {frame} has a corrupt block header at byte {pos}"
                pos += 3 + (1 if kind == 1 else block_size)
                if last:
                    break
            pos += checksum
        else:
            return f"bytes at offset {pos} are not a zstd frame (corrupt or concatenated with other data)"
        if pos > size:
            return f"frame {frame} needs {pos} bytes but the file has {size} (truncated file)"
        frame += 1
    return None


def _open_stream(path: str) -> tuple[BinaryIO, BinaryIO]:
    """(decompressed stream, underlying file); the file's position drives the progress bar.

    A zstd file is checked for whole frames first: its decompressor would otherwise end early in silence.
    gzip raises by itself when its stream ends early.
    """
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller through the returned pair
    magic = raw.read(4)
    raw.seek(0)
    if magic[:2] == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if magic == _ZSTD_MAGIC:
        problem = zstd_frames_problem(raw)
        if problem is not None:
            raw.close()
            raise DataError(f"cannot decompress: {problem}", reason="unreadable")
        raw.seek(0)
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True), raw
    return raw, raw


def _chunks(source: InputSource, progress: Progress | None) -> Iterator[bytes]:
    try:
        stream, raw = _open_stream(source.path or "")
    except DataError as exc:
        raise DataError(exc.message, source=source.name, reason=exc.reason) from None
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


def plain_offset(source: InputSource) -> int | None:
    """Where the stream `open_file` reads starts in the file on disk (3 after a UTF-8 byte order mark),
    or None when the file is compressed (then stream offsets are not file offsets)."""
    if source.kind != FILE or not source.path:
        return None
    with open(source.path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == _GZIP_MAGIC or magic == _ZSTD_MAGIC:
        return None
    return len(_BOM) if magic.startswith(_BOM) else 0


def _read_file(source: InputSource, progress: Progress | None) -> Iterator[RecordBatch]:
    opened = open_file(source, progress)
    if opened is None:
        return iter(())
    form, head, first, chunks = opened
    if form == ARRAY:
        return array_batches(source.name, head, first, chunks)
    return jsonl_batches(source.name, head, chunks)


def open_file(source: InputSource, progress: Progress | None = None) -> tuple[str, bytes, int, Iterator[bytes]] | None:
    """Open now and peek at the first byte: "[" is a JSON array, anything else JSON Lines.

    Returns `(ARRAY or JSONL, head, offset of the first non-space byte, the remaining chunks)`, or None
    for an empty file (logged). A UTF-8 byte order mark is dropped.
    """
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
        return None
    if head[first : first + 1] == b"[":
        return ARRAY, head, first, chunks
    return JSONL, head, first, chunks


# ---------------------------------------------------------------- Hugging Face datasets


def _read_dataset(source: InputSource) -> Iterator[RecordBatch]:
    ds = _open_dataset(source)
    index = 0
    for columns in ds.iter(batch_size=1024):
        names = list(columns)
        if not names:
            continue
        rows = [dict(zip(names, values, strict=True)) for values in zip(*(columns[n] for n in names), strict=True)]
        yield RecordBatch(rows, first_index=index)
        index += len(rows)


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
