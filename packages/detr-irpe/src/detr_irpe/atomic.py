"""Atomic file writes: every file this package writes goes through :func:`atomic_write`.

A reader (or a run resumed after a kill) sees either the previous complete file or the new
complete file, never a partial one: the data goes to a temporary file in the same folder, is
flushed and ``fsync``'ed, then renamed over the target (``os.replace`` is atomic on POSIX and
Windows). A failed write removes its temporary file and leaves the target as it was.

Failures a user can fix (a full disk, a read-only or missing folder, no permission) raise
:class:`OutputWriteError` with one line naming the file and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "OutputWriteError",
    "atomic_write",
    "check_writable_dir",
    "remove_stale_temporaries",
    "write_json",
    "write_text",
]

# Temporary files are named ``.<target name>.<random>.tmp``; those a killed process left
# behind are removed by :func:`remove_stale_temporaries`.
_TMP_SUFFIX = ".tmp"

_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a parent path is a file, not a folder",
    errno.EISDIR: "it is a folder",
}


class OutputWriteError(OSError):
    """A file could not be written for a reason the user can fix (disk full, read-only, ...)."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]" prefix
        return str(self.strerror)


def _explain(path: Path, err: OSError) -> OutputWriteError:
    cause = _CAUSES.get(err.errno or 0, err.strerror or str(err))
    return OutputWriteError(err.errno or 0, f"cannot write '{path}': {cause}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on success rename it to ``path``.

    ``mode`` is ``"wb"`` or ``"w"`` (text, UTF-8). Use as ``with atomic_write(p) as f: ...``.

    Raises:
        OutputWriteError: the folder cannot be created or written (the message names the file
            and the cause: no space left, read-only file system, permission denied, ...).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent
        )
    except OSError as err:
        raise _explain(path, err) from None
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(err, OSError) and not isinstance(err, OutputWriteError):
            raise _explain(path, err) from None
        if isinstance(err, RuntimeError) and "unexpected pos" in str(err):
            # torch.save reports a failed write (typically a full disk) this way.
            raise OutputWriteError(
                errno.EIO, f"cannot write '{path}': the write failed (is the disk full?)"
            ) from None
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform/file system.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path, "w") as handle:
        handle.write(text)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files that killed writes left in ``directory``; return them.

    Only this module's own names (``.<target>.<random>.tmp``) are touched. Call it where no
    other process writes to the folder at the same time (rank 0 at the start of a run).
    """
    removed = []
    for candidate in Path(directory).glob(f".*{_TMP_SUFFIX}"):
        if candidate.is_file():
            with contextlib.suppress(OSError):
                candidate.unlink()
                removed.append(candidate)
    return removed


def check_writable_dir(directory: str | os.PathLike[str], flag: str = "--output_dir") -> None:
    """Create ``directory`` if needed and prove a file can be written there.

    Raises:
        OutputWriteError: it names a file, or cannot be created or written.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputWriteError(errno.ENOTDIR, f"{flag} '{directory}' is a file, not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        cause = _CAUSES.get(err.errno or 0, err.strerror or str(err))
        raise OutputWriteError(
            err.errno or 0, f"{flag} '{directory}' is not writable: {cause}"
        ) from None
