"""`pack_dataset`: conversation records -> tokenized, masked, packed and verified-on-read shards.

Stages: read (dataprep.convert) -> tokenize with masks (dataprep.tokenize) -> spill to disk -> pack lengths
(dataprep.packing) -> gather rows and write shards (formats.writer). Tokenized samples are spilled to flat int32
files next to the output instead of being kept as Python objects, so memory holds only per-sample integer
arrays (lengths, offsets and the packing itself: under ~100 bytes per sample at peak), never the tokens; rows
are then gathered from the memory-mapped spill.

Reruns are idempotent: the manifest records a provenance key (content hashes of the inputs, the tokenizer
fingerprint and every option that changes the output, see dataprep.provenance). An existing complete output
with the same key is reused (summary says `reused: true`); one with a different key is refused unless
`overwrite`. `partition` packs a deterministic 1/N of the records (dataprep.partition) into its own
dataset; `formats.merge` joins the parts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numba import njit
from tqdm import tqdm

from dataprep.errors import DataError
from dataprep.packing import ALGORITHMS, pack_lengths, packing_stats
from dataprep.partition import Partition, PartitionCounter, select_records, select_sources
from dataprep.provenance import build_provenance, describe_difference, describe_inputs
from formats.atomic import pid_alive, remove_stale, temp_name, with_filename
from formats.errors import FormatError
from formats.lock import locked
from formats.schema import (
    DEFAULT_BATCH_ROWS,
    DEFAULT_SHARD_ROWS,
    IGNORE_INDEX,
    MAX_SEQ_LENGTH,
    bounded_batch_rows,
)
from formats.writer import DatasetWriter, check_target, remove_stale_temp_dirs

log = logging.getLogger(__name__)

_WRITE_CHUNK_ROWS = 1024
_WRITE_CHUNK_BYTES = 128 << 20  # per gather buffer; write_packed keeps two
DUPLICATE_SUFFIX = "#dup"


@dataclasses.dataclass
class PackOptions:
    """Everything `dataprep pack` can be told. Tokenization and reading options are passed through to
    dataprep.tokenize / dataprep.convert; `max_length` for tokenization is always seq_length."""

    seq_length: int
    algorithm: str = "bfd"
    pack_window: int | None = None
    max_docs_per_row: int | None = None
    seed: int = 0
    shard_rows: int = DEFAULT_SHARD_ROWS
    batch_rows: int = DEFAULT_BATCH_ROWS
    compression: str = "none"
    overwrite: bool = False
    template: str = "auto"
    overlong: str = "drop"
    mask_history: bool = False
    train_on_prompt: bool = False
    multi_turn: str = "whole"
    content_specials: str = "text"
    input_format: str = "auto"
    system: str | None = None
    on_error: str = "fail"
    num_proc: int = 1
    progress: bool = False
    command: Sequence[str] | None = None
    partition: Partition | None = None

    def __post_init__(self) -> None:
        if not 2 <= self.seq_length <= MAX_SEQ_LENGTH:
            raise ValueError(
                f"seq_length must be between 2 and {MAX_SEQ_LENGTH}, got {self.seq_length} "
                "(every row stores seq_length tokens and labels, 8 bytes each, however short its documents)"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")

    def content_args(self) -> dict[str, Any]:
        """The options that change the bytes written (not num_proc, progress, overwrite or the command line)."""
        skip = {"num_proc", "progress", "overwrite", "command", "partition"}
        args = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        p = self.partition
        args["partition"] = None if p is None else {"index": p.index, "count": p.count, "by": p.by}
        return args


class _Spill:
    """Append-only flat files of token ids, labels and ids, with the lengths kept in a growing array."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._ids = open(directory / "input_ids.i32", "wb")
        self._labels = open(directory / "labels.i32", "wb")
        self._names = open(directory / "ids.utf8", "wb")
        self.lengths = np.empty(1 << 16, dtype=np.int64)
        self.name_ends = np.empty(1 << 16, dtype=np.int64)
        self.n = 0
        self._name_pos = 0
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_names: list[bytes] = []
        self._pending_tokens = 0

    def add(self, sample_id: str, input_ids: np.ndarray, labels: np.ndarray) -> None:
        if self.n == len(self.lengths):
            self.lengths = np.resize(self.lengths, 2 * self.n)
            self.name_ends = np.resize(self.name_ends, 2 * self.n)
        name = sample_id.encode()
        self._pending_names.append(name)
        self._name_pos += len(name)
        self.lengths[self.n] = len(input_ids)
        self.name_ends[self.n] = self._name_pos
        self.n += 1
        self._pending.append((input_ids, labels))
        self._pending_tokens += len(input_ids)
        if self._pending_tokens >= 1 << 20:
            self._drain()

    def _drain(self) -> None:
        if self._pending:
            self._ids.write(np.concatenate([p[0] for p in self._pending]).astype(np.int32, copy=False).data)
            self._labels.write(np.concatenate([p[1] for p in self._pending]).astype(np.int32, copy=False).data)
        self._names.write(b"".join(self._pending_names))
        self._pending = []
        self._pending_names = []
        self._pending_tokens = 0

    def close(self) -> None:
        self._drain()
        for f in (self._ids, self._labels, self._names):
            f.close()
        self.lengths = self.lengths[: self.n]
        self.name_ends = self.name_ends[: self.n]

    def open_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        def mm(name: str, dtype: type) -> np.ndarray:
            path = self.directory / name
            if path.stat().st_size == 0:
                return np.zeros(0, dtype=dtype)
            return np.memmap(path, dtype=dtype, mode="r")

        return mm("input_ids.i32", np.int32), mm("labels.i32", np.int32), mm("ids.utf8", np.uint8)


