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
true Dice on the demo's target test scans. :func:`scan_table` flags the scans a user should open
first: a structure scoring far below the same structure on the batch's other scans.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from subseg.core.labels import STRUCTURES
from subseg.preprocessing.atlas import Prior

COLUMNS = ("confidence", "atlas_agreement", "qc")
RELATIVE_FLAG = 0.75
"""Flag a scan when a structure scores below this fraction of its batch median."""
ABSOLUTE_FLAG = 0.25
"""Flag a scan when a structure scores below this, whatever the batch."""
MIN_BATCH = 3
"""Fewer scans than this have no batch median to compare with: only the absolute rule holds."""
BRAIN_VOLUME_FLAG = 0.3
"""Flag a scan whose brain mask is this much larger or smaller (relative) than the reference.

Adult brain volumes vary by about 10 % (one standard deviation); a mask 30 % off the model's own
training scans (or the batch) has most likely lost a lobe or kept the scalp.
"""


def _dice(a_sum: float, b_sum: float, overlap: float) -> float:
    # From sums: MONAI's compute_dice wants one-hot tensors of both maps, and a soft one here.
    return 0.0 if a_sum + b_sum == 0 else float(2.0 * overlap / (a_sum + b_sum))


def structure_scores(classes: np.ndarray, probabilities: np.ndarray, prior: Prior) -> list[dict]:
    """The quality of each of the 14 structures of one segmentation.

    Args:
        classes: X×Y×Z class map on the subject's whole canonical grid (post-processed).
        probabilities: 15×x×y×z network probabilities inside ``prior.box`` (background first;
            zero outside the ROI), as :func:`subseg.model.inference.segment` returns them.
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


PRIOR_OUTSIDE_FLAG = 0.01
"""Flag a scan when more than this share of the atlas prior's core lies outside its brain mask."""


def mask_cut_warning(prior: Prior, mask: np.ndarray) -> str | None:
    """A warning for a brain mask that cuts into the sub-cortical structures' expected place.

    The prior's core (voxels where the 14 structures' probabilities add up to at least 0.5) is
    deep inside every brain; a mask that leaves part of it out has cut through the brain (or
    the registration followed a mask that had).

    Args:
        prior: the scan's registered atlas prior.
        mask: the scan's brain mask (canonical grid).
    """
    core = prior.structures.sum(axis=0) >= 0.5
    if not core.any():
        return None
    outside = float(np.count_nonzero(core & ~mask[prior.box]) / np.count_nonzero(core))
    if outside <= PRIOR_OUTSIDE_FLAG:
        return None
    return (
        f"the brain mask cuts into the sub-cortical structures ({outside:.0%} of the atlas "
        "prior's core lies outside it): check its outline in the QC figure (brain= chooses "
        "another extractor)"
    )


def brain_volume_warning(litres: float, reference: float | None, against: str) -> str | None:
    """A warning for a brain mask far from the reference volume (:data:`BRAIN_VOLUME_FLAG`).

    Args:
        litres: the scan's brain mask volume.
        reference: the typical brain volume (``None``: no warning can be given).
        against: what the reference is, for the message.
    """
    if reference is None or reference <= 0 or abs(litres / reference - 1) <= BRAIN_VOLUME_FLAG:
        return None
    side = "larger" if litres > reference else "smaller"
    return (
        f"brain mask {litres:.2f} L, {abs(litres / reference - 1):.0%} {side} than {against} "
        f"({reference:.2f} L): check its outline in the QC figure (brain= chooses another "
        "extractor)"
    )


def scan_table(
    rows: Sequence[dict], brain_reference: tuple[float, str] | None = None
) -> list[dict]:
    """``qc.csv``: one row per scan, the likeliest wrong first.

    The score's level differs by structure (the amygdala's atlas agreement is low on every
    scan), so each score is compared with the same structure's median over the batch: a scan is
    flagged when a structure scores below :data:`RELATIVE_FLAG` of that median (batches of at
    least :data:`MIN_BATCH` scans), or below :data:`ABSOLUTE_FLAG` whatever the batch (a
    structure missing or nearly so).

    A scan with a warning (left and right exchanged, a brain mask that cuts into the atlas
    prior), in its rows' ``warnings``, is flagged too, the warning in ``warnings``; so is a scan
    whose brain mask volume (``brain_litres``) is far from ``brain_reference``, or else from the
    batch median (:func:`brain_volume_warning`).

    Args:
        rows: ``subject``, ``structure`` and ``qc`` of every segmented structure (and, optionally,
            the scan's ``warnings``, ``extraction`` and ``brain_litres``).
        brain_reference: (litres, what they are) to compare each brain mask with, e.g. the
            median of the model's own training scans.

    Returns:
        Rows of :data:`SCAN_COLUMNS`, sorted by the worst structure's relative score.
    """
    by_scan: dict[str, list[dict]] = {}
    for row in rows:
        by_scan.setdefault(row["subject"], []).append(row)
    compare = len(by_scan) >= MIN_BATCH
    brains = [r[0].get("brain_litres") for r in by_scan.values()]
    if brain_reference is None and compare and all(b is not None for b in brains):
        brain_reference = (float(np.median(brains)), "the batch median")
    median = {
        name: float(np.median([r["qc"] for r in rows if r["structure"] == name]))
        for name in {r["structure"] for r in rows}
    }
    table = []
    for subject, mine in by_scan.items():
        relative = {
            r["structure"]: (
                r["qc"] / median[r["structure"]] if median[r["structure"]] > 0 else 1.0
            )
            for r in mine
        }
        low = [
            r
            for r in mine
            if r["qc"] < ABSOLUTE_FLAG or (compare and relative[r["structure"]] < RELATIVE_FLAG)
        ]
        worst = min(mine, key=lambda r: (relative[r["structure"]], r["qc"]))
        warnings = [mine[0].get("warnings") or ""]
        if mine[0].get("brain_litres") is not None and brain_reference is not None:
            warnings.append(
                brain_volume_warning(float(mine[0]["brain_litres"]), *brain_reference) or ""
            )
        warnings = "; ".join(w for w in warnings if w)
        table.append(
            {
                "subject": subject,
                "qc_mean": float(np.mean([r["qc"] for r in mine])),
                "worst_structure": worst["structure"],
                "worst_qc": worst["qc"],
                "worst_vs_batch": relative[worst["structure"]],
                "flagged": bool(low) or bool(warnings),
                "why": "; ".join(
                    f"{r['structure']} {r['qc']:.2f} ({relative[r['structure']]:.2f} of the "
                    "batch median)"
                    for r in sorted(low, key=lambda r: relative[r["structure"]])
                ),
                "warnings": warnings,
                "extraction": mine[0].get("extraction", ""),
                "brain_litres": mine[0].get("brain_litres", ""),
            }
        )
    return sorted(  # a scan with a warning first: its whole segmentation is in doubt
        table, key=lambda r: (not r["warnings"], r["worst_vs_batch"], r["worst_qc"], r["subject"])
    )


SCAN_COLUMNS = (
    "subject",
    "qc_mean",
    "worst_structure",
    "worst_qc",
    "worst_vs_batch",
    "flagged",
    "why",
    "warnings",
    "extraction",
    "brain_litres",
)
