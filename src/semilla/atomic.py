"""Write a whole directory or file so that a crash leaves either the old one or the new one.

A directory is written into a temporary sibling, fsynced, and swapped in by two renames:
`dest` -> `.dest.old`, then `tmp` -> `dest`. A crash between the two leaves `.dest.old`,
which `existing_dir` finds, so the previous version is never lost.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from semilla.errors import SemillaError


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    for root, _dirs, files in os.walk(directory):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_path(Path(root))


def umask() -> int:
    """The process's umask, read without changing it (os.umask sets it, racing other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:  # not Linux
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a temporary file (0600) or directory (0700) the mode a plain open() or mkdir()
    would have given it, so the user's other tools can read what semilla wrote."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def refuse_to_replace(path: str | os.PathLike, overwrite: bool) -> None:
    """Nothing the user made is replaced without asking: an existing file or non-empty
    directory at `path` is an error unless `overwrite`."""
    path = Path(path)
    if overwrite or not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    raise SemillaError(f"{path} already exists; pass --overwrite to replace it")


def _old_sibling(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.old"


def existing_dir(dest: str | os.PathLike) -> Path | None:
    """`dest`, or the previous version a crash mid-swap left behind, or None."""
    dest = Path(dest)
    if dest.is_dir():
        return dest
    old = _old_sibling(dest)
    return old if old.is_dir() else None


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `dest` atomically."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = _old_sibling(dest)
    if not dest.exists() and old.is_dir():  # a crash interrupted the last swap: restore first
        os.replace(old, dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    follow_umask(tmp, directory=True)
    try:
        yield tmp
        fsync_tree(tmp)
        if old.exists():
            shutil.rmtree(old)
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        _fsync_path(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    for stale in dest.parent.glob(f".{dest.name}.tmp-*"):  # leftovers of killed writers
        shutil.rmtree(stale, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary sibling and a rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file through a temporary sibling, an fsync and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        follow_umask(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
