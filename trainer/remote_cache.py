"""Mirror a packed dataset from object storage (s3://, gs://, hdfs://, file://...) into a verified local cache.

Training reads shards by random access through memory maps, which object stores cannot serve; so a remote
dataset is copied once to local disk and then read like any other. The copy is trusted only after every
shard's bytes hash to the checksum in the remote manifest, and the manifest is written into the cache last,
so an interrupted or corrupted download never looks like a finished dataset (the same rule as the writer).

URLs go through ``pyarrow.fs.FileSystem.from_uri`` (pyarrow's own S3/GCS/HDFS clients, no extra dependency);
S3-compatible endpoints take query options, e.g.
``s3://bucket/data?endpoint_override=minio.local:9000&scheme=http``, and credentials come from the usual
environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the instance role).

The cache is content-addressed by the dataset fingerprint, so a re-packed dataset at the same URL gets a
fresh directory while several runs (or ranks on one node) share one copy. Concurrent fetches of the same
dataset are safe: each writes its own temp files and renames them into place.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
import xxhash
from tqdm import tqdm

from formats.atomic import atomic_write, remove_stale, write_bytes_atomic
from formats.errors import FormatError
from formats.manifest import dataset_fingerprint, validate_manifest
from formats.schema import MANIFEST_NAME

log = logging.getLogger(__name__)

_CHUNK = 8 << 20
DEFAULT_CACHE = Path(os.environ.get("SFTKIT_CACHE", Path.home() / ".cache" / "sftkit")) / "datasets"


def is_url(path: str | Path) -> bool:
    """True for `scheme://...` locations (fetched into the cache); plain paths are read in place."""
    return isinstance(path, str) and "://" in path


def _open_fs(url: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(url)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise FormatError(f"{url}: cannot open this location ({exc})") from exc


def _read_manifest(fs: pafs.FileSystem, root: str, url: str) -> tuple[bytes, dict]:
    where = f"{url.rstrip('/')}/{MANIFEST_NAME}"
    try:
        with fs.open_input_stream(f"{root}/{MANIFEST_NAME}") as f:
            raw = f.read()
    except (FileNotFoundError, OSError) as exc:
        raise FormatError(f"{where}: no readable manifest, so not a finished dataset ({exc})") from exc
    try:
        manifest = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise FormatError(f"{where}: not valid JSON ({exc})") from exc
    return raw, validate_manifest(manifest, where)


def _download(fs: pafs.FileSystem, src: str, dest: Path, shard: dict, url: str) -> None:
    """Stream one shard to a temp file while hashing it; rename into place only if the checksum matches."""
    h = xxhash.xxh3_128()
    size = 0
    where = f"{url.rstrip('/')}/{shard['file']}"
    remove_stale(dest)  # partial downloads of killed fetches
    try:
        with fs.open_input_stream(src) as fin, atomic_write(dest) as fout:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                fout.write(chunk)
                size += len(chunk)
            # Raising inside the block removes the temp file: only a verified shard is renamed into place.
            if size != shard["bytes"]:
                raise FormatError(f"{where}: downloaded {size} bytes, manifest says {shard['bytes']}")
            if h.hexdigest() != shard["checksum"]:
                raise FormatError(
                    f"{where}: checksum {h.hexdigest()} does not match manifest {shard['checksum']} "
                    "(corrupt or replaced shard)"
                )
    except (OSError, pa.ArrowException) as exc:
        raise FormatError(f"{where}: download failed ({exc})") from exc


def fetch_dataset(url: str, cache_dir: str | Path | None = None) -> Path:
    """Return a local, verified copy of the dataset at `url`, downloading only shards not already cached."""
    fs, root = _open_fs(url)
    raw, manifest = _read_manifest(fs, root, url)
    fingerprint = dataset_fingerprint(manifest)
    local = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE) / fingerprint
    if (local / MANIFEST_NAME).is_file():
        log.info("%s: using cached copy %s", url, local)
        return local
    local.mkdir(parents=True, exist_ok=True)
    shards = manifest["shards"]
    for shard in tqdm(shards, desc=f"fetch {url}", unit="shard", disable=len(shards) < 2, leave=False):
        dest = local / shard["file"]
        if dest.is_file() and dest.stat().st_size == shard["bytes"]:
            continue  # completed by an earlier (interrupted) fetch or a concurrent one: renamed only if verified
        _download(fs, f"{root}/{shard['file']}", dest, shard, url)
    write_bytes_atomic(local / MANIFEST_NAME, raw)
    log.info("%s: fetched %d shards into %s", url, len(shards), local)
    return local