@njit(cache=True, nogil=True)  # nogil: it runs beside the writer thread (write_packed)
def _gather_rows(
    tokens, labels, starts, lengths, items, bin_offsets, b0, b1, seq_length, pad_id, out_ids, out_labels
):
    """Fill rows b0..b1 by concatenating their documents from the spill; the tail is padding (labels -100)."""
    for b in range(b0, b1):
        r = b - b0
        pos = 0
        for k in range(bin_offsets[b], bin_offsets[b + 1]):
            d = items[k]
            s = starts[d]
            n = lengths[d]
            out_ids[r, pos : pos + n] = tokens[s : s + n]
            out_labels[r, pos : pos + n] = labels[s : s + n]
            pos += n
        out_ids[r, pos:seq_length] = pad_id
        out_labels[r, pos:seq_length] = IGNORE_INDEX


def _tokenizer_info(tok: Any, path: str | Path) -> dict[str, Any]:
    return {
        "name": tok.name,
        "fingerprint": tok.fingerprint,
        "path": str(Path(path).absolute()),
        "kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "special_ids": dict(tok.special_ids),
    }


def spill_samples(samples: Iterable[Any], directory: Path, seq_length: int, progress: bool = False) -> _Spill:
    """Write TokenizedSample-like objects (id, input_ids, labels) to flat files in `directory`."""
    spill = _Spill(directory)
    try:
        for sample in tqdm(samples, desc="tokenize", unit=" samples", disable=not progress):
            n = len(sample.input_ids)
            if n > seq_length or n == 0 or len(sample.labels) != n:
                raise DataError(
                    f"sample has {n} tokens and {len(sample.labels)} labels; needs 1..{seq_length} of each "
                    "(the tokenizer's overlong policy should have handled it)",
                    source=str(sample.id),
                )
            spill.add(sample.id, sample.input_ids, sample.labels)
    finally:
        spill.close()
    return spill


