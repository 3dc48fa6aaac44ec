"""What a dataset was made from, recorded in its manifest, so a rerun can tell "already done" from "different".

Pipelines (Airflow task retries, a re-launched batch job) rerun steps whose output already exists. A rerun
with the same inputs and options must be a cheap no-op; one with different inputs or options must not
silently keep the stale output or silently replace it. Both need a record of how the output was made:
the content hash of every input file (xxh3, GB/s -- far cheaper than tokenizing them again, and unlike
mtimes unaffected by an upstream step rewriting an identical file), the tokenizer's fingerprint, and every
option that changes the bytes written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import xxhash

_CHUNK = 8 << 20


def _hash_file(path: str, h: Any) -> int:
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size


def describe_input(name: str, kind: str, path: str | None) -> dict[str, Any]:
    """One input as the manifest records it: a file or a saved dataset directory is hashed by content;
    a hub dataset (read from the local cache) can only be named."""
    entry: dict[str, Any] = {"name": name, "kind": kind}
    if path is None or not os.path.exists(path):
        return entry
    entry["path"] = str(Path(path).absolute())
    h = xxhash.xxh3_128()
    if os.path.isdir(path):
        total = 0
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for file in sorted(files):
                full = os.path.join(root, file)
                h.update(os.path.relpath(full, path).encode() + b"\0")
                total += _hash_file(full, h)
        entry["bytes"] = total
    else:
        entry["bytes"] = _hash_file(path, h)
    entry["xxh3"] = h.hexdigest()
    return entry


def describe_inputs(inputs: Sequence[str]) -> list[dict[str, Any]]:
    """Expand INPUT arguments as the readers will (globs sorted) and describe each source."""
    from dataprep.sources import expand_inputs

    return [describe_input(s.name, s.kind, s.path) for s in expand_inputs(list(inputs))]


def provenance_key(args: Mapping[str, Any], tokenizer_fingerprint: str, inputs: Sequence[Mapping[str, Any]]) -> str:
    """A stable hash of everything that decides the output's bytes (sorted-key JSON, so dict order is irrelevant)."""
    blob = orjson.dumps(
        {"args": dict(args), "tokenizer": tokenizer_fingerprint, "inputs": [_identity(i) for i in inputs]},
        option=orjson.OPT_SORT_KEYS,
    )
    return xxhash.xxh3_128_hexdigest(blob)


def _identity(entry: Mapping[str, Any]) -> dict[str, Any]:
    # The content hash identifies a file; the absolute path is kept too because derived record ids use the
    # file name. The name as typed is not: `conv.jsonl` and `./conv.jsonl` are the same input.
    if entry.get("path") is None:
        return {"name": entry.get("name")}
    return {k: entry.get(k) for k in ("path", "bytes", "xxh3")}


def build_provenance(
    args: Mapping[str, Any], tokenizer_fingerprint: str, inputs: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    return {
        "key": provenance_key(args, tokenizer_fingerprint, inputs),
        "args": dict(args),
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "inputs": [dict(i) for i in inputs],
    }


def describe_difference(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> str:
    """A short human line saying what changed between two provenance records (for the refusal message)."""
    if not old:
        return "it records no provenance (made by an older sftkit or by hand)"
    changes: list[str] = []
    old_args, new_args = old.get("args", {}), new.get("args", {})
    for key in sorted(set(old_args) | set(new_args)):
        if old_args.get(key) != new_args.get(key):
            changes.append(f"{key} {old_args.get(key)!r} -> {new_args.get(key)!r}")
    if old.get("tokenizer_fingerprint") != new.get("tokenizer_fingerprint"):
        changes.append("tokenizer files differ")
    old_in = {i.get("path") or i.get("name"): i for i in old.get("inputs", [])}
    new_in = {i.get("path") or i.get("name"): i for i in new.get("inputs", [])}
    for name in sorted(set(old_in) | set(new_in)):
        if name not in old_in:
            changes.append(f"new input {name}")
        elif name not in new_in:
            changes.append(f"input {name} no longer given")
        elif _identity(old_in[name]) != _identity(new_in[name]):
            changes.append(f"input {name} changed")
    return "; ".join(changes) if changes else "the recorded key differs"
