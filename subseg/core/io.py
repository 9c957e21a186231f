"""NIfTI and FreeSurfer MGH in, NIfTI out, with geometry checks and canonical orientation.

Scans and labels may be NIfTI (``.nii``, ``.nii.gz``) or MGH (``.mgz``, ``.mgh``: FreeSurfer's
volumes). Every volume is reoriented on load to the closest canonical (RAS+) orientation by
flips and axis permutations only (no resampling), so "axial" means the same anatomical plane
for every cohort.
Every output is written back on the input's own grid, affine and orientation, through a temporary
file renamed into place so that an interrupted run never leaves a half-written NIfTI.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import logging
import os
import sys
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from subseg.core import labels as label_protocol
from subseg.core import sides

# nibabel repairs a header with qfac 0 (the ICBM 2009c files have it) with an INFO line on every
# load; Hydra's console logging shows INFO, so each scan would print it several times.
logging.getLogger("nibabel.global").setLevel(logging.WARNING)


class InputError(ValueError):
    """A user's input file is unusable; the message is one line that names the file."""


USER_ERRORS = (InputError, label_protocol.LabelSpecError)
"""Errors caused by a user's files or settings: reported as one line, never as a traceback."""


def _behind(exc: BaseException | None, wanted) -> BaseException | None:
    """The first exception in ``exc``'s chain (causes and contexts) that ``wanted`` accepts."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if wanted(exc):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def find_input_error(exc: BaseException | None) -> ValueError | None:
    """Return the user error (:data:`USER_ERRORS`) behind ``exc`` — MONAI wraps them — if any."""
    return _behind(exc, lambda e: isinstance(e, USER_ERRORS))


OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
"""Write failures that no input can cause: a full disk, a read-only or forbidden folder."""


def find_output_error(exc: BaseException | None) -> OSError | None:
    """The failure to write (:data:`OUTPUT_ERRNOS`) behind ``exc``, if any (libraries wrap it)."""
    return _behind(exc, lambda e: isinstance(e, OSError) and e.errno in OUTPUT_ERRNOS)


def ensure_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and check that a file can be written there.

    Raises:
        InputError: the folder cannot be created or written to (one line naming it).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".subseg-write-test-"):
            pass
    except OSError as exc:
        raise InputError(f"{folder}: cannot write here ({exc.strerror})") from None
    return folder


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn a bad-input error anywhere below (MONAI wraps them) into one line and exit code 2.

    A failure to write (a full disk, a read-only folder) is one line naming the file too.
    """
    try:
        yield
    except Exception as exc:
        found = find_input_error(exc)
        written = find_output_error(exc)
        if found is None and written is not None:
            found = f"{written.filename or 'output'}: cannot write ({written.strerror})"
        if found is None:
            raise
        print(f"subseg: error: {found}", file=sys.stderr)
        raise SystemExit(2) from None


@dataclass
class Volume:
    """A 3-D volume in canonical (RAS+) orientation that remembers how it was stored.

    Attributes:
        data: voxel array in canonical orientation.
        affine: voxel → world (mm) affine of ``data``.
        path: the file it came from.
        original_affine: the affine as stored in the file.
        original_shape: the 3-D shape as stored in the file.
        header: a NIfTI header for outputs on the same grid: the file's own (qform/sform codes,
            units), or one made from an MGH file's geometry.
    """

    data: np.ndarray
    affine: np.ndarray
    path: Path
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]
    header: nib.Nifti1Header

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the canonical axes (R, A, S)."""
        return tuple(float(z) for z in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm³."""
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    def to_original(self, array: np.ndarray) -> np.ndarray:
        """Reorient an array on this volume's canonical grid back to the file's orientation."""
        return _reorient(array, _ornt(self.affine), _ornt(self.original_affine))


def _ornt(affine: np.ndarray) -> np.ndarray:
    return orientations.io_orientation(affine)


def _reorient(array: np.ndarray, from_ornt: np.ndarray, to_ornt: np.ndarray) -> np.ndarray:
    transform = orientations.ornt_transform(from_ornt, to_ornt)
    return np.ascontiguousarray(orientations.apply_orientation(array, transform))


MAX_VOLUME_BYTES = 2 << 30
"""Default limit on the voxel bytes a header may claim (2 GiB); see :func:`max_volume_bytes`."""

MAX_VOLUME_BYTES_VARIABLE = "SUBSEG_MAX_VOLUME_BYTES"
"""The environment variable that overrides :data:`MAX_VOLUME_BYTES`."""

_GZIP_CHUNK = 1 << 20


