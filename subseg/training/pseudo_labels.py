"""Pseudo-labels for self-training: a model's own segmentations of unlabelled scans, where reliable.

A teacher model segments every unlabelled scan of the pool (:func:`segment_pool`). Its answer is
kept only where the label-free quality signals (:mod:`subseg.evaluation.quality`) say it can be
trusted (:func:`pseudo_samples`):

- per structure and scan, the quality score must not be flagged: at least
  :data:`~subseg.evaluation.quality.ABSOLUTE_FLAG`, and at least
  :data:`~subseg.evaluation.quality.RELATIVE_FLAG` of the same structure's median over the pool
  — the rule ``qc.csv`` flags a user's scans by;
- per voxel, the teacher's probability of its class must reach ``confidence``, and the
  registered atlas must give that class a non-zero probability there (without an atlas,
  ``atlas=none``, the confidence alone).

The voxels are then sampled as a labelled scan's are (:func:`subseg.training.samples.sample_voxels`:
every structure voxel and as many from the background shell), among the reliable ones only.
No label file is read anywhere here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from subseg.evaluation import quality
from subseg.model import inference
from subseg.training.samples import SubjectSamples, prior_at, sample_voxels


@dataclass
class PoolSegmentation:
    """A teacher's answer on one unlabelled scan.

    Attributes:
        scan: the scan's id.
        classes: X×Y×Z class map (post-processed), canonical grid.
        probabilities: 15×x×y×z probabilities inside the prior's box.
        scores: the 14 structures' quality rows
            (:func:`subseg.evaluation.quality.structure_scores`).
    """

    scan: str
    classes: np.ndarray
    probabilities: np.ndarray
    scores: list[dict]

    @property
    def qc(self) -> float:
        """The scan's mean quality score over the 14 structures."""
        return float(np.mean([row["qc"] for row in self.scores]))

    @property
    def agreement(self) -> float:
        """The scan's mean atlas agreement over the 14 structures (NaN without an atlas)."""
        return float(np.mean([row["atlas_agreement"] for row in self.scores]))


def segment_pool(net, pool: Sequence[tuple[str, dict]], progress: bool = True):
    """Segment every pool scan with ``net`` and score it, reading no label.

    Args:
        net: the teacher, in eval mode.
        pool: (scan id, prepared item with ``image`` and ``prior``) pairs.
        progress: show a progress bar.

    Returns:
        One :class:`PoolSegmentation` per scan, in order.
    """
    from rich.progress import track

    out = []
    steps = track(pool, description="segmenting the unlabelled scans") if progress else pool
    for scan, item in steps:
        volume = np.asarray(item["image"][0])
        classes, probabilities = inference.segment(net, volume, item["prior"])
        scores = quality.structure_scores(classes, probabilities, item["prior"])
        out.append(PoolSegmentation(scan, classes, probabilities, scores))
    return out


def pool_quality(segmentations: Sequence[PoolSegmentation]) -> float:
    """The pool's quality score: the mean over its scans and structures."""
    return float(np.mean([s.qc for s in segmentations]))


def pool_agreement(segmentations: Sequence[PoolSegmentation]) -> float:
    """The pool's atlas agreement: the mean over its scans and structures (NaN: no atlas)."""
    return float(np.mean([s.agreement for s in segmentations]))


def reliable_structures(segmentations: Sequence[PoolSegmentation]) -> np.ndarray:
    """Which structures of which scans to learn from: n_scans × 15 booleans (background True).

    A structure is kept unless ``qc.csv``'s rule would flag it: its score below
    :data:`~subseg.evaluation.quality.ABSOLUTE_FLAG`, or (pools of at least
    :data:`~subseg.evaluation.quality.MIN_BATCH` scans) below
    :data:`~subseg.evaluation.quality.RELATIVE_FLAG` of its median over the pool.
    """
    scores = np.array([[row["qc"] for row in s.scores] for s in segmentations])
    keep = scores >= quality.ABSOLUTE_FLAG
    if len(segmentations) >= quality.MIN_BATCH:
        median = np.median(scores, axis=0)
        keep &= scores >= quality.RELATIVE_FLAG * median[None, :]
    return np.concatenate([np.ones((len(segmentations), 1), bool), keep], axis=1)


def pseudo_samples(
    segmentation: PoolSegmentation,
    item: dict,
    structures: np.ndarray,
    confidence: float,
    rng: np.random.Generator,
    limit: int | None = None,
) -> tuple[SubjectSamples, dict]:
    """A pool scan's training samples, labelled by its teacher where the answer is reliable.

    Args:
        segmentation: the teacher's answer on the scan.
        item: the prepared scan (``image``, ``prior``).
        structures: 15 booleans: which classes of this scan may be learnt from
            (:func:`reliable_structures`).
        confidence: the least teacher probability of a voxel's class.
        rng: the draw of background voxels and of the subset kept.
        limit: keep at most this many samples (as ``sampling.samples_per_subject``).

    Returns:
        (the samples, ``{"candidates", "kept", "structures_kept"}``: voxels the sampler offered,
        how many were reliable, and how many of the 14 structures were learnt from).
    """
    prior = item["prior"]
    classes = segmentation.classes
    coords, targets = sample_voxels(classes, rng)
    low = np.array([s.start for s in prior.box])
    high = np.array([s.stop for s in prior.box])
    inside = np.all((coords >= low) & (coords < high), axis=1)  # the network answered there
    local = np.clip(coords - low, 0, high - low - 1)
    answered = segmentation.probabilities[(targets, *local.T)]
    if prior.structures.any():
        allowed = prior.probabilities()[(targets, *local.T)] > 0
    else:  # atlas=none: no expected place to check against
        allowed = np.ones(len(targets), bool)
    reliable = inside & (answered >= confidence) & allowed & structures[targets]
    coords, targets = coords[reliable], targets[reliable]
    if limit is not None and len(coords) > limit:
        keep = np.sort(rng.choice(len(coords), size=limit, replace=False))
        coords, targets = coords[keep], targets[keep]
    samples = SubjectSamples(
        volume=torch.as_tensor(np.asarray(item["image"][0]), dtype=torch.float32),
        coords=torch.from_numpy(coords),
        targets=torch.from_numpy(targets.astype(np.int64)),
        prior=torch.from_numpy(prior_at(prior, coords)),
    )
    record = {
        "candidates": int(len(inside)),
        "kept": int(reliable.sum()),
        "structures_kept": int(structures[1:].sum()),
    }
    return samples, record
