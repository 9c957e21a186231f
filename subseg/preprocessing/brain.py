"""Brain extraction: the paper's first step, so that a raw T1 from the scanner goes in as it is.

The method starts from skull-stripped scans (ROBEX in the paper). A raw T1 holds scalp, skull,
eyes and neck around the brain; segmented as it is, its atlas prior is registered head-to-brain
and lands in the brainstem. Every scan therefore goes through one extraction step before
bias-field correction (:mod:`subseg.preprocessing.bias`), and from then on voxels outside the brain
mask are zero: N4 fits its field inside the mask, the z-score and Nyúl landmarks see only the brain.

Methods (``preprocess.brain.method``):

- ``auto`` (default): a scan that is already stripped (its non-zero voxels fill at most
  ``max_stripped_litres``; a whole brain fills 1–2 L, a head 4–9 L) is left as it is; any other
  scan is extracted with ``extractor``.
- ``deepbet``: deepbet (Fisch et al. 2024, MIT licence), a 3-D U-Net trained on 7837 T1 scans of
  many scanners, run from the TorchScript weights inside its wheel (nothing is downloaded).
- ``ants``: register the ICBM 2009c head T1 to the scan (affine + SyN at reduced resolution, as
  the atlas prior is registered) and warp the template's own brain mask — the template half of
  antsBrainExtraction.
- ``none``: take the scan's non-zero voxels as the brain (FreeSurfer ``brainmask.mgz``, BET or
  HD-BET output).

The mask is computed once per scan and cached beside it (:mod:`subseg.core.cache`), keyed on the
file's content and these settings, like N4's output. docs/engineering.md has the measurements
behind the default.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from subseg.core import antspy, cache, io
from subseg.data import synth

FORMAT_VERSION = 1
"""Bump when cached masks change meaning (invalidates the cache)."""

FILE = "mask.nii.gz"

METHODS = ("auto", "deepbet", "ants", "none")
EXTRACTORS = ("deepbet", "ants")

STRIPPED = "stripped"
"""What :attr:`BrainMask.method` says for a scan taken as it is (already skull-stripped)."""


@dataclass(frozen=True)
class Extraction:
    """Brain-extraction settings (the ``brain:`` block of a ``conf/preprocess`` entry).

    Attributes:
        method: ``auto``, ``deepbet``, ``ants`` or ``none`` (module docstring).
        extractor: what ``auto`` runs on a scan that is not stripped.
        max_stripped_litres: ``auto`` takes a scan whose non-zero voxels fill at most this as
            stripped already.
        threshold: deepbet's brain-probability threshold.
        resolution_mm: voxel size the ``ants`` registration runs at.
    """

    method: str = "auto"
    extractor: str = "deepbet"
    max_stripped_litres: float = 2.6
    threshold: float = 0.5
    resolution_mm: float = 3.0

    @classmethod
    def from_config(cls, preprocess: Mapping | None) -> Extraction:
        """The settings of a ``conf/preprocess`` entry.

        An entry without a ``brain`` block (a run made before extraction existed, whose scans
        were stripped) gets ``auto``: on stripped scans it does exactly what was done then.

        Raises:
            io.InputError: an unknown method or extractor.
        """
        block = (preprocess or {}).get("brain")
        if isinstance(block, str):
            block = {"method": block}
        fields = {k: v for k, v in dict(block or {}).items() if k in cls.__dataclass_fields__}
        settings = cls(**{k: v for k, v in fields.items() if v is not None})
        if settings.method not in METHODS:
            raise io.InputError(
                f"preprocess.brain.method={settings.method!r}: choose one of {', '.join(METHODS)}"
            )
        if settings.extractor not in EXTRACTORS:
            raise io.InputError(
                f"preprocess.brain.extractor={settings.extractor!r}: choose "
                f"{' or '.join(EXTRACTORS)}"
            )
        return settings

    def record(self) -> dict:
        """What changes the mask, for cache keys and run contracts."""
        return asdict(self)


@dataclass(frozen=True)
class BrainMask:
    """A scan's brain mask and how it was made.

    Attributes:
        mask: boolean, on the scan's canonical grid.
        method: ``deepbet`` or ``ants`` (extracted), ``stripped`` (taken as it is).
        litres: the mask's volume.
        scan_litres: the volume the scan's non-zero voxels fill (before extraction).
    """

    mask: np.ndarray
    method: str
    litres: float
    scan_litres: float

    def describe(self) -> str:
        """One phrase for logs and tables: ``deepbet (brain 1.42 L of 6.10 L)``."""
        if self.method == STRIPPED:
            return f"already stripped (brain {self.litres:.2f} L)"
        return f"{self.method} (brain {self.litres:.2f} L of {self.scan_litres:.2f} L)"


def nonzero_litres(data: np.ndarray, voxel_volume_mm3: float) -> float:
    """The volume a scan's non-zero voxels fill, in litres."""
    return float(np.count_nonzero(data) * voxel_volume_mm3 / 1e6)


