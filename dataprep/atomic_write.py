"""Write a file so that readers see either the old file, nothing, or the complete new file.

A pipeline that is killed mid-write must not leave a half-written JSONL that the next step happily
trains on. The idiom itself lives in `formats.atomic` (one home for every writer); this module keeps the
names dataprep's writers use and the CLI's wording of the "already exists" check.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from formats.atomic import atomic_write, remove_stale


def check_writable(path: str, overwrite: bool) -> None:
    """Fail before any work is done if `path` exists and may not be replaced."""
    if os.path.isdir(path):
        raise FileExistsError(f"{path} is a directory; give a file name for the output")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_output(path: str, overwrite: bool = False) -> Iterator[BinaryIO]:
    """Yield a binary file; on clean exit it becomes `path`, on any exception it is removed.

    Temp files that earlier, killed writers of `path` left behind are removed first (and logged).
    """
    check_writable(path, overwrite)
    remove_stale(Path(path).absolute())
    with atomic_write(path, overwrite=True) as out:
        yield out
