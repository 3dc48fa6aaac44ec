"""`convert --num-proc N`: parse, convert, validate and serialize in worker processes, write in input order.

The main process reads raw bytes and cuts them without parsing: JSON Lines at the last newline of each
1 MiB chunk, JSON arrays at the last `}` followed by `,` (`ArrayScanner.cut`). Workers turn a cut into
output bytes plus counts and the bad records they skipped (`convert_chunk`). The main process takes
results strictly in submission order, so the output is byte for byte the one-process output, and
`--on-error fail` reports the first bad record in input order (a later chunk's error never wins). At
most `2 * N + 2` chunks are in flight, so memory stays flat.

Two things the workers cannot know are handled in the main process:
- where a JSON-array chunk starts in the array (its record index: the previous chunks may still be
  parsing). In pretty-printed arrays the main process counts the elements of each cut by the text
  between them, "}," + newline + the top-level indentation + "{" (never inside a string; inside a
  nested value only in oddly indented files, and the worker checks the count), so ids come out
  final. A file whose count was wrong once, and compact arrays, get ids derived from the index written
  with a random token in place of the number, and the main process puts the number in
  (`_fill_indexes`);
- whether an array cut was really between elements (a `},` may sit inside a string) and its count
  right. A chunk that does not parse as a list of objects of that count is re-read in the main
  process with the one-process scanner (`rewind`, then `batch`/`one_by_one`), which also gives the
  exact error if the text is bad.

Uncompressed files are not shipped to workers: a job names the file, offset and size, and the worker
reads them (from the page cache); output comes back through files in a temporary folder next to the
output. Both because a megabyte through a multiprocessing pipe costs the main process several times
what a file read costs, and the main process is the part that does not scale with N.

Before a file's format is known (auto detection from its first good record) its records are
converted in the main process one at a time, so the detection rule is the one-process rule. Hugging
Face datasets are converted in the main process (their rows are already Python objects; shipping
them to workers costs what converting them does).

Workers are started with "spawn", not "fork": convert runs inside pipelines (Airflow tasks, `pack`,
scripts that imported torch) whose threads and locks a forked child would inherit mid-use; a spawned
worker only imports this package (about 0.1 s once per run).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dataprep import output_styles
from dataprep.convert_batch import Converted, SourceState, convert_batch
from dataprep.convert_options import ConvertOptions, ConvertStats
from dataprep.errors import DataError
from dataprep.json_stream import (
    ArrayScanner,
    BadRecord,
    RecordBatch,
    jsonl_cuts,
    parse_array_chunk,
    parse_jsonl,
)
from dataprep.rejects import OnReject, handle_bad_record
from dataprep.sources import ARRAY, FILE, InputSource, open_file, plain_offset, read_batches

log = logging.getLogger("dataprep.convert")

JOB_JSONL = "jsonl"
JOB_ARRAY = "array"


@dataclass
class ChunkJob:
    """One unit of worker work: `text` is whole JSON Lines starting at `first_line`, or array
    elements (without brackets). For arrays, `base` is the index of the first element and `count`
    the number of elements when the main process could tell (else ids get the token), and lines in
    problems are relative (1 = the chunk's first line)."""

    kind: str
    name: str
    stem: str
    fmt: str
    text: bytes
    first_line: int = 1
    base: int | None = None
    count: int | None = None
    # Uncompressed files: the worker reads `size` bytes at `offset` itself (through the page cache),
    # which costs the main process far less than pickling the text into a pipe.
    path: str | None = None
    offset: int = 0
    size: int = 0
    count_lines: bool = True  # arrays: report the newlines in `text` (not needed when `path` is set)


@dataclass
class Problem:
    """A bad record found by a worker, in plain data (a DataError does not survive pickling)."""

    index: int  # in the chunk
    line: int | None
    reason: str
    message: str
    raw: Any = None
    text: str | None = None


@dataclass
class ChunkResult:
    """`ok` False: an array chunk that was not cut at element boundaries, had another element count
    than expected (`why` "count"), or whose index token also occurs in the data; nothing else is
    set and the main process re-reads it."""

    ok: bool
    why: str = ""
    blob: bytes = b""
    spill: str | None = None  # the blob is in this file instead (see WorkerConfig.spill_dir)
    records_in: int = 0
    records_out: int = 0
    problems: list[Problem] = field(default_factory=list)
    placeholders: list[int] = field(default_factory=list)
    newlines: int | None = None  # array chunks: newlines in the text, when asked (ChunkJob.count_lines)
    relative_lines: bool = False
    unknown_fields: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerConfig:
    """`spill_dir`: workers hand their output back in files there, because reading a megabyte through
    a multiprocessing pipe costs the main process about three times as much as reading a file."""

    system: str | None
    fail: bool
    style: str
    token: str
    spill_dir: str | None = None
    on_unknown_field: str = "keep"


_config: WorkerConfig | None = None


def _init_worker(config: WorkerConfig) -> None:
    global _config
    _config = config
    # As in the main process (convert_files): nothing here makes reference cycles, and with thousands
    # of short-lived dicts per chunk the cyclic collector would double the worker's time.
    gc.disable()


def convert_chunk(job: ChunkJob, config: WorkerConfig | None = None) -> ChunkResult:
    """Parse, convert, validate and serialize one chunk (in a worker, or inline with `config`)."""
    config = config or _config
    assert config is not None
    style = output_styles.get_style(config.style)
    state = SourceState(job.name, job.stem, job.fmt)
    token = base = None
    if job.path is not None:
        with open(job.path, "rb") as f:
            f.seek(job.offset)
            job.text = f.read(job.size)
    if job.kind == JOB_JSONL:
        batch = parse_jsonl(job.name, job.text, job.first_line)
    else:
        parsed = parse_array_chunk(job.text, 1)
        if parsed is None:
            return ChunkResult(ok=False, why="cut")
        if job.count is not None and len(parsed.records) != job.count:
            return ChunkResult(ok=False, why="count")
        batch = parsed
        base = job.base if job.base is not None else 0
        token = None if job.base is not None else config.token
    conv = convert_batch(state, batch.records, batch.lines, base, config.system, config.fail, token=token,
                         keep_sources=style.needs_sources, on_unknown_field=config.on_unknown_field)  # type: ignore[arg-type]
    blob = output_styles.serialize(style, conv.records, conv.sources, conv.fmt)
    if token is not None and blob.count(token.encode()) != len(conv.placeholders):
        return ChunkResult(ok=False, why="token")  # the data itself contains the token
    problems = [_problem(batch, i, err, raw) for i, err, raw in conv.errors]
    spill = None
    if config.spill_dir is not None and blob:
        fd, spill = tempfile.mkstemp(dir=config.spill_dir, suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        blob = b""
    array = job.kind == JOB_ARRAY
    newlines = job.text.count(b"\n") if array and job.count_lines else None
    return ChunkResult(True, "", blob, spill, conv.used, len(conv.records), problems, conv.placeholders, newlines, array,
                       dict(conv.unknown_fields))


def _problem(batch: RecordBatch, i: int, err: DataError, raw: Any) -> Problem:
    line = err.line if err.line is not None else batch.line(i)
    if type(raw) is BadRecord:
        return Problem(i, line, err.reason, err.message, text=raw.text)
    return Problem(i, line, err.reason, err.message, raw=raw)


# ---------------------------------------------------------------- the main process


@dataclass
class _Entry:
    """A submitted chunk, in output order: a pending worker result, or one converted inline."""

    source: _SourceRun
    get: Callable[[], ChunkResult]
    elements: bytes | None = None  # array cuts: the text handed out and the separator after it
    sep: bytes = b""
    line_after: int | None = None  # array records read here: the scanner's line and offset after them
    offset_after: int = 0
    offset: int = 0  # array cuts: where `elements` starts in the stream


@dataclass
class _SourceRun:
    source: InputSource
    state: SourceState
    indexed: bool = False  # JSON array or dataset: records are located by index
    scanner: ArrayScanner | None = None
    next_index: int = 0  # index of the next record whose result is taken
    next_line: int | None = 1  # arrays: line where that record starts (None: count it when needed, see _line)
    next_offset: int = 0  # arrays: where that record starts in the stream
    line_mark: tuple[int, int] = (0, 1)  # arrays: a known (stream offset, line) at or before next_offset
    dispatch_index: int | None = None  # arrays: index of the next element cut, while counts are known
    counts_trusted: bool = True
    file_offset: int | None = None  # uncompressed file: where the stream starts in it (see ChunkJob.path)


class _Run:
    """The state of one parallel conversion; `blobs()` yields output blobs in input order."""

    def __init__(self, sources: list[InputSource], options: ConvertOptions, stats: ConvertStats,
                 style: output_styles.OutputStyle, on_reject: OnReject | None, progress: Callable[[int], None],
                 spill_dir: str) -> None:
        self.sources = sources
        self.options = options
        self.stats = stats
        self.style = style
        self.on_reject = on_reject
        self.progress = progress
        self.fail = options.on_error == "fail"
        self.spill_parent = spill_dir
        self.config = WorkerConfig(options.system, self.fail, style.name, _new_token(),
                                   on_unknown_field=options.on_unknown_field)
        self.forced = None if options.input_format == "auto" else options.input_format
        self.queue: deque[_Entry] = deque()
        self.max_in_flight = 2 * options.num_proc + 2
        self.pool: Any = None
        self.failed = False  # a bad record was raised (a later reading error must not replace it)

    # ---- driving

    def blobs(self) -> Iterator[bytes]:
        spill = tempfile.mkdtemp(prefix=".convert-parts-", dir=self.spill_parent)
        self.config = dataclasses.replace(self.config, spill_dir=spill)
        self.pool = _start_pool(self.options.num_proc, self.config)
        try:
            for source in self.sources:
                yield from self._source(source)
            while self.queue:
                yield from self._take()
        finally:
            # On an error, queued chunks are dropped and running ones finish (a chunk takes
            # milliseconds); a worker that died (killed for memory, say) surfaces as BrokenProcessPool
            # from `result()` instead of a wait that never ends.
            self.pool.shutdown(wait=True, cancel_futures=True)
            shutil.rmtree(spill, ignore_errors=True)

    def _source(self, source: InputSource) -> Iterator[bytes]:
        self.stats.files += 1
        run = _SourceRun(source, SourceState(source.name, source.stem, self.forced))
        if self.forced is not None:
            self.stats.formats[self.forced] += 1
        try:
            if source.kind != FILE:
                run.indexed = True
                for batch in read_batches(source, self.progress):
                    result = self._inline(run, batch, batch.first_index)
                    self.queue.append(_Entry(run, lambda r=result: r))
                    yield from self._bound()
                return
            opened = open_file(source, self.progress)
            if opened is None:
                return
            form, head, first, chunks = opened
            run.file_offset = plain_offset(source)
            if form == ARRAY:
                yield from self._array(run, ArrayScanner(source.name, head, first, chunks))
            else:
                yield from self._jsonl(run, head, chunks)
        except DataError:
            # A reading error comes after every bad record before it: report those first.
            while self.queue and not self.failed:
                yield from self._take()
            raise

    def _jsonl(self, run: _SourceRun, head: bytes, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for text, line, offset in jsonl_cuts(head, chunks):
            while run.state.fmt is None and text:
                # Until the format is known, one line at a time here (the first good record decides).
                cut = text.find(b"\n") + 1 or len(text)
                job = ChunkJob(JOB_JSONL, run.source.name, run.source.stem, "", text[:cut], line)
                result = self._inline_job(run, job)
                self.queue.append(_Entry(run, lambda r=result: r))
                text, line, offset = text[cut:], line + 1, offset + cut
            if text:
                job = ChunkJob(JOB_JSONL, run.source.name, run.source.stem, run.state.fmt or "", text, line)
                self._submit(run, self._by_offset(run, job, offset))
            yield from self._bound()

    def _array(self, run: _SourceRun, scanner: ArrayScanner) -> Iterator[bytes]:
        run.scanner = scanner
        run.indexed = True
        run.next_line, run.next_offset = scanner.line, scanner.offset  # where the first element starts
        while run.state.fmt is None and not scanner.done:
            # Until the format is known, one element at a time here (the first good record decides).
            scanner.slow_until = 0
            batch = scanner.one_by_one()
            result = self._inline(run, batch, batch.first_index)
            self.queue.append(_Entry(run, lambda r=result: r, line_after=scanner.line, offset_after=scanner.offset))
        run.dispatch_index = scanner.index
        while not scanner.done:
            piece = scanner.cut()
            if piece is None:
                yield from self._careful_step(run)
                continue
            elements, sep, count, offset = piece
            if not run.counts_trusted or run.dispatch_index is None:
                count = None
            base = run.dispatch_index if count is not None else None
            run.dispatch_index = None if base is None else base + count  # type: ignore[operator]
            job = ChunkJob(JOB_ARRAY, run.source.name, run.source.stem, run.state.fmt or "", elements, 1, base, count)
            pending = self.pool.submit(convert_chunk, self._by_offset(run, job, offset))
            self.queue.append(_Entry(run, pending.result, elements, sep, offset=offset))
            yield from self._bound()

    def _careful_step(self, run: _SourceRun) -> Iterator[bytes]:
        """One step of the one-process array reader, from where the cuts stopped (needs the index)."""
        while self.queue:
            yield from self._take()
        scanner = run.scanner
        assert scanner is not None
        scanner.index, scanner.line = run.next_index, self._line(run)
        yield from self._careful(run, scanner)

    def _careful(self, run: _SourceRun, scanner: ArrayScanner) -> Iterator[bytes]:
        batch = scanner.batch() if scanner.offset >= scanner.slow_until else None
        if batch is None:
            batch = scanner.one_by_one()
        yield from self._emit(run, self._inline(run, batch, batch.first_index), line_after=scanner.line, offset_after=scanner.offset)
        run.dispatch_index = scanner.index

    def _by_offset(self, run: _SourceRun, job: ChunkJob, offset: int) -> ChunkJob:
        """The job with its text left for the worker to read from the file, when the file allows."""
        if run.file_offset is None:
            return job
        return dataclasses.replace(job, text=b"", path=run.source.path, offset=run.file_offset + offset, size=len(job.text),
                                   count_lines=False)

    def _submit(self, run: _SourceRun, job: ChunkJob) -> None:
        pending = self.pool.submit(convert_chunk, job)
        self.queue.append(_Entry(run, pending.result))

    def _bound(self) -> Iterator[bytes]:
        while len(self.queue) > self.max_in_flight:
            yield from self._take()

    # ---- results, in order

    def _take(self) -> Iterator[bytes]:
        entry = self.queue.popleft()
        result = entry.get()
        try:
            if result.ok:
                yield from self._emit(entry.source, result, entry.line_after, entry.offset_after, entry)
            else:
                if result.why == "count":
                    entry.source.counts_trusted = False
                yield from self._recover(entry)
        except DataError:
            self.failed = True  # the first error in input order: nothing after it may replace it
            raise

    def _emit(self, run: _SourceRun, result: ChunkResult, line_after: int | None = None, offset_after: int = 0,
              entry: _Entry | None = None) -> Iterator[bytes]:
        base = run.next_index if run.indexed else None
        stats = self.stats
        stats.records_in += result.records_in
        if result.unknown_fields:
            stats.unknown_fields.update(result.unknown_fields)
        for problem in result.problems:
            if result.relative_lines and problem.line is not None:
                problem.line += self._line(run) - 1
            self._problem(run, problem, base)
        stats.records_out += result.records_out
        blob = result.blob
        if result.spill is not None:
            with open(result.spill, "rb") as f:
                blob = f.read()
            os.unlink(result.spill)
        if result.placeholders:
            blob = _fill_indexes(blob, self.config.token, [base + i for i in result.placeholders])  # type: ignore[operator]
        if run.indexed:
            run.next_index += result.records_in
        if result.relative_lines:
            assert entry is not None and entry.elements is not None
            if result.newlines is not None and run.next_line is not None:
                run.next_line += result.newlines + entry.sep.count(b"\n")
            elif run.next_line is not None:
                run.line_mark, run.next_line = (run.next_offset, run.next_line), None
            run.next_offset = entry.offset + len(entry.elements) + len(entry.sep)
        elif line_after is not None:
            run.next_line, run.next_offset = line_after, offset_after
        if blob:
            yield blob

    def _problem(self, run: _SourceRun, problem: Problem, base: int | None) -> None:
        record = None if base is None else base + problem.index
        err = DataError(problem.message, reason=problem.reason)
        handle_bad_record(err, run.source.name, problem.line, record, self.fail, self.stats.skipped, self.on_reject,
                          raw=problem.raw, text=problem.text)

    def _recover(self, entry: _Entry) -> Iterator[bytes]:
        """An array chunk did not parse: re-read it and every later chunk of that file here, carefully."""
        run = entry.source
        spans = [entry.elements, entry.sep]
        while self.queue and self.queue[0].source is run:
            later = self.queue.popleft()
            spans += [later.elements, later.sep]
        scanner = run.scanner
        assert scanner is not None and all(s is not None for s in spans)
        text = b"".join(spans)  # type: ignore[arg-type]
        line = self._line(run)
        log.debug("%s: re-reading %d bytes from line %d in the main process", run.source.name, len(text), line)
        end = scanner.rewind(text, line, run.next_index)
        while not scanner.done and scanner.offset < end:
            yield from self._careful(run, scanner)

    def _line(self, run: _SourceRun) -> int:
        """The line where the next array record starts. Workers reading a file by offset do not count
        newlines (a tenth of their time); lines only matter for error messages and re-reads, so they
        are counted here from the file when one is needed."""
        if run.next_line is None:
            offset, line = run.line_mark
            assert run.file_offset is not None and run.source.path is not None
            with open(run.source.path, "rb") as f:
                f.seek(run.file_offset + offset)
                left = run.next_offset - offset
                while left > 0:
                    piece = f.read(min(left, 1 << 20))
                    if not piece:
                        break
                    line += piece.count(b"\n")
                    left -= len(piece)
            run.next_line = line
        return run.next_line

    # ---- inline conversion (main process)

    def _inline(self, run: _SourceRun, batch: RecordBatch, base: int | None) -> ChunkResult:
        conv = convert_batch(run.state, batch.records, batch.lines, base, self.options.system, self.fail,
                             keep_sources=self.style.needs_sources, on_unknown_field=self.options.on_unknown_field)
        self._note_detection(conv)
        blob = output_styles.serialize(self.style, conv.records, conv.sources, conv.fmt)
        problems = [_problem(batch, i, err, raw) for i, err, raw in conv.errors]
        return ChunkResult(True, "", blob, None, conv.used, len(conv.records), problems,
                           unknown_fields=dict(conv.unknown_fields))

    def _inline_job(self, run: _SourceRun, job: ChunkJob) -> ChunkResult:
        batch = parse_jsonl(job.name, job.text, job.first_line)
        return self._inline(run, batch, None)

    def _note_detection(self, conv: Converted) -> None:
        if conv.detected:
            self.stats.formats[conv.fmt] += 1


def _new_token() -> str:
    """A marker no input is likely to contain (and if one does, the chunk is redone in the main process)."""
    return f"@@sftkit-index-{os.urandom(12).hex()}@@"


def _start_pool(processes: int, config: WorkerConfig) -> Executor:
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(processes, mp_context=context, initializer=_init_worker, initargs=(config,))


def _fill_indexes(blob: bytes, token: str, indexes: list[int]) -> bytes:
    """Put each record's array index where the worker wrote the token (one per placeholder, in order)."""
    parts = blob.split(token.encode())
    out: list[bytes] = [b""] * (2 * len(parts) - 1)
    out[0::2] = parts
    out[1::2] = [b"%d" % k for k in indexes]
    return b"".join(out)


def converted_blobs(
    sources: list[InputSource],
    options: ConvertOptions,
    stats: ConvertStats,
    style: output_styles.OutputStyle,
    on_reject: OnReject | None,
    progress: Callable[[int], None],
    spill_dir: str,
) -> Iterator[bytes]:
    """Output blobs for `sources` in input order, converted by `options.num_proc` worker processes;
    updates `stats` and calls `on_reject` like the one-process path (`convert.iter_converted`).
    Workers' output passes through a temporary folder in `spill_dir` (removed at the end)."""
    return _Run(sources, options, stats, style, on_reject, progress, spill_dir).blobs()

