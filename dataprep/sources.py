"""Open instruction-data inputs and stream their raw records with locations.

Inputs: JSON Lines or one JSON array per file, optionally gzip or zstd compressed (detected from the
magic bytes, not the name); Parquet and Arrow files (magic bytes) and CSV/TSV files (by name, a header
row naming the columns, every cell read as a string); shell globs; a directory of such files (the hub's
`data/train-00000-of-00003.parquet` layout: with split-named files, the `train` split unless one is
named); a Hugging Face `save_to_disk` directory; or `hf:NAME[:SPLIT]` for a hub dataset in the local
Hugging Face cache (resolved with huggingface_hub, offline: `formats.hub`), else one
`datasets.load_dataset` can open offline.

Memory: files are read in 1 MiB chunks and records handed out as soon as they are complete (see
`json_stream`), so neither JSONL nor a JSON array is ever loaded whole. A Hugging Face dataset is
memory-mapped Arrow, read in batches of 1024 rows; Parquet is read one row group at a time, Arrow
files memory-mapped and CSV in 1 MiB blocks, all handed out 1024 rows at a time.

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
PARQUET = "parquet"
ARROW_FILE = "arrow"
CSV = "csv"
TABLE_KINDS = (PARQUET, ARROW_FILE, CSV)
TABLE_BATCH_ROWS = 1024
# Files a data directory (or a cached hub dataset snapshot) contributes, by name.
DATA_SUFFIXES = (".parquet", ".arrow", ".csv", ".tsv", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst",
                 ".json.zst")
_PARQUET_MAGIC = b"PAR1"
_ARROW_FILE_MAGIC = b"ARROW1"
_ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"
SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval")
_SPLIT_FILE = re.compile(r"^(?P<split>" + "|".join(SPLIT_NAMES) + r")([-_.]|$)")
# JSON files in dataset folders that describe the data rather than hold it.
_METADATA_FILES = frozenset({"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json",
                             "config.json", "package.json"})

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
    hint: str | None = None  # HF_HUB: why the hub cache did not have it (said when datasets cannot open it either)

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


def file_kind(path: str) -> str:
    """FILE (JSON / JSON Lines, maybe compressed), PARQUET or ARROW_FILE by magic bytes, CSV by name."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:4] == _PARQUET_MAGIC:
        return PARQUET
    if magic == _ARROW_FILE_MAGIC or magic[:4] == _ARROW_STREAM_MAGIC:
        return ARROW_FILE
    if path.lower().endswith((".csv", ".tsv")):
        return CSV
    return FILE


def _file_source(path: str, name: str | None = None) -> InputSource:
    return InputSource(name=name or path, kind=file_kind(path), path=path)