def _voxel_mm3(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3])))


def extract(
    path: str | Path, data: np.ndarray, affine: np.ndarray, settings: Extraction = Extraction()
) -> BrainMask:
    """A scan's brain mask (no cache).

    Args:
        path: the scan's file (named in errors).
        data: its canonical (RAS) voxel array, as :func:`subseg.core.io.load_image` gives it.
        affine: the canonical affine.
        settings: extraction settings.

    Raises:
        io.InputError: the extractor failed or found no brain (one line naming the file).
    """
    voxel_mm3 = _voxel_mm3(affine)
    scan_litres = nonzero_litres(data, voxel_mm3)
    method = settings.method
    if method == "auto":
        stripped = scan_litres <= settings.max_stripped_litres
        method = "none" if stripped else settings.extractor
    if method == "none":
        return BrainMask(data != 0, STRIPPED, scan_litres, scan_litres)
    try:
        if method == "deepbet":
            mask = _deepbet_mask(data, settings.threshold)
        else:
            mask = _ants_mask(data, affine, settings.resolution_mm)
    except io.InputError:
        raise
    except Exception as exc:  # torch/ITK errors are pages long; the user needs one line
        reason = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else repr(exc)
        raise io.InputError(f"{path}: brain extraction ({method}) failed: {reason}") from None
    mask &= data != 0  # a zero voxel carries no signal: never "brain" downstream
    litres = float(mask.sum() * voxel_mm3 / 1e6)
    if litres < 0.2:  # a whole brain fills 1-2 L; less than a fifth of a litre is no brain
        raise io.InputError(
            f"{path}: brain extraction ({method}) found {litres:.2f} L of brain; is this "
            "a T1 of a head?"
        )
    return BrainMask(mask, method, litres, scan_litres)


@functools.cache
def _deepbet_model():
    # deepbet picks CUDA when it sees a GPU; subseg's own preprocessing runs on the CPU (in
    # worker processes too), where the 3-D U-Net takes about 2.5 s per scan.
    from deepbet import BrainExtraction

    return BrainExtraction(no_gpu=True)


def _deepbet_mask(data: np.ndarray, threshold: float) -> np.ndarray:
    """The deepbet mask of a canonical (RAS) array, as ``deepbet.run`` makes it from a file.

    The model and its post-processing (largest component, holes filled) are deepbet's; only its
    file reading and writing are skipped, since subseg already holds the canonical array.
    """
    model = _deepbet_model()
    probability = model.run_model(np.ascontiguousarray(data, dtype=np.float32).copy())
    return model.postprocess(probability > threshold, 0).astype(bool)


@functools.cache
def _head_template():
    head, mask, affine = synth.load_head_template()
    return head, mask.astype(np.float32), affine


