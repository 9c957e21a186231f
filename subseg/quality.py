"""A quality score for every segmented structure, computed without a reference label.

A user who segments 200 scans cannot check them all; this score says which to look at first
(as SynthSeg's QC option does). Two label-free signals per structure, each on Dice's 0–1 scale:

- **confidence**: the soft Dice between the network's probability of the structure and its
  segmentation, 2 Σ p·s / (Σ p + Σ s) — the Dice the segmentation would have against the
  network's own probabilistic answer. Hesitant boundaries and probability mass outside the
  segmented component lower it.
- **atlas agreement**: the Dice between the segmentation and the registered atlas prior's most
  probable class. A structure that left its expected place (a failed registration, a swapped
  side, a component on the wrong tissue) loses it.

The score is their geometric mean: low when either is low. It is an estimate of how good a
segmentation is, not a Dice: ``docs/engineering.md`` has the rank correlation measured against
true Dice on the demo's target test scans. A scan is flagged when any structure scores below
the threshold (:data:`FLAG_BELOW`) — the ones a user should open first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from subseg.atlas import Prior
from subseg.labels import STRUCTURES

COLUMNS = ("confidence", "atlas_agreement", "qc")
FLAG_BELOW = 0.6
"""A scan is flagged when a structure's score is below this (see ``docs/engineering.md``)."""


def _dice(a_sum: float, b_sum: float, overlap: float) -> float:
    return 0.0 if a_sum + b_sum == 0 else float(2.0 * overlap / (a_sum + b_sum))


def structure_scores(classes: np.ndarray, probabilities: np.ndarray, prior: Prior) -> list[dict]:
    """The quality of each of the 14 structures of one segmentation.

    Args:
        classes: X×Y×Z class map on the subject's whole canonical grid (post-processed).
        probabilities: 15×x×y×z network probabilities inside ``prior.box`` (background first;
            zero outside the ROI), as :func:`subseg.inference.segment` returns them.
        prior: the subject's atlas prior.

    Returns:
        One dict per structure, in output-class order: ``structure``, ``confidence``,
        ``atlas_agreement`` and ``qc`` (0 for a structure the segmentation lacks). Without an
        atlas (``atlas=none``) the agreement is NaN and the score is the confidence alone.
    """
    segmented = classes[prior.box]
    expected = np.argmax(prior.probabilities(), axis=0)
    has_atlas = bool(prior.structures.any())  # atlas=none: no expected place to compare with
    rows = []
    for cls, name in enumerate(STRUCTURES, 1):
        mine = segmented == cls
        p = probabilities[cls]
        confidence = _dice(float(p.sum()), float(mine.sum()), float(p[mine].sum()))
        atlas_cls = expected == cls
        agreement = (
            _dice(float(atlas_cls.sum()), float(mine.sum()), float(atlas_cls[mine].sum()))
            if has_atlas
            else float("nan")
        )
        rows.append(
            {
                "structure": name,
                "confidence": confidence,
                "atlas_agreement": agreement,
                "qc": float(np.sqrt(confidence * agreement)) if has_atlas else confidence,
            }
        )
    return rows


def scan_summary(subject: str, scores: Sequence[dict], threshold: float = FLAG_BELOW) -> dict:
    """One scan's row of ``qc.csv``: its worst structure, mean score and whether it is flagged.

    Args:
        subject: the scan's id.
        scores: :func:`structure_scores` of the scan.
        threshold: flag the scan when a structure scores below this.
    """
    worst = min(scores, key=lambda s: s["qc"])
    low = [s["structure"] for s in scores if s["qc"] < threshold]
    return {
        "subject": subject,
        "qc_min": worst["qc"],
        "worst_structure": worst["structure"],
        "qc_mean": float(np.mean([s["qc"] for s in scores])),
        "flagged": bool(low),
        "low_structures": " ".join(low),
    }


SCAN_COLUMNS = ("subject", "qc_min", "worst_structure", "qc_mean", "flagged", "low_structures")