def data_files(directory: str, split: str | None = None) -> list[str]:
    """The data files of a directory, sorted (the hub layout `data/<split>-00000-of-00003.parquet` included).

    When files are named after splits, `split` picks one (default `train`, or the only one there is); files
    in hidden folders (.cache, .git, .huggingface) are not data."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files)
                  if f.lower().endswith(DATA_SUFFIXES) and f not in _METADATA_FILES]
    if not found:
        raise FileNotFoundError(f"{directory} holds no data files ({', '.join(DATA_SUFFIXES)})")
    parquet = [p for p in found if p.endswith(".parquet")]
    if parquet and len(parquet) < len(found):  # the hub's own layout: the Parquet files are the data
        log.info("%s: reading its %d Parquet files, not the %d other files", directory, len(parquet),
                 len(found) - len(parquet))
        found = parquet

    def split_of(path: str) -> str | None:
        rel = os.path.relpath(path, directory).split(os.sep)
        for part in rel[:-1]:  # data/train/xxx.parquet
            if part in SPLIT_NAMES:
                return part
        m = _SPLIT_FILE.match(rel[-1])
        return m.group("split") if m else None

    splits = {split_of(p) for p in found}
    if split is None:
        if len(splits) <= 1:
            return found
        split = "train" if "train" in splits else None
        if split is None:
            shown = ", ".join(sorted(s or "(none)" for s in splits))
            raise FileNotFoundError(f"{directory} has the splits {shown}; choose one with hf:{directory}:SPLIT")
    chosen = [p for p in found if split_of(p) == split]
    if not chosen:
        raise FileNotFoundError(f"{directory} has no files of split {split!r}")
    if len(chosen) < len(found):
        log.warning("%s: reading split %r (%d files); %d files of other splits are not read", directory, split,
                    len(chosen), len(found) - len(chosen))
    return chosen


def _hub_dataset(item: str, name: str, split: str | None) -> list[InputSource]:
    """`hf:NAME[:SPLIT]` for a hub dataset: its cached snapshot's data files, or (not in the hub cache)
    a source `datasets.load_dataset` opens offline from its own cache."""
    from formats.hub import HubNotCachedError, looks_like_repo_id, resolve

    if not looks_like_repo_id(name):
        return [InputSource(name=item, kind=HF_HUB, path=name, split=split)]
    try:
        snapshot = resolve(name, "dataset")
    except HubNotCachedError as exc:
        return [InputSource(name=item, kind=HF_HUB, path=name, split=split, hint=str(exc))]
    # named by their path in the cache: callers (pack, partitions) expand source names again
    return [_file_source(p) for p in data_files(str(snapshot), split)]


def expand_inputs(inputs: Sequence[str]) -> list[InputSource]:
    """Resolve INPUT arguments to sources, in the order given (glob matches sorted, so runs are reproducible).

    Raises FileNotFoundError naming the input that matched nothing.
    """
    sources: list[InputSource] = []
    for item in inputs:
        if item.startswith("hf:"):
            name, split = _split_spec(item[3:])
            if os.path.isdir(name) and is_saved_dataset(name):
                sources.append(InputSource(name=item, kind=HF_DISK, path=name, split=split))
            elif os.path.isdir(name):
                sources.extend(_file_source(p) for p in data_files(name, split))
            else:
                sources.extend(_hub_dataset(item, name, split))
        elif os.path.isdir(item):
            if is_saved_dataset(item):
                sources.append(InputSource(name=item, kind=HF_DISK, path=item))
            else:
                sources.extend(_file_source(p) for p in data_files(item))
        elif os.path.isfile(item):
            sources.append(_file_source(item))
        elif glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"no input file matches {item!r}")
            sources.extend(_file_source(p) for p in matches)
        else:
            raise FileNotFoundError(f"input not found: {item} (for a Hugging Face hub dataset use hf:NAME)")
    return sources


def read_batches(source: InputSource, progress: Progress | None = None) -> Iterator[RecordBatch]:
    """Stream one source as RecordBatch objects (records plus how to locate each one)."""
    if source.kind == FILE:
        return _read_file(source, progress)
    if source.kind in TABLE_KINDS:
        return _read_table(source, progress)
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


# ---------------------------------------------------------------- Parquet, Arrow, CSV


def _arrow_batches(source: InputSource) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = source.path or source.name
    if source.kind == PARQUET:
        yield from pq.ParquetFile(path).iter_batches(batch_size=TABLE_BATCH_ROWS)
    elif source.kind == ARROW_FILE:
        with pa.memory_map(path) as mm:
            try:
                reader = pa.ipc.open_file(mm)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
            except pa.ArrowInvalid:  # the streaming format (what datasets writes to its cache)
                mm.seek(0)
                yield from pa.ipc.open_stream(mm)
    else:
        import csv

        delimiter = "\t" if path.lower().endswith(".tsv") else ","
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f, delimiter=delimiter), None)
        if not header:
            log.warning("%s is empty", source.name)
            return
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=CHUNK_BYTES),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            # every cell a string: a column of digits stays text (ids, answers), empty cells stay ""
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in header},
                                                 strings_can_be_null=False),
        )
        yield from reader


def _read_table(source: InputSource, progress: Progress | None) -> Iterator[RecordBatch]:
    """Rows of a Parquet / Arrow / CSV file as dicts, 1024 at a time, located by row index."""
    import pyarrow as pa

    index = 0
    what = {PARQUET: "Parquet", ARROW_FILE: "Arrow", CSV: "CSV"}[source.kind]
    try:
        for batch in _arrow_batches(source):
            for offset in range(0, batch.num_rows, TABLE_BATCH_ROWS):
                rows = batch.slice(offset, TABLE_BATCH_ROWS).to_pylist()
                yield RecordBatch(rows, first_index=index)
                index += len(rows)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        where = f" after row {index}" if index else ""
        raise DataError(f"cannot read {what}{where}: {exc}", source=source.name, reason="unreadable") from exc
    if progress is not None and source.path:
        progress(os.path.getsize(source.path))


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
            hint = f"; {source.hint}" if source.hint else ""
            raise DataError(
                f"cannot open Hugging Face dataset offline (is it in the local cache?): {type(exc).__name__}: {exc}{hint}",
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
