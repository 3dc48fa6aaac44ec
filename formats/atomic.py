"""The one home of the filesystem idioms every writer in sftkit relies on (see CONTRACTS.md).

- `atomic_write` / `write_bytes_atomic`: a file appears whole or not at all (temp in the same directory,
  fsync, rename, fsync the directory).
- `publish_dir`: a finished temp directory replaces the published one without ever deleting the last
  complete copy first: the old copy is renamed aside to `<name>.old-<token>` only after the new one is
  complete, the new one is renamed into place, and only then is the old one removed. A crash at any moment
  leaves a complete copy: at `<name>` or, between the two renames, at `<name>.old-<token>`, where
  `remove_stale` (called by every writer before it writes) finds it and renames it back.
- `remove_stale`: leftovers of writers that died (`<name>.tmp-<token>`, `<name>.old-<token>`) are removed, and
  counted, on the next write. A token records the writer's pid and a tag of its host, so a leftover is only
  removed when its writer is provably gone: same host and the pid no longer runs (or the caller holds the
  target's lock, `assume_dead=True`, which proves no other writer exists).

Temp names start from the target's name so leftovers sit next to what they belong to and are recognisable;
`temp_name` builds them, `parse_token` reads them back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Literal

import xxhash

log = logging.getLogger(__name__)

TempKind = Literal["tmp", "old"]
_TOKEN_RE = re.compile(r"\.(tmp|old)-(\d+)(?:-([0-9a-f]{8})-([0-9a-f]+))?$")


def host_tag() -> str:
    """8 hex digits naming this host inside temp names (hostnames may hold dots and dashes)."""
    return xxhash.xxh32_hexdigest(socket.gethostname().encode())


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a pid we may not signal counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def new_token() -> str:
    """`<pid>-<host tag>-<random>`: unique per write, and enough to tell later whether the writer is gone."""
    return f"{os.getpid()}-{host_tag()}-{secrets.token_hex(4)}"


def temp_name(target: str | Path, kind: TempKind = "tmp", token: str | None = None) -> Path:
    """The sibling path a writer of `target` uses: `<target>.tmp-<token>` or `<target>.old-<token>`."""
    target = Path(target)
    return target.with_name(f"{target.name}.{kind}-{token or new_token()}")


@dataclasses.dataclass(frozen=True)
class TempInfo:
    """What a temp name says about its writer. `host` is None for legacy names that carry only a pid."""

    kind: TempKind
    pid: int
    host: str | None

    @property
    def writer_gone(self) -> bool:
        """True only when the writer provably no longer runs: same host (or a legacy name) and a dead pid."""
        if self.host is not None and self.host != host_tag():
            return False
        return not pid_alive(self.pid)


def parse_token(name: str, target_name: str) -> TempInfo | None:
    """The writer of a leftover named `<target_name>.tmp-...`/`.old-...`, or None for any other name."""
    if not name.startswith(target_name + "."):
        return None
    m = _TOKEN_RE.fullmatch(name[len(target_name) :])
    if m is None:
        return None
    return TempInfo(kind=m.group(1), pid=int(m.group(2)), host=m.group(3))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ durability


def fsync_path(path: str | Path) -> None:
    """Flush a file or directory entry to disk: a rename is durable only once its directory is synced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems (and /proc-like ones) cannot fsync a directory: not our data
        if not Path(path).is_dir():
            raise
        log.debug("fsync of directory %s not supported: %s", path, exc)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under `root` (files first), so a renamed tree is durable as a whole."""
    root = Path(root)
    dirs = []
    for here, _, files in os.walk(root):
        for name in files:
            p = Path(here) / name
            if not p.is_symlink():
                fsync_path(p)
        dirs.append(Path(here))
    for d in reversed(dirs):
        fsync_path(d)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def plain_file_mode() -> int:
    """The permissions open() gives a new file under the current umask (mkstemp and safetensors use 0600)."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_write(path: str | Path, *, overwrite: bool = True, buffering: int = 1 << 20) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes `path` on clean exit (fsynced, renamed, directory fsynced).

    On any exception the temp file is removed and `path` is left as it was. The file gets the permissions a
    plain open() would give (mkstemp's are 0600). Without `overwrite` an existing `path` is refused up front.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name for the output")
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    directory = path.absolute().parent
    directory.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path.absolute().parent / f".{path.name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, plain_file_mode())
    try:
        with os.fdopen(fd, "wb", buffering=buffering) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not exc.filename:  # a write to the file object: say which file
            raise with_filename(exc, path) from exc
        raise
    fsync_path(directory)


def with_filename(exc: OSError, path: str | Path) -> OSError:
    """`exc` naming `path` (writes through a file object, and Arrow's writers, raise without a file name)."""
    if exc.filename:
        return exc
    code = exc.errno
    if code is None:
        m = re.search(r"\[errno (\d+)\]", str(exc), re.IGNORECASE)
        code = int(m.group(1)) if m else None
    reason = os.strerror(code) if code is not None else " ".join(str(exc).split())
    return OSError(code, reason, str(path))


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Replace `path` with `data` atomically and durably (see `atomic_write`)."""
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


# ------------------------------------------------------------------------------------------------ directories


def publish_dir(tmp_dir: str | Path, out_dir: str | Path, *, replace: bool = True) -> None:
    """Rename the finished directory `tmp_dir` onto `out_dir`, never deleting the last complete copy first.

    `tmp_dir` must be complete (its marker/manifest written) and a sibling of `out_dir`. Order: fsync the new
    tree; move an existing `out_dir` aside to `<out>.old-<token>`; rename the new one into place; fsync the
    parent; only then remove the old copy. Without `replace` an existing `out_dir` is refused.
    """
    tmp_dir, out_dir = Path(tmp_dir), Path(out_dir)
    fsync_tree(tmp_dir)
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        if not replace:
            raise FileExistsError(f"{out_dir} already exists; refusing to replace it")
        old = temp_name(out_dir, "old")
        os.replace(out_dir, old)
        fsync_path(out_dir.parent)
    os.replace(tmp_dir, out_dir)
    fsync_path(out_dir.parent)
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@dataclasses.dataclass
class StaleReport:
    """What `remove_stale` did: leftovers removed, and whether a moved-aside copy was put back."""

    removed: list[str] = dataclasses.field(default_factory=list)
    restored: str | None = None

    @property
    def count(self) -> int:
        return len(self.removed)


def remove_stale(
    target: str | Path,
    *,
    is_complete: Callable[[Path], bool] | None = None,
    assume_dead: bool = False,
) -> StaleReport:
    """Clean up after writers of `target` that died; call it before writing `target`.

    If `target` is missing and a dead writer left a moved-aside `<target>.old-*` that `is_complete` accepts
    (default: any), it is renamed back to `target` (the crash happened between publish_dir's two renames).
    Every other leftover `<target>.tmp-*` / `.old-*` (also the `.<target>.tmp-*` temp files of
    `atomic_write`) whose writer is gone is removed. `assume_dead`: the caller holds the target's lock, so
    every leftover is stale whatever its name says. Returns what was removed, for the caller to report.
    """
    target = Path(target)
    report = StaleReport()
    parent = target.parent
    if not parent.is_dir():
        return report
    candidates: list[tuple[Path, TempInfo]] = []
    for entry in parent.iterdir():
        for base in (target.name, f".{target.name}"):
            info = parse_token(entry.name, base)
            if info is not None and (assume_dead or info.writer_gone):
                candidates.append((entry, info))
                break
    if not (target.exists() or target.is_symlink()):
        olds = sorted(
            (p for p, i in candidates if i.kind == "old" and p.name.startswith(target.name)),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for old in olds:
            if is_complete is None or is_complete(old):
                os.replace(old, target)
                fsync_path(parent)
                report.restored = str(old)
                log.warning("restored %s from %s (a writer died while replacing it)", target, old)
                candidates = [(p, i) for p, i in candidates if p != old]
                break
    for entry, _ in candidates:
        _remove(entry)
        report.removed.append(str(entry))
    if report.removed:
        log.warning("removed %d leftover(s) of interrupted writes to %s: %s", report.count, target,
                    ", ".join(Path(p).name for p in report.removed))
    return report


_LEFTOVER_RE = re.compile(r"(?P<base>.+?)\.(?:tmp|old)-(?P<token>\d+-[0-9a-f]{8}-[0-9a-f]+|\d+|[0-9a-f]{8})$")


def remove_stale_under(
    directory: str | Path, *, is_complete: Callable[[Path], bool] | None = None, assume_dead: bool = False
) -> StaleReport:
    """`remove_stale` for every target in `directory` that has leftovers: one call for a checkpoint root.

    Finds every `<name>.tmp-*` / `<name>.old-*` (and `.<name>.tmp-*` temp files) in `directory`, then for each
    name puts back a complete moved-aside copy when `<name>` is missing and removes the other leftovers of
    dead writers. With `assume_dead` (the caller holds the directory's lock) older token-less names such as
    `step-00000020.tmp-1a2b3c4d` count as leftovers too.
    """
    directory = Path(directory)
    total = StaleReport()
    if not directory.is_dir():
        return total
    bases: set[str] = set()
    for entry in directory.iterdir():
        m = _LEFTOVER_RE.fullmatch(entry.name)
        if m is None:
            continue
        base = m.group("base")
        if "-" not in m.group("token") and not m.group("token").isdigit():  # legacy random-only token
            if assume_dead:
                _remove(entry)
                total.removed.append(str(entry))
            continue
        bases.add(base[1:] if base.startswith(".") and entry.is_file() else base)
    for base in sorted(bases):
        report = remove_stale(directory / base, is_complete=is_complete, assume_dead=assume_dead)
        total.removed.extend(report.removed)
        total.restored = total.restored or report.restored
    return total


def remove_stale_in(
    directory: str | Path, pattern: str, *, assume_dead: bool = False, keep: Callable[[Path], bool] | None = None
) -> list[str]:
    """Remove leftovers matching the glob `pattern` (e.g. `step-*.tmp-*`) in `directory`, returning them.

    For directories such as a trainer's checkpoint root, where each save has its own target name. A name with
    a parseable token is removed only when its writer is gone (or `assume_dead`, when the caller holds the
    directory's lock); a name without one only with `assume_dead`. `keep` may veto a removal.
    """
    directory = Path(directory)
    removed: list[str] = []
    if not directory.is_dir():
        return removed
    for entry in sorted(directory.glob(pattern)):
        m = re.search(r"\.(?:tmp|old)-(\d+)-([0-9a-f]{8})-[0-9a-f]+$", entry.name)
        if assume_dead:
            stale = True
        elif m is not None:
            stale = TempInfo("tmp", int(m.group(1)), m.group(2)).writer_gone
        else:
            stale = False
        if stale and (keep is None or not keep(entry)):
            _remove(entry)
            removed.append(str(entry))
    if removed:
        log.warning("removed %d leftover(s) of interrupted writes in %s: %s", len(removed), directory,
                    ", ".join(Path(p).name for p in removed))
    return removed