def max_volume_bytes() -> int:
    """The most voxel bytes a file's header may claim before it is refused unread.

    ``SUBSEG_MAX_VOLUME_BYTES`` (a positive whole number of bytes) overrides the 2 GiB default,
    e.g. for very high-resolution scans.

    Raises:
        InputError: the variable is set but not a positive whole number.
    """
    value = os.environ.get(MAX_VOLUME_BYTES_VARIABLE, "").strip()
    if not value:
        return MAX_VOLUME_BYTES
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise InputError(
            f"{MAX_VOLUME_BYTES_VARIABLE}={value!r}: not a positive whole number of bytes"
        )
    return limit


def _gzip_size_at_least(path: Path, wanted: int) -> int:
    """Decompress ``path`` (every gzip member) counting bytes, up to ``wanted``; keep none.

    Returns the count, which is below ``wanted`` only when the file ends (or its data break
    off) first.
    """
    count = 0
    inflate = zlib.decompressobj(wbits=31)
    with open(path, "rb") as f:
        pending = b""
        while count < wanted:
            if not pending:
                pending = f.read(_GZIP_CHUNK)
                if not pending:  # the file ends: take what zlib still holds back
                    with contextlib.suppress(zlib.error):
                        count += len(inflate.flush())
                    break
            try:
                # max_length bounds what one call returns: the claim is never held in memory.
                count += len(inflate.decompress(pending, _GZIP_CHUNK))
            except zlib.error:
                break  # corrupt data: what was counted so far is all the file holds
            pending = inflate.unconsumed_tail
            if inflate.eof:  # a member ends; another may follow (bgzip and pigz -i write many)
                pending = inflate.unused_data + pending
                inflate = zlib.decompressobj(wbits=31)
    return count


def _check_claim(path: Path, img) -> None:
    """Refuse a file whose header claims more voxels than allowed, or than the file holds.

    Runs on the header alone (``nib.load`` reads nothing else), before any voxel array is
    allocated: a 74-byte file may claim tens of gigabytes.
    """
    try:
        shape = tuple(int(n) for n in img.shape)
        itemsize = int(img.get_data_dtype().itemsize)
    except (AttributeError, TypeError, ValueError):
        return  # not a voxel image: reading it fails with its own message
    claimed = int(np.prod(shape, dtype=object)) * itemsize  # Python ints: no overflow
    limit = max_volume_bytes()
    if claimed > limit:
        raise InputError(
            f"{path}: header claims shape {shape} of {img.get_data_dtype()} ({claimed} bytes), "
            f"above the limit of {limit} bytes (set {MAX_VOLUME_BYTES_VARIABLE} to raise it)"
        )
    # Single-file NIfTI and MGH say where their voxels start; other formats are read as they are.
    if not isinstance(img, nib.Nifti1Image | nib.MGHImage):
        return
    offset = int(img.dataobj.offset)
    name = path.name.lower()
    if name.endswith((".nii", ".mgh")):
        held = path.stat().st_size
    elif name.endswith((".nii.gz", ".mgz")):
        wanted = offset + claimed
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            trailer = int.from_bytes(f.read(4), "little")  # ISIZE: length mod 2**32
        # A whole single-member file's trailer equals the claim: nothing to decompress. Else
        # it may be cut short, hold several members (the trailer tells the last one's length
        # only), or go on after the voxels (an .mgz's footer): only counting the decompressed
        # bytes decides. Claims of 4 GiB and more (the limit raised) wrap the trailer and are
        # left to nibabel.
        if wanted >= 1 << 32 or trailer == wanted:
            return
        held = _gzip_size_at_least(path, wanted)
    else:
        return
    if held < offset + claimed:
        raise InputError(
            f"{path}: cannot be read as {_format(path)} (header claims {claimed} bytes of voxels "
            f"but the file holds {max(held - offset, 0)})"
        )


MGH_SUFFIXES = (".mgz", ".mgh")
"""FreeSurfer's volume files, read as scans and labels like NIfTI."""

VOLUME_SUFFIXES = (".nii", ".nii.gz", *MGH_SUFFIXES)
"""The file names a scan or label may have."""


def _format(path: Path) -> str:
    """The format a file's name promises, for messages."""
    return "MGH" if path.name.lower().endswith(MGH_SUFFIXES) else "NIfTI"


