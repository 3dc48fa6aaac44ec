"""Write a file so that readers see either the old file, nothing, or the complete new file.

A pipeline that is killed mid-write must not leave a half-written JSONL that the next step happily
trains on; so we write to a temporary file in the same directory and `os.replace` it into place last.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO


def check_writable(path: str, overwrite: bool) -> None:
    """Fail before any work is done if `path` exists and may not be replaced."""
    if os.path.isdir(path):
        raise FileExistsError(f"{path} is a directory; give a file name for the output")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_output(path: str, overwrite: bool = False) -> Iterator[BinaryIO]:
    """Yield a binary file; on clean exit it becomes `path`, on any exception it is removed."""
    check_writable(path, overwrite)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """mkstemp creates 0600 files; give the output the permissions a plain open() would."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
