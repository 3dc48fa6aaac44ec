"""Join packed datasets (typically the partitions of one `dataprep pack --partition I/N` job) into one dataset
without copying shard data.

The merged directory gets its own manifest over all the parts' shards, with their checksums unchanged, and
one directory entry per shard named `shard-NNNNN.arrow` like any dataset, so the reader, `verify` and the
remote cache need nothing new. The entry is:
- a hard link (default): no bytes copied, and the merged dataset stays whole when the part directories are
  deleted afterwards (the data lives until its last link goes). Needs parts and output on one filesystem.
- a relative symlink (`link="symlink"`): works across filesystems, but the parts must stay where they are;
  if a part directory is deleted or moved, opening or verifying the merged dataset fails naming the link.

Merging refuses parts that cannot form one dataset: different seq_length, tokenizer, pad id, template,
compression or record-batch size; partitions of different jobs, a repeated or missing partition; and any
document id found in more than one place (ids must stay unique).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from formats.errors import FormatError
from formats.lock import locked
from formats.manifest import (
    ShardInfo,
    build_manifest,
    dataset_fingerprint,
    read_manifest,
    validate_manifest,
    write_manifest,
)
from formats.reader import open_dataset
from formats.schema import shard_file_name
from formats.verify import verify_checksums
from formats.writer import check_target, publish_dir, remove_stale_temp_dirs, temp_dir_for

log = logging.getLogger(__name__)

LINK_MODES = ("hard", "symlink")
# Keys that must agree for rows from different parts to be trained on as one dataset.
_MUST_MATCH = (
    ("seq_length", lambda m: m["seq_length"]),
    ("format version", lambda m: m["format"]["version"]),
    ("tokenizer fingerprint", lambda m: m["tokenizer"]["fingerprint"]),
    ("pad_id", lambda m: m["tokenizer"]["pad_id"]),
    ("template", lambda m: m.get("template")),
    ("compression", lambda m: m["compression"]),
    ("batch_rows", lambda m: m["batch_rows"]),
)
_SAME_PACKING = ("algorithm", "seed", "pack_window", "max_docs_per_row")


def _check_compatible(parts: Sequence[Path], manifests: Sequence[Mapping[str, Any]]) -> None:
    first = manifests[0]
    for name, get in _MUST_MATCH:
        for part, m in zip(parts[1:], manifests[1:], strict=True):
            if get(m) != get(first):
                raise FormatError(
                    f"cannot merge: {name} differs ({parts[0]}: {get(first)!r}, {part}: {get(m)!r}); "
                    "all parts must be packed with the same tokenizer, template and seq_length"
                )


def _check_partitions(parts: Sequence[Path], manifests: Sequence[Mapping[str, Any]], allow_partial: bool) -> None:
    infos = [m.get("partition") for m in manifests]
    if not any(infos):
        return
    if not all(infos):
        plain = [str(p) for p, i in zip(parts, infos, strict=True) if not i]
        raise FormatError(f"cannot merge partitions with whole datasets ({', '.join(plain)} is not a partition)")
    first = infos[0]
    for part, info in zip(parts, infos, strict=True):
        for key in ("job", "count", "by"):
            if info[key] != first[key]:
                raise FormatError(
                    f"cannot merge: {part} is a partition of a different job ({key} {info[key]!r} vs "
                    f"{first[key]!r} in {parts[0]}); all parts must come from one `pack --partition` job "
                    "(same inputs, tokenizer and options)"
                )
    if first["by"] == "record":
        # Every by-record partition hashed all inputs: a file rewritten between two partitions' runs shows here.
        def contents(m: Mapping[str, Any]) -> list:
            return [(i.get("name"), i.get("xxh3")) for i in m.get("provenance", {}).get("inputs", [])]

        for part, m in zip(parts[1:], manifests[1:], strict=True):
            if contents(m) != contents(manifests[0]):
                raise FormatError(
                    f"cannot merge: {part} and {parts[0]} were packed from different input contents "
                    "(an input changed between the partitions' runs); re-pack the stale partitions"
                )
    seen: dict[int, Path] = {}
    for part, info in zip(parts, infos, strict=True):
        if info["index"] in seen:
            raise FormatError(
                f"cannot merge: partition {info['index']}/{info['count']} given twice ({seen[info['index']]} and {part})"
            )
        seen[info["index"]] = part
    count = first["count"]
    missing = sorted(set(range(count)) - set(seen))
    if missing and not allow_partial:
        raise FormatError(
            f"cannot merge: partition(s) {', '.join(f'{i}/{count}' for i in missing)} missing "
            "(pass allow_partial / --allow-partial to merge a subset on purpose)"
        )


def _doc_ids(part: Path, manifest: Mapping[str, Any]) -> pa.ChunkedArray:
    chunks = []
    for shard in manifest["shards"]:
        reader = pa.ipc.open_file(pa.memory_map(str(part / shard["file"]), "r"))
        for b in range(reader.num_record_batches):
            chunks.append(reader.get_batch(b).column(3).flatten())
    return pa.chunked_array(chunks, type=pa.string())


def _check_unique_ids(parts: Sequence[Path], manifests: Sequence[Mapping[str, Any]]) -> None:
    per_part = [_doc_ids(p, m) for p, m in zip(parts, manifests, strict=True)]
    all_ids = pa.chunked_array([c for ids in per_part for c in ids.chunks], type=pa.string())
    if pc.count_distinct(all_ids).as_py() == len(all_ids):
        return
    counts = pc.value_counts(all_ids)
    dups = counts.filter(pc.greater(counts.field("counts"), 1)).field("values").to_pylist()
    examples = []
    for doc_id in dups[:3]:
        where = [str(p) for p, ids in zip(parts, per_part, strict=True) if pc.any(pc.equal(ids, doc_id)).as_py()]
        examples.append(f"{doc_id!r} (in {', '.join(where)})")
    raise FormatError(
        f"cannot merge: {len(dups)} document id(s) appear more than once, e.g. {'; '.join(examples)}; "
        "ids must be unique (the same record packed twice, or two sources with clashing ids)"
    )


def _sum_counts(dicts: Sequence[Mapping[str, int]]) -> dict[str, int]:
    total: Counter = Counter()
    for d in dicts:
        total.update(d or {})
    return dict(total)


def _merged_packing(manifests: Sequence[Mapping[str, Any]], seq_length: int) -> dict[str, Any]:
    packs = [m.get("packing", {}) for m in manifests]
    stats = [p.get("stats", {}) for p in packs]
    merged: dict[str, Any] = {}
    for key in _SAME_PACKING:
        values = {orjson.dumps(p.get(key)) for p in packs}
        merged[key] = packs[0].get(key) if len(values) == 1 else "mixed"
    rows = sum(m["num_rows"] for m in manifests)
    tokens = sum(m["num_tokens"] for m in manifests)
    docs = sum(m["num_docs"] for m in manifests)
    bound = math.ceil(tokens / seq_length)
    s: dict[str, Any] = {
        "algorithm": merged["algorithm"],
        "rows": rows,
        "lower_bound_rows": bound,
        "rows_over_bound": (rows / bound - 1.0) if bound else 0.0,
        "tokens": tokens,
        "slots": rows * seq_length,
        "efficiency": tokens / (rows * seq_length) if rows else 1.0,
        "docs_per_row_mean": docs / rows if rows else 0.0,
        "docs_per_row_max": max((st.get("docs_per_row_max", 0) for st in stats), default=0),
        "samples_out": docs,
        "dropped": _sum_counts([st.get("dropped", {}) for st in stats]),
        "truncated": _sum_counts([st.get("truncated", {}) for st in stats]),
        "split_records": sum(st.get("split_records", 0) for st in stats),
        "duplicate_ids_renamed": sum(st.get("duplicate_ids_renamed", 0) for st in stats),
        "pack_seconds": round(sum(st.get("pack_seconds", 0.0) for st in stats), 4),
        "read_tokenize_seconds": round(sum(st.get("read_tokenize_seconds") or 0.0 for st in stats), 3),
    }
    parts = [m.get("partition") for m in manifests]
    if all(parts) and parts[0]["by"] == "record":
        # Every by-record partition read the whole input stream: its read/skip counts are the job's, not a share.
        if len({orjson.dumps([st.get("records_in"), st.get("skipped")], option=orjson.OPT_SORT_KEYS) for st in stats}) != 1:
            raise FormatError("cannot merge: the partitions read different input streams (records_in/skipped differ)")
        s["records_in"] = stats[0].get("records_in")
        s["skipped"] = dict(stats[0].get("skipped") or {})
    else:
        s["records_in"] = sum(st.get("records_in") or 0 for st in stats)
        s["skipped"] = _sum_counts([st.get("skipped", {}) for st in stats])
    merged["stats"] = s
    return merged


def _link(src: Path, dst: Path, mode: str) -> None:
    if mode == "symlink":
        # Relative to the output's parent-level location, so moving the common parent keeps links valid.
        os.symlink(os.path.relpath(src, dst.parent), dst)
        return
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise FormatError(
                f"cannot hard-link {src} into {dst.parent} ({exc.strerror}); parts and output must be on one "
                "filesystem for hard links -- use --link symlink (parts must then stay in place)"
            ) from None
        raise


def merge_key(parts: Sequence[Path], manifests: Sequence[Mapping[str, Any]], link: str) -> str:
    blob = orjson.dumps([link, [[str(p), dataset_fingerprint(m)] for p, m in zip(parts, manifests, strict=True)]])
    return xxhash.xxh3_128_hexdigest(blob)


def merge_summary(manifest: Mapping[str, Any], out: Path, seconds: float, reused: bool) -> dict[str, Any]:
    stats = manifest["packing"]["stats"]
    return {
        "output": str(out),
        "reused": reused,
        "parts": len(manifest["merged_from"]),
        "link": manifest["provenance"]["link"],
        "shards": len(manifest["shards"]),
        "rows": manifest["num_rows"],
        "documents": manifest["num_docs"],
        "tokens": manifest["num_tokens"],
        "trainable_tokens": manifest["num_trainable"],
        "records_in": stats.get("records_in"),
        "skipped": stats.get("skipped", {}),
        "dropped": stats.get("dropped", {}),
        "packing_efficiency": round(stats["efficiency"], 5),
        "lower_bound_rows": stats["lower_bound_rows"],
        "seq_length": manifest["seq_length"],
        "seconds": round(seconds, 3),
    }


def merge_datasets(
    parts: Sequence[str | Path],
    out_dir: str | Path,
    *,
    link: str = "hard",
    overwrite: bool = False,
    allow_partial: bool = False,
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Build one dataset at `out_dir` over the shards of `parts`; returns a summary dict.

    Idempotent like `pack`: an existing output merged from the same parts (same content fingerprints, same
    link mode) and passing its checksums is reused; another is refused unless `overwrite`. Raises
    FormatError for incompatible parts, and LockHeldError when another pack or merge writes `out_dir`.
    """
    out = Path(out_dir).absolute()
    with locked(out, command=command, what="dataset"):
        stale = remove_stale_temp_dirs(out, assume_dead=True)
        summary = _merge_locked(parts, out, link, overwrite, allow_partial, command)
    summary["leftovers_removed"] = stale.count
    return summary


