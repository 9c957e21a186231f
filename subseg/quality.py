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

from subseg.atlas import Prior
from subseg.labels import STRUCTURES

COLUMNS = ("confidence", "atlas_agreement", "qc")
RELATIVE_FLAG = 0.75
"""Flag a scan when a structure scores below this fraction of its batch median."""
ABSOLUTE_FLAG = 0.25
"""Flag a scan when a structure scores below this, whatever the batch."""
MIN_BATCH = 3
"""Fewer scans than this have no batch median to compare with: only the absolute rule holds."""


def _dice(a_sum: float, b_sum: float, overlap: float) -> float:
    # From sums: MONAI's compute_dice wants one-hot tensors of both maps, and a soft one here.
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


def scan_table(rows: Sequence[dict]) -> list[dict]:
    """``qc.csv``: one row per scan, the likeliest wrong first.

    The score's level differs by structure (the amygdala's atlas agreement is low on every
    scan), so each score is compared with the same structure's median over the batch: a scan is
    flagged when a structure scores below :data:`RELATIVE_FLAG` of that median (batches of at
    least :data:`MIN_BATCH` scans), or below :data:`ABSOLUTE_FLAG` whatever the batch (a
    structure missing or nearly so).

    A scan with a warning (left and right exchanged, not skull-stripped), in its rows'
    ``warnings``, is flagged too, the warning in ``warnings``.

    Args:
        rows: ``subject``, ``structure`` and ``qc`` of every segmented structure (and, optionally,
            the scan's ``warnings``).

    Returns:
        Rows of :data:`SCAN_COLUMNS`, sorted by the worst structure's relative score.
    """
    by_scan: dict[str, list[dict]] = {}
    for row in rows:
        by_scan.setdefault(row["subject"], []).append(row)
    compare = len(by_scan) >= MIN_BATCH
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
        table.append(
            {
                "subject": subject,
                "qc_mean": float(np.mean([r["qc"] for r in mine])),
                "worst_structure": worst["structure"],
                "worst_qc": worst["qc"],
                "worst_vs_batch": relative[worst["structure"]],
                "flagged": bool(low) or bool(mine[0].get("warnings")),
                "why": "; ".join(
                    f"{r['structure']} {r['qc']:.2f} ({relative[r['structure']]:.2f} of the "
                    "batch median)"
                    for r in sorted(low, key=lambda r: relative[r["structure"]])
                ),
                "warnings": mine[0].get("warnings") or "",
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
)