def unique_doc_ids(spill: _Spill) -> dict[int, str]:
    """New ids for samples whose id an earlier sample already has, so every document id in the dataset is
    unique (verify and merge require it): {sample index: id}. Empty in the usual case.

    Repeated ids come from inputs given twice, records that repeat an explicit `id`, or a split piece
    `x#0` meeting a record whose own id is `x#0`. The k-th repeat (k >= 1) of `x` becomes `x#dupk` (more
    suffixes if that is taken too); the count is reported in the packing stats and logged. Runs on the
    memory-mapped spilled ids with Arrow's hash kernels, a few bytes per sample.
    """
    n = spill.n
    if n < 2:
        return {}
    names = spill.open_arrays()[2]
    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = spill.name_ends
    ids = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(names)))
    if pc.count_distinct(ids).as_py() == n:
        return {}
    codes = pc.dictionary_encode(ids).indices.to_numpy()
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    first = np.ones(n, dtype=bool)
    first[1:] = sorted_codes[1:] != sorted_codes[:-1]
    group_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    occurrence = np.empty(n, dtype=np.int64)
    occurrence[order] = np.arange(n) - group_start
    repeats = np.nonzero(occurrence > 0)[0]
    bases = ids.take(pa.array(repeats)).to_pylist()
    wanted = [f"{b}{DUPLICATE_SUFFIX}{occurrence[i]}" for b, i in zip(bases, repeats.tolist(), strict=True)]
    clashes = pc.is_in(pa.array(wanted, pa.large_string()), value_set=ids).to_numpy(zero_copy_only=False)
    taken = set(wanted)  # distinct: "#dup<k>" at the end says which base and k made each
    for j in np.nonzero(clashes)[0]:  # an input id that already looks like x#dupk: rare
        new = wanted[j]
        while new in taken or pc.is_in(pa.array([new], pa.large_string()), value_set=ids)[0].as_py():
            new += DUPLICATE_SUFFIX
        taken.add(new)
        wanted[j] = new
    renames = dict(zip(repeats.tolist(), wanted, strict=True))
    example = next(iter(renames.items()))
    log.warning(
        "%d sample(s) repeat the id of an earlier sample (e.g. %r); renamed with a %s<k> suffix (e.g. %r) so ids "
        "stay unique -- check for inputs given twice or repeated record ids",
        len(renames), ids[example[0]].as_py(), DUPLICATE_SUFFIX, example[1],
    )
    return renames