def _merge_locked(
    parts: Sequence[str | Path],
    out: Path,
    link: str,
    overwrite: bool,
    allow_partial: bool,
    command: Sequence[str] | None,
) -> dict[str, Any]:
    started = time.perf_counter()
    if link not in LINK_MODES:
        raise ValueError(f"link must be one of {LINK_MODES}, got {link!r}")
    if not parts:
        raise ValueError("need at least one part to merge")
    paths = [Path(p).absolute() for p in parts]
    seen: set[Path] = set()
    for p in paths:
        if p.resolve() in seen:
            raise FormatError(f"cannot merge: {p} is given twice")
        seen.add(p.resolve())
        if p.resolve() == out.resolve():
            raise FormatError(f"cannot merge: the output {out} is also one of the parts")
    manifests = []
    for p in paths:
        open_dataset(p)  # manifest, and every shard present with its recorded size and a valid footer
        manifests.append(read_manifest(p))
    key = merge_key(paths, manifests, link)
    if out.exists() and not overwrite:
        try:
            old = read_manifest(out)
        except FormatError as exc:
            raise FileExistsError(
                f"{out} already exists and is not a complete dataset ({exc}); pass --overwrite to replace it"
            ) from None
        if old.get("provenance", {}).get("merge_key") != key:
            raise FileExistsError(
                f"{out} already exists and was not merged from these parts (or they changed since); "
                "pass --overwrite to replace it"
            )
        problems = verify_checksums(out)
        if problems:
            raise FileExistsError(
                f"{out} was merged from these parts but is damaged ({problems[0]}); pass --overwrite"
            ) from None
        log.info("%s already holds the merge of these parts; reusing it", out)
        return merge_summary(old, out, time.perf_counter() - started, reused=True)
    check_target(out, overwrite)
    _check_compatible(paths, manifests)
    _check_partitions(paths, manifests, allow_partial)
    _check_unique_ids(paths, manifests)
    packing = _merged_packing(manifests, manifests[0]["seq_length"])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(out)
    tmp.mkdir()
    try:
        shards: list[ShardInfo] = []
        origins: list[str] = []
        for p, m in zip(paths, manifests, strict=True):
            for shard in m["shards"]:
                src = (p / shard["file"]).resolve()
                dst = tmp / shard_file_name(len(shards))
                _link(src, dst, link)
                origins.append(os.path.relpath(src, out))
                shards.append(ShardInfo(**{**{k: shard[k] for k in ShardInfo.__dataclass_fields__}, "file": dst.name}))
        first = manifests[0]
        manifest = build_manifest(
            seq_length=first["seq_length"],
            shards=shards,
            tokenizer=first["tokenizer"],
            compression=first["compression"],
            batch_rows=first["batch_rows"],
            template=first.get("template"),
            packing=packing,
            command=command,
            extra={
                "merged_from": [
                    {
                        "path": os.path.relpath(p, out),
                        "fingerprint": dataset_fingerprint(m),
                        "partition": m.get("partition"),
                        "provenance_key": m.get("provenance", {}).get("key"),
                        "shards": len(m["shards"]),
                    }
                    for p, m in zip(paths, manifests, strict=True)
                ],
                "provenance": {"merge_key": key, "link": link},
            },
        )
        for entry, origin in zip(manifest["shards"], origins, strict=True):
            entry["origin"] = origin
        validate_manifest(manifest, "<merged manifest>")
        write_manifest(tmp, manifest)
        publish_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("merged %d parts (%d shards, %d rows) into %s", len(paths), len(shards), manifest["num_rows"], out)
    return merge_summary(manifest, out, time.perf_counter() - started, reused=False)
