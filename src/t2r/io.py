"""The one way t2r writes a file: to a temporary name beside it, then renamed into place, so that a reader (or a crash)
sees the whole old file or the whole new one, never a part."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


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
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)
