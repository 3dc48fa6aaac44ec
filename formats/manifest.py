"""The dataset manifest (index.json): what a directory of shards is, how it was made, and how to check it.

The manifest is the only thing that makes a directory a dataset. It is written last and atomically, so a
directory whose writer crashed has no manifest and is rejected; every shard it lists carries its size and
checksum, so a truncated, edited or missing shard is caught before training reads garbage.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import xxhash

from formats.atomic import write_bytes_atomic
from formats.errors import FormatError
from formats.schema import (
    CHECKSUM_ALGORITHM,
    COMPRESSIONS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SUPPORTED_VERSIONS,
    schema_description,
)

_HASH_CHUNK = 8 << 20


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest records it. `tokens` counts non-padding tokens, `trainable` labels != -100."""

    file: str
    rows: int
    tokens: int
    docs: int
    trainable: int
    bytes: int
    checksum: str


def hash_file(path: str | Path) -> str:
    """xxh3_128 of the file's bytes as hex: fast enough (GB/s) to re-hash every shard on verify."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def missing_shard_message(file: Path) -> str:
    """Why a listed shard cannot be opened, naming the part directory when a merged dataset's link dangles."""
    if file.is_symlink():
        target = os.readlink(file)
        return (
            f"{file}: shard listed in the manifest is a link to {target}, which no longer exists "
            "(the part directory of this merged dataset was deleted or moved; re-run `dataprep merge`)"
        )
    return f"{file}: shard listed in the manifest is missing"


def _lists_shard(directory: Path, name: str, cache: dict[Path, set[str]]) -> bool:
    """Whether `directory` is a dataset whose manifest lists a shard called `name`."""
    if directory not in cache:
        try:
            cache[directory] = {s["file"] for s in read_manifest(directory)["shards"]}
        except FormatError:
            cache[directory] = set()
    return name in cache[directory]


def shard_file_problem(
    directory: str | Path, shard: Mapping[str, Any], cache: dict[Path, set[str]] | None = None
) -> str | None:
    """Why the shard file a manifest entry names must not be read, or None when it may.

    A shard must be a regular file in the dataset directory. A symbolic link leading outside it is followed
    only when `dataprep merge --link symlink` made it: the entry records it as its `origin` and the target is
    a shard listed by the manifest of the directory it lies in. Anything else (a link to an arbitrary file,
    a device such as /dev/zero) is refused, so crafted links cannot make training read or merge hard-link
    files that belong to no dataset.
    """
    directory = Path(directory)
    file = directory / shard["file"]
    if file.is_symlink():
        try:
            target = file.resolve(strict=True)
        except (FileNotFoundError, RuntimeError, OSError):
            return missing_shard_message(file)
        if not target.is_relative_to(directory.resolve()):
            origin = shard.get("origin")
            made_by_merge = (
                isinstance(origin, str)
                and (directory / origin).resolve() == target
                and _lists_shard(target.parent, target.name, cache if cache is not None else {})
            )
            if not made_by_merge:
                return (
                    f"{file}: shard is a symbolic link to {target}, outside the dataset directory and not a "
                    "shard merged from a part; refusing to read it (copy the file in, or re-run `dataprep merge`)"
                )
    if not file.exists():
        return missing_shard_message(file)
    if not file.is_file():
        return f"{file}: shard listed in the manifest is not a regular file"
    return None


