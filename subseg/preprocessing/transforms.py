"""MONAI dictionary transforms: load → canonical → labels → brain → N4 → z-score → (optional) Nyúl.

MONAI provides the z-score (``NormalizeIntensityd`` with ``nonzero=True``) and composition. What it
lacks is written here in MONAI's style (an array transform plus its ``…d`` twin):

- ``LoadSubjectd``: MONAI's ``LoadImaged`` + ``Orientationd`` would load and reorient, but neither
  validates a user's files nor names the file in its errors; this one goes through
  :mod:`subseg.core.io` so every geometry problem surfaces as one line naming the file.
- ``MapLabels``: MONAI's ``MapLabelValue`` passes unlisted ids through unchanged.
- ``BiasFieldCorrectd``: MONAI has no bias-field correction; this one runs ANTs' N4 through
  :mod:`subseg.preprocessing.bias`, cached per scan.
- ``HistogramStandardize``: MONAI's ``HistogramNormalize`` is histogram equalisation, not Nyúl &
  Udupa's two-stage piecewise-linear standardisation to a reference cohort's landmarks.
- ``InteriorZScored``: ``NormalizeIntensityd`` takes its mean and s.d. from the voxels it
  normalises; this one takes them from the brain's interior (``preprocess.zscore_interior_mm``)
  and hands them to MONAI's ``NormalizeIntensity``.
- ``AtlasPriord``: attaches the subject's registered atlas prior (:mod:`subseg.preprocessing.atlas`,
  cached).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    MapTransform,
    NormalizeIntensity,
    NormalizeIntensityd,
    Transform,
)
from monai.utils import convert_data_type, convert_to_dst_type
from scipy import ndimage

from subseg.core import io
from subseg.core import labels as label_protocol
from subseg.preprocessing import atlas, bias

NYUL_PERCENTILES: tuple[float, ...] = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99)
"""Landmarks of Nyúl standardisation: the 1st/99th percentiles and the deciles between."""


def _meta_tensor(volume: io.Volume, data: np.ndarray) -> MetaTensor:
    meta = {
        "filename_or_obj": str(volume.path),
        "original_affine": volume.original_affine,
        "original_shape": volume.original_shape,
        "spacing": np.asarray(volume.spacing),
        "voxel_volume_mm3": volume.voxel_volume_mm3,
    }
    return MetaTensor(
        torch.from_numpy(np.ascontiguousarray(data))[None],
        affine=torch.as_tensor(volume.affine, dtype=torch.float64),
        meta=meta,
    )


class LoadSubjectd(MapTransform):
    """Load a subject's image (and label, if present) in canonical orientation with checks.

    Input values are file paths; outputs are channel-first ``MetaTensor`` s (1×X×Y×Z, RAS+) whose
    meta data keep the file name and the stored affine and shape.

    Args:
        image_key: key of the T1 image path.
        label_key: key of the raw label-map path (skipped when absent or ``None``).
        protocol: the label protocol; labels with none of its ids are rejected.
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str = "label",
        protocol: label_protocol.LabelSpec | None = None,
    ):
        super().__init__([image_key, label_key], allow_missing_keys=True)
        self.image_key, self.label_key, self.protocol = image_key, label_key, protocol

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        """Load the files named in ``data``; other entries pass through."""
        out = dict(data)
        image = io.load_image(out[self.image_key])
        out[self.image_key] = _meta_tensor(image, image.data)
        if out.get(self.label_key) is not None:
            label = io.load_label(out[self.label_key], image=image, protocol=self.protocol)
            out[self.label_key] = _meta_tensor(label, label.data)
        return out


class MapLabels(Transform):
    """Map raw label ids to the 14 output classes; every unlisted id becomes background.

    Args:
        protocol: protocol name (``aseg``, ``miccai2012``, ``cerebra``) or explicit mapping.
    """

    def __init__(self, protocol: label_protocol.LabelSpec):
        self.protocol = protocol
        label_protocol.raw_ids(protocol)  # fail at construction on a bad mapping

    def __call__(self, label):
        """Return the class map, same container type as ``label``."""
        array, *_ = convert_data_type(label, np.ndarray)
        classes = label_protocol.map_to_classes(array, self.protocol)
        out, *_ = convert_to_dst_type(classes, label, dtype=np.uint8)
        return out


