"""Bias-field correction (N4), cached per scan: the first step after loading.

A scanner's receive coils leave a smooth multiplicative field on the image: one side of the
brain 10–20 % brighter than the other. A per-image z-score cannot undo a spatial field, nor can a
global histogram mapping (Nyúl), and a network trained on one scanner reads the shifted grey
matter as another tissue. Every established pipeline corrects the field first (FreeSurfer,
FSL FAST before FIRST, ANTs); subseg does it with ANTs' N4 through ANTsPy, before intensity
standardisation, identically in training, fine-tuning, evaluation and prediction.

``conf/preprocess/n4.yaml`` holds the settings; ``preprocess=none`` skips the step for scans that
are already corrected. Brain extraction (:mod:`subseg.preprocessing.brain`) comes first, whatever
the N4 setting: :func:`corrected` is the scan as everything downstream sees it — zero outside the
brain mask, the field fitted and divided out inside it. The corrected volume is computed once per
scan and cached beside it (:mod:`subseg.core.cache`), keyed on the file's content and the settings.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from subseg.core import antspy, cache, io
from subseg.preprocessing import brain

FORMAT_VERSION = 2
"""Bump when cached corrections change meaning (invalidates the cache)."""

FILE = "corrected.nii.gz"


@dataclass(frozen=True)
class N4:
    """N4 settings (ANTs' ``N4BiasFieldCorrection``).

    Attributes:
        shrink_factor: the image is shrunk this many times along each axis to fit the field
            (the field is smooth; 4 is ANTs' usual choice), then the field is applied at full
            resolution.
        iterations: maximum iterations per fitting level (one level per entry, each doubling
            the B-spline mesh).
        tolerance: convergence threshold.
        spline_distance_mm: B-spline control-point spacing in mm; ``None`` keeps ANTsPy's
            default (one mesh element per axis at the first level).
        threads: ITK threads; 0 = every core (fixed per process at first use of ANTs).
    """

    shrink_factor: int = 4
    iterations: tuple[int, ...] = (50, 50, 50, 50)
    tolerance: float = 1e-7
    spline_distance_mm: float | None = None
    threads: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping | None) -> N4 | None:
        """The settings of a ``conf/preprocess`` entry (``None`` for ``preprocess=none``).

        Raises:
            io.InputError: an unknown kind.
        """
        if cfg is None or cfg.get("kind") == "none":
            return None
        if cfg.get("kind") != "n4":
            raise io.InputError(f"preprocess kind {cfg.get('kind')!r}: choose n4 or none")
        fields = {k: cfg[k] for k in cls.__dataclass_fields__ if cfg.get(k) is not None}
        if "iterations" in fields:
            fields["iterations"] = tuple(int(i) for i in fields["iterations"])
        return cls(**fields)

    def record(self) -> dict:
        """What changes the output (threads do not), for cache keys and run contracts."""
        out = asdict(self)
        out.pop("threads")
        out["iterations"] = list(self.iterations)
        return out


def record(cfg: Mapping | None) -> dict:
    """What a ``conf/preprocess`` entry does to a scan (extraction and N4), for cache keys."""
    settings = N4.from_config(cfg)
    return {
        "brain": brain.Extraction.from_config(cfg).record(),
        "n4": None if settings is None else settings.record(),
    }


def correct(data: np.ndarray, affine: np.ndarray, settings: N4 = N4()) -> np.ndarray:
    """Bias-correct a skull-stripped T1 (no cache).

    The field is fitted on the brain (non-zero voxels) and divided out; voxels outside the
    brain stay zero, so the z-score and Nyúl landmarks still see only the brain.

    Args:
        data: the canonical voxel array.
        affine: its voxel → world (RAS mm) affine; N4's B-spline lives in physical space.
        settings: N4 settings.

    Returns:
        The corrected volume, float32, same shape.
    """
    ants = antspy.load(settings.threads)
    brain = data != 0
    image = antspy.image(ants, data, affine)
    mask = antspy.image(ants, brain.astype(np.float32), affine)
    kwargs = {}
    if settings.spline_distance_mm is not None:
        kwargs["spline_param"] = float(settings.spline_distance_mm)
    corrected = ants.n4_bias_field_correction(
        image,
        mask=mask,
        shrink_factor=int(settings.shrink_factor),
        convergence={"iters": list(settings.iterations), "tol": float(settings.tolerance)},
        **kwargs,
    ).numpy()
    return np.where(brain, corrected, 0.0).astype(np.float32)


def _entry(path: Path, cfg: Mapping) -> tuple[Path, str]:
    """A scan's cache folder and the key (content of the file + settings) it must match."""
    options = {"format": FORMAT_VERSION, **record(cfg)}
    key = cache.key_of({**options, "image": cache.file_digest(path)})
    folder = cache.base_folder(path, cfg.get("cache_dir")) / f"n4-{cache.key_of(options)[:12]}"
    return folder / cache.entry_name(path), key


def corrected(path: str | Path, data: np.ndarray, affine: np.ndarray, cfg: Mapping) -> np.ndarray:
    """A scan's brain, bias-corrected, from the cache when a whole matching entry is there.

    Args:
        path: the scan's file (its content keys the cache).
        data: its canonical voxel array (as :func:`subseg.core.io.load_image` returns it).
        affine: the canonical affine.
        cfg: the ``conf/preprocess`` entry (``kind: none`` skips N4: the brain as it is).

    Returns:
        The canonical volume (float32), zero outside the brain mask
        (:mod:`subseg.preprocessing.brain`).
    """
    data, _ = brain.masked(path, data, affine, cfg)
    settings = N4.from_config(cfg)
    if settings is None:
        return data
    path = Path(path)
    folder, key = _entry(path, cfg)
    entry = cache.load_entry(folder, key)
    if entry is not None:
        stored = np.asarray(entry[1][FILE].dataobj, dtype=np.float32)
        if stored.shape == data.shape:
            return stored
    try:
        result = correct(data, affine, settings)
    except Exception as exc:  # ITK raises RuntimeError with pages of C++ context
        reason = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
        raise io.InputError(f"{path}: N4 bias-field correction failed ({reason})") from None
    cache.publish(
        folder,
        key,
        {FILE: (result, affine)},
        {"image": str(path.resolve())},
        setting="++preprocess.cache_dir",
    )
    return result


def ensure_corrected(
    image_paths: Sequence[str | Path], cfg: Mapping, workers: int | None = None
) -> int:
    """Extract and bias-correct every scan not cached yet.

    Extraction runs first, one scan at a time (the U-Net uses every core); N4 then runs in one
    single-threaded ITK process per core.

    Returns:
        How many scans were corrected.
    """
    brain.ensure_extracted(image_paths, cfg)
    settings = N4.from_config(cfg)
    if settings is None:
        return 0
    todo = [
        (str(p), dict(cfg)) for p in image_paths if cache.load_entry(*_entry(Path(p), cfg)) is None
    ]
    for path, _ in todo:  # one line per scan (Hydra prints INFO): what a run recomputed
        logging.getLogger("subseg").info("bias-field correction (N4): %s", path)
    antspy.map_in_processes(_correct_file, todo, "bias-field correction (N4)", workers=workers)
    return len(todo)


def _correct_file(path: str, cfg: Mapping) -> None:
    image = io.load_image(path)
    corrected(path, image.data, image.affine, cfg)