def build_manifest(
    *,
    seq_length: int,
    shards: Sequence[ShardInfo],
    tokenizer: Mapping[str, Any],
    compression: str,
    batch_rows: int,
    template: str | None = None,
    packing: Mapping[str, Any] | None = None,
    command: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the manifest dict. `tokenizer` must hold at least `fingerprint` and `pad_id`."""
    manifest: dict[str, Any] = {
        "format": {"name": FORMAT_NAME, "version": FORMAT_VERSION},
        "schema": schema_description(seq_length),
        "seq_length": int(seq_length),
        "num_rows": sum(s.rows for s in shards),
        "num_docs": sum(s.docs for s in shards),
        "num_tokens": sum(s.tokens for s in shards),
        "num_trainable": sum(s.trainable for s in shards),
        "compression": compression,
        "batch_rows": int(batch_rows),
        "checksum_algorithm": CHECKSUM_ALGORITHM,
        "tokenizer": dict(tokenizer),
        "template": template,
        "packing": dict(packing or {}),
        "shards": [dataclasses.asdict(s) for s in shards],
        "command": list(command) if command is not None else None,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        manifest.update(extra)
    validate_manifest(manifest, "<new manifest>")
    return manifest


def _require(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise FormatError(f"{where}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """Reject manifests this code cannot read correctly; the message names the file and the offending key."""
    _require(isinstance(manifest, dict), where, "manifest is not a JSON object")
    fmt = manifest.get("format")
    _require(isinstance(fmt, dict), where, "missing 'format' {name, version}")
    _require(
        fmt.get("name") == FORMAT_NAME, where, f"format name is {fmt.get('name')!r}, expected {FORMAT_NAME!r}"
    )
    version = fmt.get("version")
    _require(
        version in SUPPORTED_VERSIONS,
        where,
        f"format version {version!r} is not supported (this sftkit reads versions {list(SUPPORTED_VERSIONS)}); "
        "upgrade sftkit or re-pack the data",
    )
    seq_length = manifest.get("seq_length")
    _require(_is_int(seq_length) and seq_length > 0, where, f"bad seq_length {seq_length!r}")
    _require(
        manifest.get("schema") == schema_description(seq_length),
        where,
        "schema does not match the row schema of this format version",
    )
    _require(
        manifest.get("compression") in COMPRESSIONS,
        where,
        f"unknown compression {manifest.get('compression')!r}",
    )
    _require(
        manifest.get("checksum_algorithm") == CHECKSUM_ALGORITHM,
        where,
        f"unknown checksum algorithm {manifest.get('checksum_algorithm')!r}",
    )
    batch_rows = manifest.get("batch_rows")
    _require(_is_int(batch_rows) and batch_rows > 0, where, f"bad batch_rows {batch_rows!r}")
    tok = manifest.get("tokenizer")
    _require(isinstance(tok, dict), where, "missing 'tokenizer' object")
    _require(isinstance(tok.get("fingerprint"), str), where, "tokenizer.fingerprint missing")
    _require(_is_int(tok.get("pad_id")), where, "tokenizer.pad_id missing or not an integer")
    shards = manifest.get("shards")
    _require(isinstance(shards, list), where, "missing 'shards' list")
    names: set[str] = set()
    fields = {f.name for f in dataclasses.fields(ShardInfo)}
    for i, shard in enumerate(shards):
        _require(
            isinstance(shard, dict) and fields <= set(shard),
            where,
            f"shards[{i}] lacks one of {sorted(fields)}",
        )
        name = shard["file"]
        _require(
            isinstance(name, str)
            and name
            and "/" not in name
            and "\\" not in name
            and not name.startswith("."),
            where,
            f"shards[{i}].file {name!r} must be a plain file name inside the dataset directory",
        )
        _require(name not in names, where, f"shard {name} is listed twice")
        names.add(name)
        for key in ("rows", "tokens", "docs", "trainable", "bytes"):
            _require(_is_int(shard[key]) and shard[key] >= 0, where, f"shards[{i}].{key} is not a count")
        _require(isinstance(shard["checksum"], str), where, f"shards[{i}].checksum is not a string")
    for total, key in (
        ("num_rows", "rows"),
        ("num_docs", "docs"),
        ("num_tokens", "tokens"),
        ("num_trainable", "trainable"),
    ):
        _require(
            manifest.get(total) == sum(s[key] for s in shards),
            where,
            f"{total}={manifest.get(total)!r} disagrees with the sum over shards",
        )
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_NAME
    if not Path(directory).is_dir():
        raise FormatError(f"{directory}: not a dataset directory (does not exist or is not a directory)")
    if not path.is_file():
        raise FormatError(
            f"{path}: manifest missing; this is not a finished dataset (an interrupted write leaves no manifest)"
        )
    try:
        manifest = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise FormatError(f"{path}: manifest is not valid JSON ({exc})") from exc
    return validate_manifest(manifest, str(path))


def write_manifest(directory: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Write index.json via temp file + fsync + rename so a reader never sees half a manifest."""
    data = orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    return write_bytes_atomic(Path(directory) / MANIFEST_NAME, data)


def dataset_fingerprint(manifest: Mapping[str, Any]) -> str:
    """A stable id for the dataset's content: any change to any shard's bytes or the row geometry changes it.

    Built from the shard checksums (not the manifest bytes) so re-writing the manifest with a new creation
    time or command line does not make a resumed run think its data changed.
    """
    h = xxhash.xxh3_128()
    h.update(
        f"{manifest['format']['name']}/{manifest['format']['version']}/{manifest['seq_length']}".encode()
    )
    for shard in manifest["shards"]:
        h.update(f"|{shard['file']}:{shard['rows']}:{shard['checksum']}".encode())
    return h.hexdigest()
