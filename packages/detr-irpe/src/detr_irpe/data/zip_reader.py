"""Read image files from a folder or, when the folder is absent, from ``<folder>.zip``.

COCO users may keep ``train2017.zip``/``val2017.zip`` unextracted next to the annotations. An
:class:`ImageFileReader` is built for one image folder and decides **once**, from what exists
on disk, whether it reads files from the folder or members from the archive; the member name
of ``file_name`` is ``basename(folder) + '/' + file_name`` (e.g. ``train2017/000000000009.jpg``).

Unlike the original reader (a module-global handle cache and a flag flipped for good on any
failed read), each reader owns at most one open :class:`zipfile.ZipFile` for the process that
opened it. A ``ZipFile`` inherited through ``fork`` (DataLoader workers) shares its file
offset with the parent, so concurrent reads would corrupt each other: the reader notices the
changed ``os.getpid()`` and opens its own handle. Pickling (``spawn`` workers) drops the
handle too.
"""

from __future__ import annotations

import logging
import os
import threading
import zipfile
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from detr_irpe.data.images import ImageLoadError

__all__ = ["ArchiveError", "ImageFileReader", "unsafe_path_reason"]

logger = logging.getLogger(__name__)


class ArchiveError(ImageLoadError, zipfile.BadZipFile):
    """An image archive is not a readable zip file (e.g. truncated), or one of its members is
    corrupt; the message names the archive. Also a ``zipfile.BadZipFile``."""


def unsafe_path_reason(file_name: str) -> str | None:
    """Why ``file_name`` may not be read relative to an image folder, or ``None`` when it may.

    A dataset's ``file_name`` must stay inside its image folder: absolute paths (POSIX or
    Windows, drive letters included) and ``..`` components (with ``/`` or ``\\`` as
    separator) are refused, so an annotation file cannot make the reader open arbitrary files.
    """
    if "\0" in file_name:
        return "contains a NUL character"
    if PurePosixPath(file_name).is_absolute() or PureWindowsPath(file_name).anchor:
        return "is an absolute path"
    if ".." in file_name.replace("\\", "/").split("/"):
        return "has a '..' component that leaves the image folder"
    return None


class ImageFileReader:
    """Bytes of the files of one image folder, read from the folder or from its zip archive.

    Args:
        folder: the image folder, e.g. ``coco/train2017``. When it is not a directory, the
            archive ``coco/train2017.zip`` is used instead.

    Raises:
        FileNotFoundError: neither the folder nor the archive exists (both paths are named).
        ArchiveError: the archive is not a readable zip file, e.g. truncated (it is named).

    Attributes:
        folder: the folder as given.
        archive: the archive path in zip mode, else ``None``.
        mode: ``"folder"`` or ``"zip"``.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        archive = Path(f"{self.folder}.zip")
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        # Guards lazy opening only; ZipFile itself serialises reads of one handle.
        self._lock = threading.Lock()
        if self.folder.is_dir():
            self.mode = "folder"
            self.archive: Path | None = None
        elif archive.is_file():
            self.mode = "zip"
            self.archive = archive
            # Parse the central directory now so that a corrupt archive fails at construction,
            # in the main process, rather than in the first DataLoader worker.
            self._handle()
        else:
            raise FileNotFoundError(
                f"image folder not found: looked for the directory '{self.folder}' "
                f"and the zip archive '{archive}'"
            )
        logger.debug("reading images of %s from %s", self.folder, self.archive or self.folder)

    @property
    def location(self) -> str:
        """Where files are read from: the folder or the archive, as a string."""
        return str(self.archive if self.archive is not None else self.folder)

    def member_name(self, file_name: str) -> str:
        """The archive member holding ``file_name``: ``basename(folder)/file_name``."""
        return f"{self.folder.name}/{file_name}"

    def describe(self, file_name: str) -> str:
        """A human-readable name of ``file_name`` for error messages."""
        if self.archive is not None:
            return f"'{self.member_name(file_name)}' in archive '{self.archive}'"
        return f"'{self.folder / file_name}'"

    def read(self, file_name: str) -> bytes:
        """The bytes of ``file_name`` (a path relative to the image folder).

        Raises:
            ImageLoadError: ``file_name`` is absolute or leaves the folder (``..``).
            FileNotFoundError: the file, or the archive member, does not exist.
            ArchiveError: the archive or the member is corrupt.
            OSError: the file cannot be read.
        """
        reason = unsafe_path_reason(file_name)
        if reason is not None:
            raise ImageLoadError(f"refusing to read image '{file_name}': it {reason}")
        if self.archive is None:
            path = self.folder / file_name
            try:
                return path.read_bytes()
            except FileNotFoundError:
                raise FileNotFoundError(f"image file not found: '{path}'") from None
        member = self.member_name(file_name)
        handle = self._handle()
        try:
            return handle.read(member)
        except KeyError:
            raise FileNotFoundError(
                f"image not found: no member '{member}' in archive '{self.archive}'"
            ) from None
        except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, ValueError) as err:
            raise ArchiveError(
                f"cannot read member '{member}' of archive '{self.archive}': {err}"
            ) from err

    def _handle(self) -> zipfile.ZipFile:
        """This process's open archive, opened on first use and after a fork."""
        assert self.archive is not None
        pid = os.getpid()
        with self._lock:
            if self._zip is not None and self._zip_pid != pid:
                # Inherited through fork: closing only releases this process's descriptor;
                # the parent keeps its own.
                self._zip.close()
                self._zip = None
            if self._zip is None:
                try:
                    self._zip = zipfile.ZipFile(self.archive, "r")
                except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as err:
                    # A cut-off download loses the central directory at the end of the file.
                    raise ArchiveError(
                        f"'{self.archive}' is not a readable zip archive (truncated or "
                        f"corrupt? download it again): {err}"
                    ) from err
                self._zip_pid = pid
            return self._zip

    def close(self) -> None:
        """Close the archive handle of this process, if any (reading re-opens it)."""
        with self._lock:
            if self._zip is not None:
                self._zip.close()
                self._zip = None
                self._zip_pid = None

    def __enter__(self) -> ImageFileReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Release the descriptor deterministically rather than waiting for the ZipFile's own
        # finaliser; after a fork this closes only this process's copy.
        zip_handle = getattr(self, "_zip", None)
        if zip_handle is not None:
            zip_handle.close()

    def __getstate__(self) -> dict[str, Any]:
        # Open files and locks cannot cross process boundaries; the receiver re-opens lazily.
        state = self.__dict__.copy()
        state["_zip"] = None
        state["_zip_pid"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r}, location={self.location!r})"