class MapLabelsd(MapTransform):
    """Dictionary twin of :class:`MapLabels`."""

    def __init__(
        self,
        keys: KeysCollection,
        protocol: label_protocol.LabelSpec,
        allow_missing_keys: bool = True,
    ):
        super().__init__(keys, allow_missing_keys)
        self.mapper = MapLabels(protocol)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        """Map every present key."""
        out = dict(data)
        for key in self.key_iterator(out):
            if out[key] is not None:
                out[key] = self.mapper(out[key])
        return out


class BiasFieldCorrectd(MapTransform):
    """Extract the brain, then N4-correct it (:mod:`subseg.preprocessing.bias`), cached per scan.

    Expects the ``MetaTensor`` s of :class:`LoadSubjectd` (canonical data, the file name in the
    meta data, which keys the cache).

    Args:
        keys: image keys.
        preprocess: the ``conf/preprocess`` entry (``kind: none``: extraction only).
    """

    def __init__(self, keys: KeysCollection, preprocess: Mapping):
        super().__init__(keys)
        self.preprocess = dict(preprocess)
        bias.record(self.preprocess)  # fail at construction on a bad config

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        """Correct every key; the meta data (file, affine) are kept."""
        out = dict(data)
        for key in self.key_iterator(out):
            image = out[key]
            corrected = bias.corrected(
                image.meta["filename_or_obj"],
                image[0].numpy(),
                image.affine.numpy(),
                self.preprocess,
            )
            out[key] = image.clone()  # keeps the meta data (file, affine, spacing)
            out[key][0] = torch.from_numpy(np.ascontiguousarray(corrected))
        return out


def nyul_landmarks(image, percentiles: Sequence[float] = NYUL_PERCENTILES) -> np.ndarray:
    """Intensity landmarks (percentiles) of an image's non-zero (brain) voxels."""
    array, *_ = convert_data_type(image, np.ndarray)
    brain = array[array != 0]
    if brain.size == 0:
        raise ValueError("cannot compute histogram landmarks of an empty image")
    return np.percentile(brain.astype(np.float64), percentiles)


def learn_standard_scale(
    images: Iterable, percentiles: Sequence[float] = NYUL_PERCENTILES
) -> np.ndarray:
    """Stage one of Nyúl standardisation: the reference cohort's mean landmarks.

    Each image's landmarks are mapped linearly so that its first and last landmarks fall on the
    cohort's mean first and last landmarks, then averaged: the standard scale keeps the reference
    cohort's own intensity range (the paper standardises targets to the source's histogram).

    Args:
        images: reference images (arrays or tensors; zeros are background).
        percentiles: landmark percentiles.

    Returns:
        The standard landmarks, one per percentile.
    """
    marks = np.stack([nyul_landmarks(img, percentiles) for img in images])
    if np.any(marks[:, -1] <= marks[:, 0]):
        raise ValueError("a reference image has the same intensity at every landmark")
    low, high = marks[:, 0].mean(), marks[:, -1].mean()
    scaled = low + (marks - marks[:, :1]) / (marks[:, -1:] - marks[:, :1]) * (high - low)
    return scaled.mean(axis=0)