def write_packed(
    spill: _Spill,
    out_dir: str | Path,
    options: PackOptions,
    pad_id: int,
    *,
    tokenizer_info: dict[str, Any] | None = None,
    template: str | None = None,
    extra_stats: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Pack the spilled samples and write the dataset; returns the manifest. `extra` adds top-level
    manifest keys (provenance, partition)."""
    S = options.seq_length
    lengths = spill.lengths
    t0 = time.perf_counter()
    packing = pack_lengths(
        lengths,
        S,
        options.algorithm,
        window=options.pack_window,
        max_per_bin=options.max_docs_per_row,
        seed=options.seed,
    )
    pack_seconds = time.perf_counter() - t0
    stats = packing_stats(lengths, packing)
    log.info(
        "packed %d samples into %d rows (bound %d) in %.3fs",
        len(lengths),
        stats["rows"],
        stats["lower_bound_rows"],
        pack_seconds,
    )
    tokens, labels, names = spill.open_arrays()
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    name_starts = np.concatenate([[0], spill.name_ends[:-1]]).astype(np.int64)
    names_bytes = names.tobytes() if len(names) < (1 << 28) else None
    items, offsets = packing.items, packing.bin_offsets
    batch_rows = bounded_batch_rows(options.batch_rows, S)
    # Rows in flight are seq_length wide however short their documents: bound the gather buffer in bytes.
    chunk = max(1, min(max(_WRITE_CHUNK_ROWS, batch_rows), _WRITE_CHUNK_BYTES // (8 * S)))
    renames = unique_doc_ids(spill)
    # Two gather buffers: rows b0..b1 are gathered into one while the writer thread writes (and hashes) the last
    # chunk from the other; one write is in flight at a time, in order, so shards come out as before.
    buffers = [(np.empty((chunk, S), dtype=np.int32), np.empty((chunk, S), dtype=np.int32)) for _ in range(2)]
    with DatasetWriter(
        out_dir,
        S,
        pad_id,
        shard_rows=options.shard_rows,
        batch_rows=batch_rows,
        compression=options.compression,
        overwrite=options.overwrite,
    ) as writer, ThreadPoolExecutor(max_workers=1, thread_name_prefix="write") as pool:
        bar = tqdm(total=packing.num_bins, desc="write", unit=" rows", disable=not options.progress)
        writing: Future | None = None
        for k, b0 in enumerate(range(0, packing.num_bins, chunk)):
            b1 = min(b0 + chunk, packing.num_bins)
            out_ids, out_labels = buffers[k % 2]  # the write that used this buffer finished before the last began
            _gather_rows(
                tokens, labels, starts, lengths, items, offsets, b0, b1, S, pad_id, out_ids, out_labels
            )
            docs = items[offsets[b0] : offsets[b1]]
            if names_bytes is not None:
                ids = [names_bytes[name_starts[d] : spill.name_ends[d]].decode() for d in docs]
            else:
                ids = [names[name_starts[d] : spill.name_ends[d]].tobytes().decode() for d in docs]
            if renames:
                ids = [renames.get(int(d), doc_id) for d, doc_id in zip(docs, ids, strict=True)]
            if writing is not None:
                writing.result()
            writing = pool.submit(
                writer.write_rows,
                out_ids[: b1 - b0],
                out_labels[: b1 - b0],
                lengths[docs],
                offsets[b0 : b1 + 1] - offsets[b0],
                ids,
            )
            bar.update(b1 - b0)
        if writing is not None:
            writing.result()
        bar.close()
        stats.update(extra_stats or {})
        stats["samples_out"] = int(len(lengths))
        stats["duplicate_ids_renamed"] = len(renames)
        stats["pack_seconds"] = round(pack_seconds, 4)
        manifest = writer.finish(
            tokenizer=tokenizer_info,
            template=template,
            packing={
                "algorithm": options.algorithm,
                "seed": options.seed,
                "pack_window": options.pack_window,
                "max_docs_per_row": options.max_docs_per_row,
                "stats": stats,
            },
            command=list(options.command) if options.command is not None else None,
            extra=extra,
        )
    del tokens, labels, names
    return manifest


def _remove_dead_spills(out: Path) -> int:
    """Leftovers of killed runs: spill and temp directories (`.<out>.tmp-<token>`, and the older
    `.<out>.spill-<pid>` naming) whose writer is gone. The caller holds the dataset's lock."""
    removed = remove_stale(out.parent / f".{out.name}", assume_dead=True).count
    prefix = f".{out.name}.spill-"
    for entry in out.parent.glob(prefix + "*"):
        pid = entry.name[len(prefix) :]
        if pid.isdigit() and entry.is_dir() and not pid_alive(int(pid)):
            log.warning("removing %s left by an interrupted run", entry)
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


def _reusable(out: Path, provenance: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The existing manifest at `out` if it was made from the same inputs and options and is intact; None if
    there is nothing to reuse (absent, or overwrite). Raises FileExistsError when it may not be replaced."""
    if overwrite or not out.exists():
        return None
    from formats.manifest import read_manifest
    from formats.verify import verify_dataset

    try:
        manifest = read_manifest(out)
    except FormatError as exc:
        raise FileExistsError(
            f"{out} already exists and is not a complete dataset ({exc}); pass --overwrite to replace it"
        ) from None
    old = manifest.get("provenance")
    if not isinstance(old, dict) or old.get("key") != provenance["key"]:
        raise FileExistsError(
            f"{out} already exists and was made from different inputs or options "
            f"({describe_difference(old if isinstance(old, dict) else None, provenance)}); "
            "pass --overwrite to replace it"
        )
    # Reusing is a promise that the output is what this command would write: check every byte and row.
    problems = verify_dataset(out).problems
    if problems:
        shown = "; ".join(problems[:2]) + (f" (and {len(problems) - 2} more)" if len(problems) > 2 else "")
        raise FileExistsError(
            f"{out} was made from the same inputs and options but is damaged ({shown}); "
            "pass --overwrite to rebuild it"
        ) from None
    return manifest


def pack_summary(manifest: dict[str, Any], out: str | Path, seconds: float, reused: bool) -> dict[str, Any]:
    """The end-of-run summary, derived from the manifest so a fresh run and a reused output report alike."""
    stats = manifest["packing"]["stats"]
    summary: dict[str, Any] = {
        "output": str(out),
        "reused": reused,
    }
    part = manifest.get("partition")
    if part:
        summary["partition"] = f"{part['index']}/{part['count']}"
        summary["partition_by"] = part["by"]
        summary["records_selected"] = part["records_selected"]
    summary.update(
        {
            "records_in": stats.get("records_in"),
            "skipped": stats.get("skipped", {}),
            "dropped": stats.get("dropped", {}),
            "truncated": stats.get("truncated", {}),
            "split_records": stats.get("split_records", 0),
            "duplicate_ids_renamed": stats.get("duplicate_ids_renamed", 0),
            "expanded_records": stats.get("expanded_records", 0),
            "special_token_text": stats.get("special_token_text", 0),
            "reasoning_inlined": stats.get("reasoning_inlined", 0),
            "unknown_fields": stats.get("unknown_fields", {}),
            "samples_out": manifest["num_docs"],
            "rows": manifest["num_rows"],
            "lower_bound_rows": stats["lower_bound_rows"],
            "rows_over_bound_pct": round(100 * stats["rows_over_bound"], 3),
            "tokens": manifest["num_tokens"],
            "trainable_tokens": manifest["num_trainable"],
            "packing_efficiency": round(stats["efficiency"], 5),
            "seq_length": manifest["seq_length"],
            "algorithm": manifest["packing"].get("algorithm"),
            "template": manifest.get("template"),
            "shards": len(manifest["shards"]),
            "bytes": sum(s["bytes"] for s in manifest["shards"]),
            "read_tokenize_seconds": stats.get("read_tokenize_seconds"),
            "pack_seconds": stats.get("pack_seconds"),
            "seconds": round(seconds, 3),
        }
    )
    return summary


def pack_dataset(
    inputs: Sequence[str], out_dir: str | Path, tokenizer_path: str | Path, options: PackOptions
) -> dict[str, Any]:
    """Read, tokenize, pack and write `inputs` into the dataset directory `out_dir`. Returns a summary dict.

    Fails (DataError / FileExistsError) before writing anything when the inputs or options are bad; any failure
    later leaves no `out_dir` (or the previous one untouched). An existing output made from the same inputs
    and options is reused (`summary["reused"]`) after a full verification, one made differently (or damaged)
    is refused unless `options.overwrite`. The whole run holds `out_dir`'s lock (formats.lock): a second
    pack or merge into it fails at once naming this one. Leftovers of killed runs are cleaned up first (a
    dataset a killed `--overwrite` had moved aside is put back) and counted in `leftovers_removed`.
    """
    out = Path(out_dir).absolute()
    with locked(out, command=options.command, what="dataset"):
        stale = remove_stale_temp_dirs(out, assume_dead=True)
        summary = _pack_locked(inputs, out, tokenizer_path, options)
    summary["leftovers_removed"] = stale.count + summary.get("leftovers_removed", 0)
    if stale.restored:
        summary["restored_from"] = stale.restored
    return summary


def _pack_locked(
    inputs: Sequence[str], out: Path, tokenizer_path: str | Path, options: PackOptions
) -> dict[str, Any]:
    from dataprep.convert import ConvertOptions, ConvertStats, iter_conversations
    from dataprep.sources import expand_inputs
    from dataprep.templates import get_template
    from dataprep.tokenize import TokenizeOptions, TokenizeStats, tokenize_conversations
    from dataprep.tokenizer import load_tokenizer

    started = time.perf_counter()
    part = options.partition
    where = f" (partition {part} by {part.by})" if part else ""
    sources = [s.name for s in expand_inputs(list(inputs))]
    if part is not None and part.by == "file":
        sources = select_sources(sources, part)
        if not sources:
            raise DataError(
                f"partition {part} gets no input file: there are only {len(expand_inputs(list(inputs)))} "
                "inputs (use --partition-by record, or fewer partitions)",
                source=", ".join(map(str, inputs)),
            )
    tok = load_tokenizer(tokenizer_path)
    provenance = build_provenance(options.content_args(), tok.fingerprint, describe_inputs(sources))
    existing = _reusable(out, provenance, options.overwrite)
    if existing is not None:
        log.info("%s already holds this dataset (same inputs and options); reusing it", out)
        return pack_summary(existing, out, time.perf_counter() - started, reused=True)
    check_target(out, options.overwrite)
    template = get_template(options.template, tok, options.content_specials)  # type: ignore[arg-type]
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
    if pad_id is None:
        log.warning(
            "tokenizer %s has no pad or eos token; padding with id 0 (labels there are -100)", tok.name
        )
        pad_id = 0
    convert_stats = ConvertStats()
    tokenize_stats = TokenizeStats()
    counter = PartitionCounter()
    records = iter_conversations(
        sources,
        ConvertOptions(input_format=options.input_format, system=options.system, on_error=options.on_error),
        convert_stats,
    )
    if part is not None and part.by == "record":
        records = select_records(records, part, counter)
    samples = tokenize_conversations(
        records,
        tok,
        TokenizeOptions(
            template=options.template,
            max_length=options.seq_length,
            overlong=options.overlong,
            mask_history=options.mask_history,
            train_on_prompt=options.train_on_prompt,
            num_proc=options.num_proc,
            multi_turn=options.multi_turn,  # type: ignore[arg-type]
            content_specials=options.content_specials,  # type: ignore[arg-type]
        ),
        tokenize_stats,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    cleaned = _remove_dead_spills(out)
    spill_dir = temp_name(out.parent / f".{out.name}")
    spill_dir.mkdir()
    log.info("packing %d input(s) into %s%s", len(sources), out, where)
    stage = "read/tokenize"
    try:
        t_read = time.perf_counter()
        spill = spill_samples(samples, spill_dir, options.seq_length, options.progress)
        read_seconds = time.perf_counter() - t_read
        if spill.n == 0:
            raise DataError(
                f"no samples left to pack{where} (read {convert_stats.records_in} records; "
                f"skipped {dict(convert_stats.skipped)}; dropped {dict(tokenize_stats.dropped)})",
                source=", ".join(map(str, sources)),
            )
        extra: dict[str, Any] = {"provenance": provenance}
        if part is not None:
            selected = counter.selected if part.by == "record" else convert_stats.records_out
            extra["partition"] = {
                "index": part.index,
                "count": part.count,
                "by": part.by,
                # Identifies the whole partitioned job: same options (but the index) and same input list.
                "job": _partition_job_key(options, tok.fingerprint, inputs),
                "records_selected": selected,
            }
        stage = "pack/write"
        manifest = write_packed(
            spill,
            out,
            options,
            int(pad_id),
            tokenizer_info=_tokenizer_info(tok, tokenizer_path),
            template=template.name,
            extra_stats={
                "records_in": convert_stats.records_in,
                "skipped": dict(convert_stats.skipped),
                "dropped": dict(tokenize_stats.dropped),
                "truncated": dict(tokenize_stats.truncated),
                "split_records": tokenize_stats.split_records,
                "expanded_records": tokenize_stats.expanded_records,
                "special_token_text": tokenize_stats.special_token_text,
                "reasoning_inlined": tokenize_stats.reasoning_inlined,
                "unknown_fields": dict(convert_stats.unknown_fields),
                "read_tokenize_seconds": round(read_seconds, 3),
            },
            extra=extra,
        )
    except OSError as exc:  # disk full, output gone read-only: name where pack was writing
        log.info("pack of %s failed in stage %s%s: %s", out, stage, where, exc)
        raise with_filename(exc, out) from exc
    except Exception as exc:
        log.info("pack of %s failed in stage %s%s: %s", out, stage, where, exc)
        raise
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)
    summary = pack_summary(manifest, out, time.perf_counter() - started, reused=False)
    summary["leftovers_removed"] = cleaned
    return summary


def _partition_job_key(options: PackOptions, tokenizer_fingerprint: str, inputs: Sequence[str]) -> str:
    """Equal for every partition of one job, so `merge` can refuse parts of different jobs. Uses the input
    list with sizes, not content hashes, so a by-file partition need not read the other partitions' files."""
    import orjson
    import xxhash

    from dataprep.sources import expand_inputs

    args = options.content_args()
    assert args["partition"] is not None
    args["partition"] = {k: v for k, v in args["partition"].items() if k != "index"}
    listing = []
    for s in expand_inputs(list(inputs)):
        size = os.path.getsize(s.path) if s.path and os.path.isfile(s.path) else None
        listing.append([str(Path(s.path).absolute()) if s.path else s.name, size])
    blob = orjson.dumps({"args": args, "tokenizer": tokenizer_fingerprint, "inputs": listing}, option=orjson.OPT_SORT_KEYS)
    return xxhash.xxh3_128_hexdigest(blob)
