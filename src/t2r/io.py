"""The one way t2r writes a file: to a temporary name beside it, then renamed into place, so that a reader (or a crash)
sees the whole old file or the whole new one, never a part."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import T2RError


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place: readers see all or nothing."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the file should look like any other
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    """Replace `path` by `text` (UTF-8), atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, "utf-8"))


def write_json(path: str | Path, data: Any, **dumps: Any) -> None:
    """Replace `path` by `data` as indented JSON with a final newline, atomically."""
    write_text(path, json.dumps(data, indent=2, **dumps) + "\n")


def private_dir_beside(path: str | Path, suffix: str = ".partial") -> Path:
    """A new empty directory beside `path` (same file system, so it can be renamed into place), with the usual
    permissions (mkdtemp alone makes it private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def replace_dir(new: str | Path, final: str | Path) -> None:
    """Put the finished directory `new` in the place of `final`. The old `final` is first renamed to `.NAME.old` (so a
    crash between the two renames leaves one of them whole), then removed."""
    new, final = Path(new), Path(final)
    refuse_symlink(final, "the output")
    old = final.with_name(f".{final.name}.old")
    recover_dir(final)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: str | Path) -> bool:
    """Put back `final` from `.NAME.old` if a crash came between the two renames of `replace_dir` (the old directory
    moved aside, the new one not yet in place): the previous complete state returns. True if it did."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    if final.exists() or final.is_symlink() or not old.is_dir():
        return False
    os.replace(old, final)
    return True


def check_writable(path: str | Path, flag: str = "--out", *, directory: bool = True) -> None:
    """Refuse, before any work, an output `path` that cannot be written: a file where a directory is wanted (or the
    other way round), or a parent directory that cannot be created or written (read-only, permissions). Creates the
    missing parent directories, nothing else."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise T2RError(f"{flag} {path} is a file, not a directory: choose another {flag}")
    if not directory and path.is_dir():
        raise T2RError(f"{flag} {path} is a directory, not a file: name a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise T2RError(f"cannot write {flag} {path}: {err.strerror or err} in {path.parent}; choose a writable "
                       "location") from None


def refuse_symlink(path: str | Path, flag: str = "--out") -> None:
    """An output that would be replaced or deleted must not be a symbolic link: t2r never deletes through one."""
    path = Path(path)
    if path.is_symlink():
        raise T2RError(f"{flag} {path} is a symbolic link (to {os.readlink(path)}): t2r never replaces or deletes "
                       f"through a link; give the real directory")