def _ants_mask(data: np.ndarray, affine: np.ndarray, resolution_mm: float) -> np.ndarray:
    """The ICBM 2009c brain mask, carried onto the scan by registering its head T1 to it."""
    ants = antspy.load()
    head, mask, template_affine = _head_template()
    fixed = antspy.image(ants, data, affine)
    size = (float(resolution_mm),) * 3
    fixed_low = ants.resample_image(fixed, size, use_voxels=False, interp_type=0)
    moving_low = ants.resample_image(
        antspy.image(ants, head, template_affine), size, use_voxels=False, interp_type=0
    )
    ants.config._random_seed = 0  # see subseg.preprocessing.atlas._register
    with tempfile.TemporaryDirectory(prefix="subseg-brain-") as work:
        result = ants.registration(
            fixed_low, moving_low, type_of_transform="SyN", outprefix=str(Path(work) / "t_")
        )
        warped = ants.apply_transforms(
            fixed, antspy.image(ants, mask, template_affine), result["fwdtransforms"], "linear"
        ).numpy()
    return warped > 0.5


# --------------------------------------------------------------------------- cache


def _entry(path: Path, settings: Extraction, cache_dir) -> tuple[Path, str]:
    options = {"format": FORMAT_VERSION, "brain": settings.record()}
    key = cache.key_of({**options, "image": cache.file_digest(path)})
    folder = cache.base_folder(path, cache_dir) / f"brain-{cache.key_of(options)[:12]}"
    return folder / cache.entry_name(path), key


def brain_mask(
    path: str | Path, data: np.ndarray, affine: np.ndarray, preprocess: Mapping | None
) -> BrainMask:
    """A scan's brain mask, from the cache when a whole matching entry is there.

    Args:
        path: the scan's file (its content keys the cache).
        data: its canonical voxel array, as loaded from that file.
        affine: the canonical affine.
        preprocess: the ``conf/preprocess`` entry (its ``brain`` block and ``cache_dir``).
    """
    settings = Extraction.from_config(preprocess)
    if settings.method == "none":  # nothing to compute or remember
        return extract(path, data, affine, settings)
    path = Path(path)
    folder, key = _entry(path, settings, (preprocess or {}).get("cache_dir"))
    entry = cache.load_entry(folder, key)
    if entry is not None:
        stored = np.asarray(entry[1][FILE].dataobj) > 0
        if stored.shape == data.shape:
            manifest = entry[0]
            return BrainMask(
                stored, manifest["method"], manifest["litres"], manifest["scan_litres"]
            )
    result = extract(path, data, affine, settings)
    cache.publish(
        folder,
        key,
        {FILE: (result.mask.astype(np.uint8), affine)},
        {
            "image": str(path.resolve()),
            "method": result.method,
            "litres": result.litres,
            "scan_litres": result.scan_litres,
        },
        setting="++preprocess.cache_dir",
    )
    return result


def masked(
    path: str | Path, data: np.ndarray, affine: np.ndarray, preprocess: Mapping | None
) -> tuple[np.ndarray, BrainMask]:
    """The scan with every voxel outside its brain mask set to zero, and the mask.

    ``data`` must be the file's own voxels (canonical): the mask is cached under the file.
    """
    found = brain_mask(path, data, affine, preprocess)
    return np.where(found.mask, data, 0).astype(np.float32, copy=False), found


def ensure_extracted(image_paths: Sequence[str | Path], preprocess: Mapping | None) -> int:
    """Extract every scan whose mask is not cached yet (one at a time: the U-Net uses every core).

    Returns:
        How many scans were extracted (or checked for being stripped).
    """
    settings = Extraction.from_config(preprocess)
    if settings.method == "none":
        return 0
    cache_dir = (preprocess or {}).get("cache_dir")
    todo = [p for p in image_paths if not cache.load_entry(*_entry(Path(p), settings, cache_dir))]
    for path in antspy.progress(todo, "brain extraction", enabled=len(todo) > 1):
        logging.getLogger("subseg").info("brain extraction: %s", path)
        image = io.load_image(path)
        brain_mask(path, image.data, image.affine, preprocess)
    return len(todo)
