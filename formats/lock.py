"""An exclusive advisory lock on a directory being written, so two writers never interleave.

`dataprep pack` / `merge` lock the dataset directory they write, the trainer its output directory. The lock
is `fcntl.flock` on a small file holding who has it (pid, host, command, start time), so the second writer
fails at once with a message naming the holder instead of corrupting the first one's output.

Where the file lives: a dataset directory is replaced whole by a rename, so its lock sits next to it
(`.<name>.lock`); a directory that is written in place (a trainer run) may keep it inside (`inside=True`).

Stale locks: the kernel drops a flock when its holder dies, so a dead writer's lock file is simply taken over
(a warning names the previous holder). The one case where a lock outlives its writer is a process that
inherited the descriptor (a forked worker); when the recorded holder's pid is gone on this host, the lock file
is replaced and taken over with a warning. A holder on another host cannot be checked and is never broken.
The file is removed on release; acquiring re-checks that the locked file is still the one at the path, so a
writer that raced with a release never holds a lock on a deleted file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import fcntl
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from formats.atomic import pid_alive
from formats.errors import FormatError

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
INSIDE_LOCK_NAME = ".sftkit.lock"
_STALE_GRACE_S = 0.5


class LockHeldError(FormatError):
    """Another live process holds the lock; the message names it (pid, host, command, since when)."""

    def __init__(self, message: str, holder: LockHolder | None) -> None:
        super().__init__(message)
        self.holder = holder


@dataclasses.dataclass(frozen=True)
class LockHolder:
    pid: int
    host: str
    command: list[str]
    started: str

    def describe(self) -> str:
        cmd = " ".join(self.command)
        if len(cmd) > 160:
            cmd = cmd[:157] + "..."
        return f"pid {self.pid} on {self.host} since {self.started} ({cmd or 'unknown command'})"


def lock_path(directory: str | Path, *, inside: bool = False) -> Path:
    """The lock file of `directory`: `.<name>.lock` beside it, or `.sftkit.lock` inside it."""
    directory = Path(directory).absolute()
    if inside:
        return directory / INSIDE_LOCK_NAME
    return directory.with_name(f".{directory.name}{LOCK_SUFFIX}")


def read_holder(path: str | Path) -> LockHolder | None:
    """Who a lock file says holds it; None when the file is absent, empty or unreadable (mid-write)."""
    try:
        data: Any = orjson.loads(Path(path).read_bytes())
        return LockHolder(
            pid=int(data["pid"]),
            host=str(data["host"]),
            command=[str(c) for c in data.get("command") or []],
            started=str(data.get("started", "?")),
        )
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


@contextlib.contextmanager
def locked(
    directory: str | Path,
    *,
    inside: bool = False,
    command: Sequence[str] | None = None,
    what: str = "directory",
) -> Iterator[LockHolder]:
    """Hold the exclusive lock of `directory` for the block; raise LockHeldError at once if a live process
    holds it. `what` names the directory's role in messages ("dataset", "output directory")."""
    path = lock_path(directory, inside=inside)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = LockHolder(
        pid=os.getpid(),
        host=socket.gethostname(),
        command=list(command if command is not None else sys.argv),
        started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    fd = _acquire(path, me, what, Path(directory))
    try:
        yield me
    finally:
        with contextlib.suppress(OSError):
            if _same_file(fd, path):
                os.unlink(path)  # while still holding it: a waiter that opened it re-checks and retries
        os.close(fd)


def _acquire(path: Path, me: LockHolder, what: str, directory: Path) -> int:
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            got = _try_flock(fd)
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                log.warning("%s: this filesystem does not support file locks (%s); concurrent writers to %s "
                            "will not be detected", path, exc.strerror, directory)
                return fd
            os.close(fd)
            raise
        if got:
            if not _same_file(fd, path):  # released and unlinked between our open and flock: try again
                os.close(fd)
                continue
            previous = read_holder(path)
            if previous is not None and previous.pid != me.pid:
                log.warning("%s: taking over the lock of %s, which ended without releasing it", directory,
                            previous.describe())
            os.ftruncate(fd, 0)
            os.pwrite(fd, orjson.dumps(dataclasses.asdict(me)), 0)
            os.fsync(fd)
            if not _same_file(fd, path):  # broken as stale by another process while we wrote: start over
                os.close(fd)
                continue
            return fd
        holder = read_holder(path)
        os.close(fd)
        if holder is not None and holder.host == me.host and not pid_alive(holder.pid):
            # A new holder writes its own record right after taking the lock; give it that moment before
            # concluding that only a dead writer's descendant holds it.
            time.sleep(_STALE_GRACE_S)
            again = read_holder(path)
            if again is None or again != holder:
                continue
            # A descendant that inherited the descriptor keeps the flock although the writer is dead.
            log.warning("%s: lock held by a process that inherited it from %s, which is gone; breaking it",
                        directory, holder.describe())
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        who = holder.describe() if holder is not None else "another process (holder not recorded yet)"
        raise LockHeldError(
            f"{directory}: {what} is being written by {who}; wait for it to finish or stop it "
            f"(lock file {path})",
            holder,
        )
    raise LockHeldError(f"{directory}: could not take the lock {path} (it keeps changing hands)", None)
