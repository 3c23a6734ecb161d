"""Writing outputs whole: a temporary sibling filled first, then swapped into place; input files
checked up front; and an output directory locked against a second writer.

A temporary is hidden and named after its output and its writer (`.NAME.tmp-PID-HOST...`, and a replaced
directory's `.NAME.old-PID-HOST...`): a failed write removes its own, and the next successful write of
the same output removes those of writers that were killed (their process gone from this host), never
one a live writer still fills.

Temporary directories and files (`tempfile.mkdtemp`/`mkstemp`) are private (0700/0600), and the
safetensors library writes 0600 too; outputs get the permissions `mkdir` and `open` would give under
the user's umask, so that a model or tokenizer on a shared filesystem is readable as any other file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import socket
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def check_input_files(files: Iterable[str | os.PathLike]) -> list[Path]:
    """The JSONL inputs as paths, each an existing file: a directory is named as one (its files are meant),
    anything else missing is a FileNotFoundError."""
    paths = [Path(f) for f in files]
    for p in paths:
        if p.is_dir():
            raise ValueError(f"{p}: a directory; give its JSONL files (e.g. {p}/*.jsonl)")
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such input file")
    return paths


def write_text_whole(path: Path, text: str) -> None:
    """`text` into the file `path`, never half-written: a temporary sibling, then renamed over it."""
    write_file_whole(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_file_whole(path: Path, write: Callable[[Path], None]) -> None:
    """The file `path` as `write(tmp)` fills a hidden temporary sibling, renamed over it when whole."""
    write_files_whole({path: write})


def write_files_whole(writes: dict[Path, Callable[[Path], None]]) -> None:
    """Each file `path` as `write(tmp)` fills a hidden temporary sibling; all are filled before any is renamed
    into place, so a failure midway (a full disk) leaves every old file as it was, never a mix of old and new."""
    tmps = {path: path.with_name(temporary_name(path, "tmp")) for path in writes}
    try:
        for path, write in writes.items():
            write(tmps[path])
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps.values():
            with suppress(OSError):  # none made (under a file: ENOTDIR), or unremovable: the error is above
                tmp.unlink(missing_ok=True)
        raise
    for path in writes:
        remove_stale_temporaries(path)


# Temporaries carry their writer's pid and a tag of its host: on a shared filesystem another host's pid
# says nothing about whether its writer still runs.
HOST_TAG = f"{zlib.crc32(socket.gethostname().encode()):08x}"
_TEMPORARY = re.compile(r"\.(?:tmp|old)-(\d+)-([0-9a-f]{8})(?:-.*)?", re.DOTALL)


def temporary_name(out: Path, kind: str = "tmp") -> str:
    """The hidden name of this process's temporary for `out` (`kind` "old": the old one renamed aside)."""
    return f".{out.name}.{kind}-{os.getpid()}-{HOST_TAG}"


def remove_stale_temporaries(out: Path) -> None:
    """Remove the hidden temporaries of `out` (files or directories) that writers killed midway left: those
    of a process of this host that is gone. Others' (another host's, a live process's) are kept."""
    prefix = f".{out.name}."
    with os.scandir(out.parent) as entries:
        stale = [Path(e.path) for e in entries if e.name.startswith(prefix)
                 and _is_stale(e.name[len(prefix) - 1:])]
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _is_stale(suffix: str) -> bool:
    found = _TEMPORARY.fullmatch(suffix)
    return bool(found) and found[2] == HOST_TAG and not _is_running(int(found[1]))


def _is_running(pid: int) -> bool:
    if pid <= 0:
        return True  # no process of its own (0 would signal our process group): not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give `path` (and, for a directory, everything in it) the default permissions under the umask."""
    mask = current_umask()
    paths = [path] if path.is_file() else [path, *path.rglob("*")]
    for p in paths:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def temporary_sibling_dir(out: Path) -> Path:
    """An empty directory beside `out` (same filesystem, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=temporary_name(out, "tmp") + "-", dir=out.parent))


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`. An existing `out` is renamed aside, not deleted, until the new
    one is in place, so a failure or a kill never leaves `out` without one whole directory behind it."""
    apply_umask(tmp)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=temporary_name(out, "old") + "-", dir=out.parent))
        try:
            os.replace(out, old)
        except BaseException:
            old.rmdir()
            raise
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    remove_stale_temporaries(out)


# Lock files this process holds: a forked child (a worker pool) closes its copies at once, so that the
# lock goes with this process and a worker still busy after a kill does not keep the directory locked.
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_LOCKS:
        os.close(fd)  # closing, not LOCK_UN: unlocking would release the parent's lock too
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class DirectoryBusy(ValueError):
    """Another process holds the directory's lock."""


@contextmanager
def locked_directory(directory: Path, lock_name: str, label: str) -> Iterator[None]:
    """Hold an exclusive lock on `directory` (flock on `directory/lock_name`, not waiting) until the
    block ends; raise `DirectoryBusy` naming `label`, the directory and the holder's pid if it is held.

    The lock file holds the holder's pid and host and is removed when the block ends. The kernel drops the lock
    when its holder exits, however it exits, so the file a killed run leaves behind blocks nothing.
    """
    path = directory / lock_name
    fd = _lock(path, label, directory)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        _HELD_LOCKS.add(fd)
        try:
            yield
        finally:
            _HELD_LOCKS.discard(fd)
            if _is_open_as(fd, path):  # removed by hand, maybe another run's by now: not ours to remove
                path.unlink()  # while still locked: see _lock
    finally:
        os.close(fd)


def _lock(path: Path, label: str, directory: Path) -> int:
    """An open descriptor of the lock file `path`, locked. A file its holder removed after this process
    opened it is locked for nothing (a third process may have made a new one): then try again."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ValueError(f"{label} {directory}: cannot create its lock file {path} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 300, 0).decode(errors="replace").split()
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            pid = ""  # a file being written, or of an older version (a pid alone), says less or nothing
            if holder and holder[0].isdigit():
                pid = f" (pid {holder[0]}{f' on {holder[1]}' if len(holder) > 1 else ''})"
            raise DirectoryBusy(f"{label} {directory}: another process{pid} is writing there (it holds "
                                f"{path}); wait for it to end, or choose another directory") from None
        if _is_open_as(fd, path):
            return fd
        os.close(fd)


def _is_open_as(fd: int, path: Path) -> bool:
    """Whether `path` is still the file open as `fd` (not removed, nor replaced by another)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)
