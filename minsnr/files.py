"""Files a run writes, written so that a kill -9 at any moment leaves the old file or the new one, never
half of one: a fsynced temporary `.NAME.tmp` in the same folder, renamed over the target, then the folder
fsynced. A write that fails (disk full, no permission) raises WriteError naming the file; the temporary
is removed. One writer per file at a time (rank 0 for a run's files; distinct files per rank elsewhere).
"""

from __future__ import annotations

import errno
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


class WriteError(OSError):
    """A file of the run could not be written (disk full, no permission ...); the message names the file."""

    def __init__(self, path: Path, err: OSError):
        super().__init__(err.errno, err.strerror or str(err), str(path))
        what = "disk full writing" if err.errno == errno.ENOSPC else "cannot write"
        self.message = f"{what} {path} ({err.strerror or err})"

    def __str__(self) -> str:
        return self.message


def os_error(err: BaseException) -> OSError | None:
    """The OSError behind `err`: itself, or the one a native writer (torch.save) turned into a RuntimeError."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through a fsynced temporary and a rename: readers see the old file or the new one."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp"  # one writer per file; a stale temporary is overwritten
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask's permissions, as open() gives
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        cause = os_error(err)
        if cause is not None:
            raise WriteError(path, cause) from err
        raise


def write_json(path: Path, data: dict[str, Any], indent: int = 2) -> None:
    """JSON through atomic_write (keys in the order given)."""
    atomic_write(Path(path), lambda f: f.write((json.dumps(data, indent=indent) + "\n").encode()))


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when there is no such file."""
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


def truncated_zip(path: Path) -> bool:
    """Starts like a zip file (torch.save's and np.savez's format) but has no readable end: cut short or damaged."""
    with path.open("rb") as f:
        return f.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(f)
