"""Convert instruction data (Alpaca, src/tgt, ShareGPT, messages, ...) to canonical conversation records.

Two entry points:
- `iter_conversations` streams canonical records from any supported inputs; `dataprep pack` reads its
  inputs through it, so every reader, validation rule and on-error policy is shared.
- `convert_files` writes them (messages JSONL or MindFormers JSON) atomically, with optional shuffle and
  a rejects file.

Memory stays flat in the input size (see `sources`), except with `shuffle`, which must see every record
before emitting one: it spills serialized records to a temporary file and keeps 16 bytes per record
(see `shuffle`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from tqdm import tqdm

from dataprep import conversation as cv
from dataprep import input_formats as fmts
from dataprep import output_styles
from dataprep.atomic_write import atomic_output, check_writable
from dataprep.errors import DataError
from dataprep.shuffle import shuffled
from dataprep.sources import BadRecord, InputSource, RecordBatch, expand_inputs, read_batches

log = logging.getLogger(__name__)

ON_ERROR = ("fail", "skip")
# Below this much input a progress bar is noise.
PROGRESS_MIN_BYTES = 32 << 20


@dataclass
class ConvertOptions:
    """What to read and how. `progress=None` shows a bar only on a terminal and for large inputs."""

    input_format: str = "auto"
    system: str | None = None
    on_error: str = "fail"
    take: int | None = None
    shuffle: bool = False
    seed: int = 0
    output_style: str = output_styles.MESSAGES
    overwrite: bool = False
    rejects: str | None = None
    progress: bool | None = None

    def __post_init__(self) -> None:
        self.input_format = fmts.canonical_format_name(self.input_format)
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {self.on_error!r}")
        if self.take is not None and self.take < 1:
            raise ValueError(f"take must be at least 1, got {self.take}")
        output_styles.get_style(self.output_style)


@dataclass
class ConvertStats:
    """Counts for the end-of-run summary; every record read is either output or skipped under a reason.

    One self-instruct task with k instances is one record in and up to k records out.
    """

    files: int = 0
    records_in: int = 0
    records_out: int = 0
    skipped: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    bytes_in: int = 0
    take_reached: bool = False
    seconds: float = 0.0

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, Any]:
        rate = self.records_in / self.seconds if self.seconds > 0 else 0.0
        return {
            "inputs": self.files,
            "input_formats": dict(self.formats),
            "records_in": self.records_in,
            "records_out": self.records_out,
            "skipped_total": self.skipped_total,
            "skipped": dict(self.skipped),
            "stopped_at_take": self.take_reached,
            "input_mb": round(self.bytes_in / 1e6, 3),
            "seconds": round(self.seconds, 3),
            "records_per_second": round(rate, 1),
        }


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


def _convert_one(raw: Any, fmt: str, system: str | None, fallback_id: str) -> dict[str, Any]:
    messages = fmts.CONVERTERS[fmt](raw)  # validated by the converter; a system turn first keeps it valid
    if system:
        messages = cv.add_system(messages, system)
    return {"id": fmts.record_id(raw) or fallback_id, "messages": messages}


def _expand_self_instruct(raw: Any, system: str | None, fallback_id: str) -> list[tuple[dict[str, Any], Any]]:
    """(record, source record) pairs for one seed task: one per instance, all converted before any is
    yielded, so a bad instance skips the whole task rather than half of it."""
    items = fmts.expand_self_instruct(raw)
    if len(items) == 1:
        return [(_convert_one(items[0], fmts.ALPACA, system, fallback_id), items[0])]
    return [(_convert_one(item, fmts.ALPACA, system, f"{fallback_id}-{k}"), item) for k, item in enumerate(items)]


def _progress_bar(sources: list[InputSource], options: ConvertOptions) -> tqdm | None:
    total = sum(s.size or 0 for s in sources)
    if options.progress is False or (options.progress is None and total < PROGRESS_MIN_BYTES):
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=None if options.progress is None else False)


Converted = list[tuple[dict[str, Any], Any, str]]


def iter_converted(
    inputs: Sequence[str] | Sequence[InputSource],
    options: ConvertOptions,
    stats: ConvertStats,
    on_reject: OnReject | None = None,
) -> Iterator[Converted]:
    """Yield lists of `(record, source record, format)` in input order (a list per input batch).

    The source record feeds output styles that need more than the canonical record (MindFormers'
    Alpaca prompt needs instruction and input). Lists, not single records: this loop is the hot path
    of convert and pack, and per-record generator hops cost as much as the conversion itself.
    """
    if all(isinstance(s, InputSource) for s in inputs):
        sources: list[InputSource] = list(inputs)  # type: ignore[arg-type]
    else:
        sources = expand_inputs([str(s) for s in inputs])
    bar = _progress_bar(sources, options)
    forced = None if options.input_format == "auto" else options.input_format
    fail = options.on_error == "fail"
    take = options.take
    system = options.system
    self_instruct = fmts.SELF_INSTRUCT

    def progressed(n: int) -> None:
        stats.bytes_in += n
        if bar is not None:
            bar.update(n)

    try:
        for source in sources:
            stats.files += 1
            fmt = forced
            if fmt is not None:
                stats.formats[fmt] += 1
            converter = fmts.CONVERTERS[fmt] if fmt is not None else None
            stem = source.stem
            for batch in read_batches(source, progressed):
                records = batch.records
                lines = batch.lines
                base = batch.first_index
                out: Converted = []
                stats.records_in += len(records)
                for i, raw in enumerate(records):
                    try:
                        if type(raw) is BadRecord:
                            raise raw.error
                        if converter is None:
                            fmt = fmts.detect_format(raw)
                            converter = fmts.CONVERTERS[fmt]
                            stats.formats[fmt] += 1
                            log.info("%s: detected input format %s", source.name, fmt)
                        if fmt == self_instruct:
                            fallback = f"{stem}:{lines[i]}" if base is None else f"{stem}[{base + i}]"  # type: ignore[index]
                            out.extend((rec, src, fmt) for rec, src in _expand_self_instruct(raw, system, fallback))
                        else:
                            messages = converter(raw)
                            if system:
                                messages = cv.add_system(messages, system)
                            rid = raw.get("id")
                            # Without an input id: file name + line (JSONL) or + index (arrays,
                            # datasets), so the same file gives the same ids on every run and machine.
                            if rid is None:
                                rid = f"{stem}:{lines[i]}" if base is None else f"{stem}[{base + i}]"  # type: ignore[index]
                            elif type(rid) is not str:
                                rid = fmts.record_id(raw)  # an integer id as text, or a wrong-type error
                            out.append(({"id": rid, "messages": messages}, raw, fmt))  # type: ignore[arg-type]
                    except DataError as err:
                        _handle_error(err, source.name, batch, i, raw, fail, stats, on_reject)
                    if take is not None and stats.records_out + len(out) >= take:
                        stats.records_in -= len(records) - i - 1  # the rest of the batch was never looked at
                        del out[take - stats.records_out :]
                        stats.records_out += len(out)
                        stats.take_reached = True
                        yield out
                        return
                stats.records_out += len(out)
                if out:
                    yield out
    finally:
        if bar is not None:
            bar.close()


def _handle_error(
    err: DataError, source: str, batch: RecordBatch, i: int, raw: Any, fail: bool, stats: ConvertStats, on_reject: OnReject | None
) -> None:
    """Apply the on-error policy to one bad record: raise it located, or count it and pass it on."""
    line, record = batch.line(i), batch.index(i)
    if err.source is None:
        err = cv.located(err, source, line, record)
    if fail:
        raise err from None
    stats.skipped[err.reason] += 1
    if on_reject is not None:
        if type(raw) is BadRecord:
            on_reject(Reject(source, line, record, err.reason, str(err), text=raw.text))
        else:
            on_reject(Reject(source, line, record, err.reason, str(err), raw=raw))


def iter_conversations(
    inputs: Sequence[str],
    options: ConvertOptions,
    stats: ConvertStats,
    on_reject: OnReject | None = None,
) -> Iterator[dict[str, Any]]:
    """Canonical conversation records from any supported inputs (the contract `dataprep pack` uses).

    With `options.on_error == "fail"` the first bad record raises DataError naming file and line;
    with "skip" it is counted in `stats.skipped[reason]` and passed to `on_reject`.
    """
    start = time.perf_counter()
    records = (rec for batch in iter_converted(inputs, options, stats, on_reject) for rec, _raw, _fmt in batch)
    try:
        if not options.shuffle:
            yield from records
        else:
            loads = orjson.loads
            for blob in shuffled((orjson.dumps(r) for r in records), options.seed):
                yield loads(blob)
    finally:
        stats.seconds = time.perf_counter() - start


def _rebatch(items: Iterator[bytes], size: int = 4096) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def convert_files(
    inputs: Sequence[str],
    output: str,
    options: ConvertOptions,
    stats: ConvertStats | None = None,
) -> ConvertStats:
    """Convert `inputs` to `output` (and skipped records to `options.rejects`), all or nothing.

    The output and rejects files appear only when the whole run succeeded: a failed or interrupted run
    leaves the previous files (or none), never a partial one that looks complete.
    """
    stats = stats if stats is not None else ConvertStats()
    style = output_styles.get_style(options.output_style)
    sources = expand_inputs(inputs)
    check_writable(output, options.overwrite)
    if options.rejects:
        if os.path.abspath(options.rejects) == os.path.abspath(output):
            raise ValueError("the rejects file must differ from the output file")
        check_writable(options.rejects, options.overwrite)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(atomic_output(output, options.overwrite))
        on_reject = None
        if options.rejects:
            rejects = stack.enter_context(atomic_output(options.rejects, options.overwrite))

            def on_reject(reject: Reject) -> None:
                rejects.write(reject.to_json())

        serialize = style.serialize
        batches = map(serialize, iter_converted(sources, options, stats, on_reject))
        if options.shuffle:
            flat = (item for items in batches for item in items)
            batches = _rebatch(shuffled(flat, options.seed, spill_dir=os.path.dirname(os.path.abspath(output))))
        # Nothing here creates reference cycles, and with millions of short-lived dicts the cyclic
        # collector would spend its time re-scanning the batch in flight; it is back on when we return.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            output_styles.write_batches(out, style, batches)
        finally:
            if gc_was_enabled:
                gc.enable()
    stats.seconds = time.perf_counter() - start
    if stats.records_in and not stats.records_out:
        log.warning("no record was converted: all %d were skipped (%s)", stats.records_in, dict(stats.skipped))
    return stats
