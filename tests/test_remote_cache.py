"""Remote datasets: fetched into a verified local cache through pyarrow.fs (file:// here, S3 via moto's server).

The S3 tests talk to a real S3-compatible HTTP server on 127.0.0.1 (moto's server mode), not a mock of the
client. moto is a test-only tool run in its own interpreter: `moto_server` on PATH (pip install
"moto[server]"), or moto importable by this interpreter. Without it those tests skip, saying so.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from formats.errors import FormatError
from formats.reader import open_dataset
from tests.test_dataset_loader import run_loader, write_dataset
from trainer.dataset import PackedIterableDataset
from trainer.remote_cache import fetch_dataset


def _flip_byte_same_size(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture()
def local_ds(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "remote" / "ds", 23, tag=0)


def test_file_url_is_fetched_verified_and_reads_like_the_original(local_ds: Path, tmp_path: Path) -> None:
    got = fetch_dataset(local_ds.as_uri(), tmp_path / "cache")
    assert got.parent == tmp_path / "cache"
    a, b = open_dataset(local_ds), open_dataset(got, verify=True)
    assert a.fingerprint == b.fingerprint and len(a) == len(b)
    assert np.array_equal(a.take(range(len(a)))[0], b.take(range(len(b)))[0])
    # a second fetch is served from the cache even when the source has gone
    shutil.rmtree(local_ds.parent)
    assert fetch_dataset_again(got, tmp_path) == got


def fetch_dataset_again(got: Path, tmp_path: Path) -> Path:
    """The cache is keyed by content, so it is found from a manifest alone: re-publish just the manifest."""
    only_manifest = tmp_path / "manifest-only"
    only_manifest.mkdir()
    shutil.copy(got / "index.json", only_manifest / "index.json")
    return fetch_dataset(only_manifest.as_uri(), tmp_path / "cache")


def test_corrupt_remote_shard_is_refused_and_nothing_is_published(local_ds: Path, tmp_path: Path) -> None:
    _flip_byte_same_size(local_ds / "shard-00001.arrow")
    with pytest.raises(FormatError, match=r"shard-00001\.arrow: checksum .* does not match manifest"):
        fetch_dataset(local_ds.as_uri(), tmp_path / "cache")
    (cached,) = (tmp_path / "cache").iterdir()
    assert not (cached / "index.json").exists(), "a failed fetch must not look like a finished dataset"
    assert not (cached / "shard-00001.arrow").exists()
    assert not list(cached.glob("*.tmp-*"))


def test_missing_manifest_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="no readable manifest"):
        fetch_dataset((tmp_path / "empty").as_uri(), tmp_path / "cache")


# ------------------------------------------------------------------------------------------- S3 (moto)


def _moto_command() -> list[str] | None:
    if importlib.util.find_spec("moto") is not None and importlib.util.find_spec("flask") is not None:
        return [sys.executable, "-m", "moto.server"]
    exe = shutil.which("moto_server")
    return [exe] if exe else None


@pytest.fixture(scope="module")
def s3_endpoint():
    cmd = _moto_command()
    if cmd is None:
        pytest.skip('moto server not available (pip install "moto[server]" to run the S3 tests)')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_EC2_METADATA_DISABLED="true"
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"moto server did not start ({' '.join(cmd)})")
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _s3(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        endpoint_override=endpoint,
        scheme="http",
        allow_bucket_creation=True,
    )


def _upload(endpoint: str, local: Path, bucket: str, prefix: str) -> str:
    s3 = _s3(endpoint)
    s3.create_dir(bucket)
    pafs.copy_files(
        str(local), f"{bucket}/{prefix}", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3
    )
    return f"s3://{bucket}/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def test_s3_dataset_streams_through_the_loader_from_the_cache(
    s3_endpoint: str, local_ds: Path, tmp_path: Path
) -> None:
    url = _upload(s3_endpoint, local_ds, "train-data", "runs/ds")
    ds = PackedIterableDataset(
        [url],
        global_batch_size=4,
        micro_batch_size=2,
        remainder="pad",
        rank=0,
        world_size=1,
        cache_dir=tmp_path / "cache",
        seed=1,
    )
    assert Path(ds.infos[0].path).is_relative_to(tmp_path / "cache")
    assert ds.infos[0].fingerprint == open_dataset(local_ds).fingerprint
    seen = run_loader(ds, num_workers=2)
    assert Counter(r for *_, r, pad in seen if not pad) == Counter(range(23))


def test_s3_corrupt_shard_is_refused(s3_endpoint: str, local_ds: Path, tmp_path: Path) -> None:
    _flip_byte_same_size(local_ds / "shard-00002.arrow")
    url = _upload(s3_endpoint, local_ds, "bad-data", "ds")
    with pytest.raises(FormatError, match=r"shard-00002\.arrow: checksum .* does not match manifest"):
        fetch_dataset(url, tmp_path / "cache")
