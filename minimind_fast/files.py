"""Writing outputs whole: a temporary sibling filled first, then swapped into place; and input files
checked up front.

Temporary directories and files (`tempfile.mkdtemp`/`mkstemp`) are private (0700/0600), and the
safetensors library writes 0600 too; outputs get the permissions `mkdir` and `open` would give under
the user's umask, so that a model or tokenizer on a shared filesystem is readable as any other file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
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