def _read(path: Path) -> tuple[np.ndarray, nib.spatialimages.SpatialImage]:
    """Read a volume's header, check its claims, then its voxels (see :func:`_check_claim`).

    Environment:
        SUBSEG_MAX_VOLUME_BYTES: the most voxel bytes (shape × item size) a header may claim;
            2 GiB by default (:func:`max_volume_bytes`).
    """
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        img = nib.load(path)  # the header only: voxels are read on demand
    except Exception as exc:  # nibabel raises many types; the user needs one line
        raise InputError(
            f"{path}: cannot be read as {_format(path)} ({_first_line(exc)})"
        ) from None
    _check_claim(path, img)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise InputError(
            f"{path}: cannot be read as {_format(path)} ({_first_line(exc)})"
        ) from None
    if data.dtype.kind not in "biuf" or data.dtype.names is not None:
        raise InputError(f"{path}: voxel type {data.dtype} is not a real scalar (RGB or complex?)")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise InputError(
            f"{path}: a 4-D file with {data.shape[3]} volumes; give one 3-D volume (one T1)"
        )
    if data.ndim != 3:
        raise InputError(
            f"{path}: expected a 3-D volume (or 4-D with one volume), got shape {data.shape}"
        )
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: the affine is singular or not finite")
    return data, img


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _nifti_header(img: nib.spatialimages.SpatialImage) -> nib.Nifti1Header:
    """The file's NIfTI header, or for another format (MGH) one holding its geometry.

    An MGH file's affine is scanner RAS (FreeSurfer's vox2ras), hence qform and sform code 1;
    its voxel sizes are in mm.
    """
    if isinstance(img.header, nib.Nifti1Header):
        return img.header.copy()
    header = nib.Nifti1Header()
    header.set_data_shape(img.shape)
    header.set_qform(img.affine, code=1)
    header.set_sform(img.affine, code=1)
    header.set_xyzt_units("mm", "sec")
    return header


def _canonical(data: np.ndarray, img: nib.spatialimages.SpatialImage, path: Path) -> Volume:
    affine = img.affine
    ornt = _ornt(affine)
    canonical_affine = affine @ orientations.inv_ornt_aff(ornt, data.shape)
    return Volume(
        data=_reorient(data, ornt, orientations.axcodes2ornt("RAS")),
        affine=canonical_affine,
        path=path,
        original_affine=affine.copy(),
        original_shape=tuple(int(s) for s in data.shape),
        header=_nifti_header(img),
    )


def load_image(path: str | os.PathLike) -> Volume:
    """Load a skull-stripped T1 image in canonical orientation as float32.

    Args:
        path: a NIfTI (``.nii``, ``.nii.gz``) or MGH (``.mgz``, ``.mgh``) file, 3-D or 4-D
            with one volume.

    Returns:
        The canonical volume.

    Raises:
        InputError: unreadable file, wrong dimensions, NaN/inf voxels, or an empty brain.
    """
    path = Path(path)
    data, img = _read(path)
    data = data.astype(np.float32, copy=False)
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise InputError(f"{path}: {bad} voxels are NaN or infinite")
    brain = data[data != 0]
    if brain.size == 0:
        raise InputError(f"{path}: empty brain (every voxel is zero); expected a T1")
    if brain.min() == brain.max():
        raise InputError(f"{path}: empty brain (every non-zero voxel has the same intensity)")
    return _canonical(data, img, path)


def load_label(
    path: str | os.PathLike,
    image: Volume | None = None,
    protocol: label_protocol.LabelSpec | None = None,
    *,
    warn: bool = True,
) -> Volume:
    """Load a raw label map in canonical orientation as int32.

    With a ``protocol``, label sanity is also checked (:func:`subseg.core.sides.warn_label`): one
    warning line each, once per file, to the ``subseg`` logger, for raw ids the protocol does not
    explain (they become background), structures with no voxel, and left/right pairs whose right
    structure does not lie right of its left twin in world coordinates (sides exchanged in the
    mapping, or an array stored mirrored against its header).

    Args:
        path: a NIfTI or MGH label file (FreeSurfer's ``aseg.mgz``).
        image: the subject's image; when given, the label must lie on exactly its grid.
        protocol: when given, the label map must contain at least one of its structure ids.
        warn: log the sanity warnings above (only with ``protocol``).

    Returns:
        The canonical label volume with raw ids (see :func:`subseg.core.labels.map_to_classes`).

    Raises:
        InputError: unreadable file, wrong dimensions, non-integer values, a grid that differs
            from the image's, or none of the protocol's ids present.
    """
    path = Path(path)
    data, img = _read(path)
    rounded = np.rint(data)
    if not np.all(np.isfinite(data)) or np.abs(data - rounded).max(initial=0) > 1e-3:
        raise InputError(f"{path}: label values must be finite integers")
    limit = np.iinfo(np.int32)
    # Python ints: a uint8 map compared with int32 limits would overflow in numpy.
    if rounded.size and (int(rounded.min()) < limit.min or int(rounded.max()) > limit.max):
        raise InputError(f"{path}: label values outside the 32-bit integer range")
    data = rounded.astype(np.int32)
    if image is not None:
        if data.shape != image.original_shape:
            raise InputError(
                f"{path}: label grid {data.shape} does not match image {image.path.name} "
                f"grid {image.original_shape}"
            )
        diff = float(np.abs(img.affine - image.original_affine).max())
        if diff > 1e-3:
            raise InputError(
                f"{path}: label affine differs from image {image.path.name}'s by up to "
                f"{diff:.4g} mm"
            )
    if protocol is not None:
        expected = set(label_protocol.class_lookup(protocol))
        present = np.unique(data)
        if not expected.intersection(present.tolist()):
            name = protocol if isinstance(protocol, str) else "the given mapping"
            shown = ", ".join(str(v) for v in present[:12]) + (" …" if present.size > 12 else "")
            raise InputError(
                f"{path}: none of the 14 structure ids of {name} is present (found ids: {shown})"
            )
    volume = _canonical(data, img, path)
    if protocol is not None and warn:
        # The canonical data with the canonical affine: world x is the subject's right.
        classes = label_protocol.map_to_classes(volume.data, protocol)
        sides.warn_label(path, present, classes, volume.affine, protocol)
    return volume


