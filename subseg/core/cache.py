"""Content-keyed, checksummed cache entries kept beside the data (atlas priors, N4 output).

An entry is a folder of NIfTI files and a manifest holding the key it was made under and each
file's sha256. Keys are built from the *content* of the input files (:func:`file_digest`), never
from their path, size or modification time: touching a scan reuses its entries, changing one of
its voxels rebuilds them. A reader gets an entry only when it is whole, matches the key and every
file matches its checksum; anything else is rebuilt, never trusted. Writers stage an entry in a
private folder and rename it into place whole.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np

from subseg.core import io

MANIFEST = "manifest.json"


def file_digest(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes: what a cache key says about an input file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def key_of(record: Mapping) -> str:
    """A cache key: the sha256 of a JSON record (sorted keys)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def base_folder(image_path: str | os.PathLike, cache_dir: str | os.PathLike | None) -> Path:
    """Where a scan's entries live: ``cache_dir``, or ``.subseg_cache`` beside the scan."""
    return Path(cache_dir) if cache_dir else Path(image_path).resolve().parent / ".subseg_cache"


def stem(path: str | os.PathLike) -> str:
    """A volume file's name without ``.nii`` / ``.nii.gz`` / ``.mgz`` / ``.mgh``."""
    name = Path(path).name
    for suffix in io.MGH_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name.removesuffix(".gz").removesuffix(".nii")


def entry_name(path: str | os.PathLike) -> str:
    """A scan's entry folder name: its file name and a short hash of where it lies.

    Two scans with the same name (``sub-01/T1.nii.gz``, ``sub-02/T1.nii.gz``) sharing one cache
    folder get entries of their own instead of evicting each other; the key inside an entry is
    still the file's content.
    """
    where = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:8]
    return f"{stem(path)}-{where}"


STALE_STAGING_SECONDS = 3600
"""A staging folder untouched this long belongs to a writer that died: it is removed."""


def _remove_stale_staging(folder: Path) -> None:
    """Remove the staging folders of ``folder``'s entry left by killed writers.

    Only folders whose newest file is older than :data:`STALE_STAGING_SECONDS`: a younger one
    may be a concurrent writer's (a parallel sweep job) still writing, and staging a prior
    takes seconds, never an hour. Other entries' staging folders are left to their writers.
    """
    # mkdtemp's names: the prefix, then 8 characters of [a-z0-9_].
    staged = re.compile(rf"\.{re.escape(folder.name)}\.[a-z0-9_]{{8}}")
    cutoff = time.time() - STALE_STAGING_SECONDS
    for candidate in folder.parent.iterdir():
        if not staged.fullmatch(candidate.name):
            continue
        try:
            if not candidate.is_dir() or candidate.is_symlink():
                continue
            newest = max(
                [candidate.stat().st_mtime]
                + [p.stat().st_mtime for p in candidate.iterdir() if not p.is_symlink()]
            )
        except OSError:  # another writer removed or renamed it meanwhile
            continue
        if newest < cutoff:
            shutil.rmtree(candidate, ignore_errors=True)


def publish(
    folder: Path,
    key: str,
    arrays: Mapping[str, tuple[np.ndarray, np.ndarray]],
    extra: Mapping,
    setting: str = "++atlas.cache_dir",
) -> None:
    """Write a cache entry (NIfTI files + manifest) privately, then rename it into place whole.

    Concurrent writers (parallel sweep jobs on an empty cache) each stage their own folder and
    rename it into place whole; a later writer replaces an earlier one's identical entry, and a
    reader in between finds no whole entry and rebuilds it. Work may be repeated, but an entry
    is never a mixture of two writers. A writer killed mid-write leaves its staging folder
    behind; the next writer of the same entry removes those untouched for
    :data:`STALE_STAGING_SECONDS`.

    Args:
        folder: the entry's folder.
        key: what a reader must match.
        arrays: file name → (array, affine).
        extra: more manifest fields.
        setting: the option that moves this cache elsewhere (named in the error).

    Raises:
        io.InputError: the cache location is not writable.
    """
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(folder)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as exc:
        raise io.InputError(
            f"{folder.parent}: cannot write the cache here ({exc.strerror}); "
            f"set {setting} to a writable folder"
        ) from None
    try:
        digests = {}
        for name, (array, affine) in arrays.items():
            digests[name] = hashlib.sha256(
                io.save_new(array, affine, staging / name).read_bytes()
            ).hexdigest()
        manifest = {"key": key, **extra, "files": digests}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700 folders
        if folder.exists():  # a damaged or outdated entry under the same name
            shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # another writer's identical entry got there first
            os.rename(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_entry(folder: Path, key: str | None = None):
    """(manifest, images) of a whole entry matching ``key``, else ``None``.

    Images are parsed from the very bytes whose checksums were verified, so a file replaced
    between the check and the read cannot slip through.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if key is not None and manifest.get("key") != key:
            return None
        images = {}
        for name, digest in manifest["files"].items():
            data = (folder / name).read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                return None
            images[name] = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    except Exception:  # any unreadable entry is rebuilt, whatever the reason
        return None
    return manifest, images