class HistogramStandardize(Transform):
    """Stage two of Nyúl standardisation: map an image's landmarks onto the standard scale.

    Piecewise linear between landmarks, extended linearly beyond the first and last; background
    (zero) voxels stay zero.

    Args:
        standard_landmarks: the reference cohort's landmarks from :func:`learn_standard_scale`.
        percentiles: the percentiles those landmarks stand for.
    """

    def __init__(
        self, standard_landmarks: Sequence[float], percentiles: Sequence[float] = NYUL_PERCENTILES
    ):
        self.standard = np.asarray(standard_landmarks, dtype=np.float64)
        self.percentiles = tuple(percentiles)
        if (
            self.standard.shape != (len(self.percentiles),)
            or not np.all(np.isfinite(self.standard))
            or np.any(np.diff(self.standard) <= 0)
        ):
            raise ValueError("standard landmarks must be finite and increase, one per percentile")

    def __call__(self, image):
        """Return the standardised image, same container type as ``image``."""
        array, *_ = convert_data_type(image, np.ndarray)
        landmarks = nyul_landmarks(array, self.percentiles)
        # Tied landmarks (narrow-range integer images) would give infinite slopes: keep the
        # first of each run of equal landmarks.
        distinct = np.concatenate([[True], np.diff(landmarks) > 0])
        source, standard = landmarks[distinct], self.standard[distinct]
        if source.size < 2:
            raise ValueError("the image has the same intensity at every landmark")
        mask = array != 0
        values = array[mask].astype(np.float64)
        mapped = np.interp(values, source, standard)
        # Beyond the first and last landmarks, extend with the slope of the whole span: the end
        # segments are short and their slopes unreliable.
        slope = (self.standard[-1] - self.standard[0]) / (source[-1] - source[0])
        below, above = values < source[0], values > source[-1]
        mapped[below] = standard[0] + (values[below] - source[0]) * slope
        mapped[above] = standard[-1] + (values[above] - source[-1]) * slope
        result = np.zeros_like(array, dtype=np.float32)
        result[mask] = mapped
        out, *_ = convert_to_dst_type(result, image, dtype=np.float32)
        return out


