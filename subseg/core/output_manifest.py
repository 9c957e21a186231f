"""Which files of an output folder subseg wrote: the rule that it never touches anyone else's.

``predict.py`` writes into a folder the user names, which may already hold the user's own files
(a manual ``sub01_seg.nii.gz``, a corrected draft). The manifest ``.subseg-outputs.json`` in
that folder lists each file subseg wrote there with the sha256 it had when written. A file may
be replaced or removed only when it is listed *and* still has that content: a file subseg never
wrote, or one of its outputs that the user has since edited (a corrected segmentation), is
theirs and is never touched.

Files are listed by their path relative to the folder (``volumes.csv``,
``sub-01/anat/sub-01_desc-subseg_dseg.nii.gz`` in a BIDS derivative tree); a file outside the
folder is never subseg's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from subseg.core import cache, io

MANIFEST_NAME = ".subseg-outputs.json"


class OutputManifest:
    """The record of the files subseg wrote in one folder.

    Args:
        folder: the output folder.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.files: dict[str, str] = {}
        if self.path.is_file():
            try:
                self.files = dict(json.loads(self.path.read_text()).get("files", {}))
            except (OSError, ValueError, AttributeError):
                self.files = {}  # unreadable: nothing counts as ours, so nothing is touched

    @property
    def path(self) -> Path:
        """The manifest file."""
        return self.folder / MANIFEST_NAME

    def key(self, path: str | os.PathLike) -> str | None:
        """How the manifest lists ``path``: relative to the folder, ``None`` if outside it.

        The folders are resolved (symbolic links followed), the file's own name is not: a link
        named as an output is a file of its own, never the file it points to.
        """
        path = Path(path)
        where = path.parent.resolve() / path.name
        folder = self.folder.resolve()
        return where.relative_to(folder).as_posix() if where.is_relative_to(folder) else None

    def owns(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` may be replaced or removed: absent, or written by subseg unchanged."""
        path = Path(path)
        if not path.exists():
            return True
        key = self.key(path)
        return key is not None and path.is_file() and self.files.get(key) == cache.file_digest(path)

    def check_writable(self, paths: Iterable[str | os.PathLike]) -> None:
        """Refuse, before anything is written, when any of ``paths`` is someone else's file.

        Raises:
            io.InputError: one line naming the first file subseg did not write (or that was
                edited since).
        """
        for path in map(Path, paths):
            if not self.owns(path):
                edited = self.key(path) in self.files
                why = "was edited since subseg wrote it" if edited else "was not written by subseg"
                raise io.InputError(
                    f"{path}: already exists and {why}; it is left as it is: choose another "
                    "out_dir= (or move the file)"
                )

    def remove(self, path: str | os.PathLike) -> None:
        """Remove one of subseg's files (an earlier batch's output); any other file stays."""
        path = Path(path)
        if path.exists() and self.owns(path):
            path.unlink()
        if not path.exists():
            self.forget(path)

    def forget(self, path: str | os.PathLike) -> None:
        """Drop a file from the record (it is gone)."""
        if self.files.pop(self.key(path), None) is not None:
            self.save()

    def claim(self, *paths: str | os.PathLike) -> None:
        """Record files just written by subseg (with their content's digest)."""
        for path in map(Path, paths):
            key = self.key(path)
            if key is None:
                raise ValueError(f"{path}: outside {self.folder}, whose files alone it lists")
            if path.is_file():
                self.files[key] = cache.file_digest(path)
        self.save()

    def save(self) -> None:
        """Write the manifest atomically."""
        with io.atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps({"files": dict(sorted(self.files.items()))}, indent=2))