def write_csv(rows, columns, path: str | os.PathLike, atomic: bool = True) -> Path:
    """Write dict rows as a CSV file with the given columns.

    Args:
        rows: the rows (mappings from column to value).
        columns: the header, in order.
        path: the file.
        atomic: through a temporary file renamed into place (``False`` when ``path`` already is
            one, from :func:`atomic_path`).
    """
    path = Path(path)
    with contextlib.ExitStack() as stack:
        target = stack.enter_context(atomic_path(path)) if atomic else path
        with open(target, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(rows)
    return path


def write_tsv(rows, columns, path: str | os.PathLike) -> Path:
    """Write dict rows as a tab-separated table (BIDS' ``.tsv``) atomically.

    Lines end in a bare line feed (BIDS tools expect it, not the csv module's default CRLF).
    """
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` and rename it to ``path`` only on success.

    Args:
        path: the final file name; its suffixes are kept on the temporary name so that writers
            that choose a format by extension (``.nii.gz``, ``.png``) still do.

    Yields:
        The temporary path to write to. Once the caller is done, it is fsynced, renamed to
        ``path``, and the folder fsynced, so that a crash never leaves a half-written file
        under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix="".join(path.suffixes)
    )
    os.close(fd)
    tmp = Path(tmp)
    # mkstemp creates 0600 files; give the result the permissions any new file would get.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        # Flush the bytes to disk before the rename: after a power cut, a renamed file whose
        # data never reached the disk would be a whole-looking empty or partial file.
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_folder(path.parent)  # make the rename itself durable
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk, where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse to fsync a folder; the rename stands anyway
        pass
    finally:
        os.close(fd)


def save_like(array: np.ndarray, reference: Volume, path: str | os.PathLike, dtype=None) -> Path:
    """Write an array on a reference volume's canonical grid back in the reference's own geometry.

    The file gets the reference's original shape, affine, orientation and header (qform/sform
    codes, units), with the data type of ``array`` (or ``dtype``) and no intensity scaling. It
    is always a NIfTI file: an MGH reference (``.mgz``) gives a NIfTI with its shape and affine.

    Args:
        array: array whose first three axes are the grid of ``reference.data`` (extra trailing
            axes, e.g. 15 probabilities, are kept).
        reference: the volume whose grid ``array`` lies on.
        path: output file (``.nii.gz`` recommended).
        dtype: data type on disk; defaults to ``array.dtype``.

    Returns:
        The path written.
    """
    if array.shape[:3] != reference.data.shape:
        raise ValueError(
            f"array shape {array.shape} is not on the reference grid {reference.data.shape}"
        )
    out = reference.to_original(np.asarray(array, dtype=dtype or array.dtype))
    if out.dtype == np.int64:  # NIfTI readers handle int32 far more widely than int64
        out = out.astype(np.int32)
    header = reference.header.copy()
    header["cal_min"], header["cal_max"] = 0, 0  # not the T1's display window
    header.set_data_shape(out.shape)
    header.set_data_dtype(out.dtype)
    img = nib.Nifti1Image(out, reference.original_affine, header=header)
    img.header.set_slope_inter(1.0, 0.0)
    path = Path(path)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path


def save_new(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a new NIfTI (no reference file) atomically, with qform and sform set to ``affine``."""
    img = nib.Nifti1Image(np.asarray(array), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    path = Path(path)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path