class HistogramStandardized(MapTransform):
    """Dictionary twin of :class:`HistogramStandardize`."""

    def __init__(
        self,
        keys: KeysCollection,
        standard_landmarks: Sequence[float],
        percentiles: Sequence[float] = NYUL_PERCENTILES,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.standardize = HistogramStandardize(standard_landmarks, percentiles)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        """Standardise every present key."""
        out = dict(data)
        for key in self.key_iterator(out):
            out[key] = self.standardize(out[key])
        return out


class Pipeline(Compose):
    """A MONAI ``Compose`` that lets a bad-input error through as itself.

    ``Compose`` re-raises every transform error as ``RuntimeError("applying transform …")``; the
    user's one-line :class:`subseg.core.io.InputError` is the useful part, so it is raised instead.
    """

    def __call__(self, input_, *args, **kwargs):
        """Apply the transforms in order."""
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as exc:
            found = io.find_input_error(exc)
            if found is None:
                raise
            raise found from None


class AtlasPriord(MapTransform):
    """Attach a subject's atlas prior (:class:`subseg.preprocessing.atlas.Prior`) as ``prior``.

    The prior is registered once per scan and cached on disk.

    Args:
        atlas_cfg: the ``conf/atlas`` entry.
        source: from :func:`subseg.preprocessing.atlas.load_source`.
        preprocess: the ``conf/preprocess`` entry (registration sees the bias-corrected scan).
        image_key: key of the image; its file path is read from the meta data.
    """

    def __init__(self, atlas_cfg, source, preprocess=None, image_key: str = "image"):
        super().__init__([image_key])
        self.atlas_cfg, self.source, self.image_key = atlas_cfg, source, image_key
        self.preprocess = preprocess

    def __call__(self, item):
        """Add ``prior`` to the item."""
        out = dict(item)
        path = out[self.image_key].meta["filename_or_obj"]
        out["prior"] = atlas.subject_prior(
            io.load_image(path), self.atlas_cfg, self.source, self.preprocess
        )
        return out


def zscore_interior_mm(preprocess: Mapping | None) -> float:
    """How deep inside the brain mask the z-score's statistics are taken (mm; 0: the whole mask).

    A record written before the setting existed reads as 0, the z-score its model was trained on.
    """
    value = float((preprocess or {}).get("zscore_interior_mm") or 0.0)
    if value < 0:
        raise io.InputError(f"preprocess.zscore_interior_mm={value}: give a depth >= 0 (mm)")
    return value


class InteriorZScored(MapTransform):
    """Z-score the brain with the mean and s.d. of its interior, not of the whole mask.

    Brain masks differ at their edge: one extractor keeps a voxel of CSF and dura that another
    drops, and a whole-mask z-score moves every brain voxel with it (one voxel of dilation moved
    the demo's No TL Dice by 0.014, docs/engineering.md). Voxels more than ``interior_mm`` inside
    the mask (Euclidean distance in mm, the voxel spacing honoured) are where extractors agree.
    The whole brain is normalised; voxels outside it stay zero. A brain too thin to have an
    interior (fewer than :attr:`MIN_INTERIOR_VOXELS`) falls back to the whole mask.

    Args:
        keys: image keys (``MetaTensor`` s with ``spacing`` in their meta data).
        interior_mm: the depth.
    """

    MIN_INTERIOR_VOXELS = 1000

    def __init__(self, keys: KeysCollection, interior_mm: float):
        super().__init__(keys)
        self.interior_mm = float(interior_mm)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        """Normalise every key."""
        out = dict(data)
        for key in self.key_iterator(out):
            image = out[key]
            volume = image[0].numpy() if isinstance(image, torch.Tensor) else np.asarray(image[0])
            mean, std = interior_statistics(volume, image.meta["spacing"], self.interior_mm)
            out[key] = NormalizeIntensity(subtrahend=mean, divisor=std, nonzero=True)(image)
        return out


def interior_statistics(
    volume: np.ndarray, spacing: Sequence[float], interior_mm: float
) -> tuple[float, float]:
    """Mean and s.d. of the non-zero voxels more than ``interior_mm`` inside the non-zero region."""
    brain = volume != 0
    if not brain.any():
        return 0.0, 1.0
    # The distance transform runs on the brain's box with a margin of one voxel, clipped to the
    # grid: the same distances as on the whole grid (moving a background voxel outside the box
    # onto the margin only brings it closer), at a fraction of the cost on a head's grid.
    box = tuple(slice(max(int(idx.min()) - 1, 0), int(idx.max()) + 2) for idx in np.nonzero(brain))
    depth = ndimage.distance_transform_edt(brain[box], sampling=[float(s) for s in spacing])
    inner = depth > interior_mm
    region = volume[box]
    if inner.sum() < InteriorZScored.MIN_INTERIOR_VOXELS:
        inner = region != 0
    values = region[inner].astype(np.float64)
    return float(values.mean()), float(values.std()) or 1.0


def preprocessing(
    protocol: label_protocol.LabelSpec | None,
    standard_landmarks: Sequence[float] | None = None,
    normalize: bool = True,
    preprocess: Mapping | None = None,
) -> Pipeline:
    """The deterministic pipeline every subject goes through before sampling or inference.

    Load (checked, canonical) → map labels → bias-field correction → z-score → Nyúl. Code that
    uses a trained model builds this from the model's run folder
    (:meth:`subseg.preprocessing.contract.InputContract.pipeline`), never from loose options.

    Args:
        protocol: the cohort's label protocol (``None`` for unlabelled images).
        standard_landmarks: when given, Nyúl-standardise the z-scored image to these landmarks.
        normalize: z-score (and standardise); ``False`` keeps the stored intensities.
        preprocess: the ``conf/preprocess`` entry (``None``: no bias-field correction).

    Returns:
        A :class:`Pipeline` (a MONAI ``Compose``) taking
        ``{"image": path, "label": path | None, ...}``.
    """
    steps: list = [LoadSubjectd(protocol=protocol)]
    if protocol is not None:
        steps.append(MapLabelsd("label", protocol))
    if preprocess is not None:  # brain extraction, then N4 unless kind: none
        steps.append(BiasFieldCorrectd("image", preprocess))
    interior_mm = zscore_interior_mm(preprocess)
    if normalize and interior_mm > 0:
        steps.append(InteriorZScored("image", interior_mm))
    elif normalize:
        steps.append(NormalizeIntensityd("image", nonzero=True))
    if normalize and standard_landmarks is not None:
        steps.append(HistogramStandardized("image", standard_landmarks))
    return Pipeline(steps)
