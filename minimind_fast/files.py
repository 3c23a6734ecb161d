"""Writing outputs whole: a temporary sibling filled first, then swapped into place; input files
checked up front; and an output directory locked against a second writer.

Temporary directories and files (`tempfile.mkdtemp`/`mkstemp`) are private (0700/0600), and the
safetensors library writes 0600 too; outputs get the permissions `mkdir` and `open` would give under
the user's umask, so that a model or tokenizer on a shared filesystem is readable as any other file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_file():
            tmp.unlink()
        raise


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
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`. An existing `out` is renamed aside, not deleted, until the new
    one is in place, so a failure or a kill never leaves `out` without one whole directory behind it."""
    apply_umask(tmp)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
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
