"""Convert instruction data (Alpaca, src/tgt, ShareGPT, messages, ...) to canonical conversation records.

Two entry points:
- `iter_conversations` streams canonical records from any supported inputs; `dataprep pack` reads its
  inputs through it, so every reader, validation rule and on-error policy is shared.
- `convert_files` writes them (messages JSONL or MindFormers JSON) atomically, with optional shuffle and
  a rejects file.

Memory stays flat in the input size (see `sources`), except with `shuffle`, which must see every record
before emitting one: it spills serialized records to a temporary file and keeps 16 bytes per record
(see `shuffle`).

`ConvertOptions.num_proc > 1` runs parsing, conversion and serialization in worker processes
(`convert_parallel`); the output is byte for byte the one-process output. `take` and `shuffle` runs
stay in one process (a take limit would need the workers to agree on where to stop; shuffling is
bound by the spill file, not by conversion).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson
from tqdm import tqdm

from dataprep import convert_parallel, output_styles
from dataprep.atomic_write import atomic_output, check_writable
from dataprep.convert_batch import NO_LIMIT, Converted, SourceState, convert_batch
from dataprep.convert_options import ConvertOptions, ConvertStats
from dataprep.rejects import OnReject, Reject, handle_bad_record
from dataprep.shuffle import shuffled
from dataprep.sources import BadRecord, InputSource, expand_inputs, read_batches

log = logging.getLogger(__name__)

__all__ = ["ConvertOptions", "ConvertStats", "Reject", "convert_files", "iter_conversations", "iter_converted"]
# Below this much input a progress bar is noise.
PROGRESS_MIN_BYTES = 32 << 20


def _progress_bar(sources: list[InputSource], options: ConvertOptions) -> tqdm | None:
    total = sum(s.size or 0 for s in sources)
    if options.progress is False or (options.progress is None and total < PROGRESS_MIN_BYTES):
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=None if options.progress is None else False)


class _Bar:
    """Input bytes read: counted in the stats, and shown when a progress bar is wanted."""

    def __init__(self, sources: list[InputSource], options: ConvertOptions, stats: ConvertStats) -> None:
        self.stats = stats
        self.bar = _progress_bar(sources, options)

    def update(self, n: int) -> None:
        self.stats.bytes_in += n
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def iter_converted(
    inputs: Sequence[str] | Sequence[InputSource],
    options: ConvertOptions,
    stats: ConvertStats,
    on_reject: OnReject | None = None,
    keep_sources: bool = False,
) -> Iterator[Converted]:
    """Yield converted batches in input order (`Converted`: records, and with `keep_sources` the
    source record of each, which output styles like MindFormers' need).

    Batches, not single records: this loop is the hot path of convert and pack, and per-record
    generator hops cost as much as the conversion itself.
    """
    if all(isinstance(s, InputSource) for s in inputs):
        sources: list[InputSource] = list(inputs)  # type: ignore[arg-type]
    else:
        sources = expand_inputs([str(s) for s in inputs])
    bar = _Bar(sources, options, stats)
    progressed = bar.update
    forced = None if options.input_format == "auto" else options.input_format
    fail = options.on_error == "fail"
    take = options.take
    system = options.system
    try:
        for source in sources:
            stats.files += 1
            if forced is not None:
                stats.formats[forced] += 1
            state = SourceState(source.name, source.stem, forced)
            for batch in read_batches(source, progressed):
                limit = NO_LIMIT if take is None else take - stats.records_out
                conv = convert_batch(state, batch.records, batch.lines, batch.first_index, system, fail, limit,
                                     keep_sources=keep_sources, on_unknown_field=options.on_unknown_field)
                if conv.unknown_fields:
                    stats.unknown_fields.update(conv.unknown_fields)
                if conv.detected:
                    stats.formats[conv.fmt] += 1
                stats.records_in += conv.used
                for i, err, raw in conv.errors:
                    bad = type(raw) is BadRecord
                    handle_bad_record(err, source.name, batch.line(i), batch.index(i), fail, stats.skipped, on_reject,
                                      raw=None if bad else raw, text=raw.text if bad else None)
                stats.records_out += len(conv.records)
                if conv.records:
                    yield conv
                if take is not None and stats.records_out >= take:
                    stats.take_reached = True
                    return
    finally:
        bar.close()


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
    records = (rec for conv in iter_converted(inputs, options, stats, on_reject) for rec in conv.records)
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


STDOUT = "-"  # `-o -`: write the records to standard output


def _spill_dir(output: str) -> str:
    """Temporary files (shuffle spill, worker output) go beside the output, or in the working directory."""
    return os.path.dirname(os.path.abspath("." if output == STDOUT else output))


def convert_files(
    inputs: Sequence[str],
    output: str,
    options: ConvertOptions,
    stats: ConvertStats | None = None,
) -> ConvertStats:
    """Convert `inputs` to `output` (and skipped records to `options.rejects`), all or nothing.

    The output and rejects files appear only when the whole run succeeded: a failed or interrupted run
    leaves the previous files (or none), never a partial one that looks complete. `output` "-" streams to
    standard output instead (a pipe cannot be published atomically: a failed run is then said by the exit code).
    """
    stats = stats if stats is not None else ConvertStats()
    style = output_styles.get_style(options.output_style)
    sources = expand_inputs(inputs)
    to_stdout = output == STDOUT
    if not to_stdout:
        check_writable(output, options.overwrite)
    if options.rejects:
        if os.path.abspath(options.rejects) == os.path.abspath(output):
            raise ValueError("the rejects file must differ from the output file")
        check_writable(options.rejects, options.overwrite)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        out = sys.stdout.buffer if to_stdout else stack.enter_context(atomic_output(output, options.overwrite))
        on_reject = None
        if options.rejects:
            rejects = stack.enter_context(atomic_output(options.rejects, options.overwrite))

            def on_reject(reject: Reject) -> None:
                rejects.write(reject.to_json())

        blobs: Iterable[bytes]
        if options.num_proc != 1 and not options.take and not options.shuffle:
            bar = stack.enter_context(contextlib.closing(_Bar(sources, options, stats)))
            spill_dir = _spill_dir(output)
            blobs = convert_parallel.converted_blobs(sources, options, stats, style, on_reject, bar.update, spill_dir)
        else:
            if options.num_proc != 1:
                log.info("--take and --shuffle run in one process; ignoring --num-proc %d", options.num_proc)
            batches = iter_converted(sources, options, stats, on_reject, keep_sources=style.needs_sources)
            blobs = (output_styles.serialize(style, c.records, c.sources, c.fmt) for c in batches)
        if options.shuffle:
            items = (item for blob in blobs for item in output_styles.split_items(style, blob))
            spilled = shuffled(items, options.seed, spill_dir=_spill_dir(output))
            blobs = (output_styles.join_items(style, batch) for batch in _rebatch(spilled))
        # Nothing here creates reference cycles, and with millions of short-lived dicts the cyclic
        # collector would spend its time re-scanning the batch in flight; it is back on when we return.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            output_styles.write_blobs(out, style, blobs)
        finally:
            if gc_was_enabled:
                gc.enable()
    stats.seconds = time.perf_counter() - start
    if stats.records_in and not stats.records_out:
        log.warning("no record was converted: all %d were skipped (%s)", stats.records_in, dict(stats.skipped))
    return stats
