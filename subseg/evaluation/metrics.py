"""Per-structure evaluation: Dice, 95th-percentile Hausdorff, ASSD, volumes; Avg and wDSC.

Distances use MONAI's surface-distance metrics with the voxel spacing, so they are in mm.
wDSC is docs/method.md §8's reconstruction of the paper's weighted Dice: per subject,
Σ DSC_l / V_l² ÷ Σ 1 / V_l² with V_l the reference volume, then averaged over subjects.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
)
from monai.networks.utils import one_hot

from subseg.core.labels import NUM_CLASSES, STRUCTURES

COLUMNS = ("subject", "structure", "dsc", "hd95_mm", "assd_mm", "vol_ref_mm3", "vol_pred_mm3")


def structure_metrics(
    subject: str, prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]
) -> list[dict]:
    """One row per structure (the ``metrics.csv`` contract).

    Args:
        subject: subject id.
        prediction: X×Y×Z predicted classes.
        reference: X×Y×Z reference classes.
        spacing: voxel size in mm along the array axes.

    Returns:
        Rows with the keys of :data:`COLUMNS`; distances are NaN where a structure is missing
        from either map.
    """
    ref_counts = np.bincount(reference.ravel(), minlength=NUM_CLASSES)
    pred_counts = np.bincount(prediction.ravel(), minlength=NUM_CLASSES)
    # Every metric depends only on the structures: crop to their joint bounding box (with a
    # background margin, so surfaces are found as in the whole volume) — a 1 mm head has ~6 M
    # voxels, the structures' box ~0.2 M.
    box = _structure_box(prediction, reference, margin=2)
    prediction, reference = prediction[box], reference[box]
    pred, true = _one_hot(prediction), _one_hot(reference)
    dice = _dice(pred, true)
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():  # absent structures: reported as NaN below
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)  # raised inside MONAI itself
        hd95 = compute_hausdorff_distance(pred, true, percentile=95, spacing=spacing)[0]
        assd = compute_average_surface_distance(pred, true, symmetric=True, spacing=spacing)[0]
    voxel = float(np.prod(spacing))
    rows = []
    for index, name in enumerate(STRUCTURES):
        cls = index + 1
        missing = ref_counts[cls] == 0 or pred_counts[cls] == 0
        rows.append(
            {
                "subject": subject,
                "structure": name,
                "dsc": float(dice[index]),
                "hd95_mm": float("nan") if missing else float(hd95[index]),
                "assd_mm": float("nan") if missing else float(assd[index]),
                "vol_ref_mm3": float(ref_counts[cls] * voxel),
                "vol_pred_mm3": float(pred_counts[cls] * voxel),
            }
        )
    return rows


def dice_per_structure(prediction: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Dice of each of the 14 structures, in :data:`STRUCTURES` order.

    NaN where the reference lacks the structure. The one Dice every score of subseg uses.
    """
    return _dice(_one_hot(prediction), _one_hot(reference)).numpy()


def _one_hot(classes: np.ndarray) -> torch.Tensor:
    return one_hot(torch.from_numpy(classes.astype(np.int64))[None, None], NUM_CLASSES)


def _dice(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    return compute_dice(pred, true, include_background=False, ignore_empty=True)[0]


def _structure_box(a: np.ndarray, b: np.ndarray, margin: int) -> tuple[slice, ...]:
    index = np.argwhere((a > 0) | (b > 0))
    if index.size == 0:
        return tuple(slice(0, 1) for _ in a.shape)
    low = np.maximum(index.min(axis=0) - margin, 0)
    high = np.minimum(index.max(axis=0) + 1 + margin, a.shape)
    return tuple(slice(int(lo), int(hi)) for lo, hi in zip(low, high, strict=True))


def weighted_dice(dsc: np.ndarray, reference_volumes: np.ndarray) -> float:
    """docs/method.md §8's wDSC of one subject: Σ DSC_l / V_l² ÷ Σ 1 / V_l²."""
    volumes = np.asarray(reference_volumes, dtype=np.float64)
    dsc = np.asarray(dsc, dtype=np.float64)
    present = (volumes > 0) & np.isfinite(dsc)  # a structure absent from the reference is skipped
    if not present.any():
        return float("nan")
    weights = 1.0 / volumes[present] ** 2
    return float(np.sum(weights * dsc[present]) / np.sum(weights))


def summarize(rows: Sequence[dict]) -> dict:
    """``summary.json``: Avg (mean of the 14 mean DSCs), wAvg, per-structure mean/std/n.

    A structure missing from a subject's reference label has no Dice for that subject: its mean
    is over the ``n`` subjects that have it (the report says so when ``n`` is short).
    """
    subjects = sorted({r["subject"] for r in rows})
    per_structure = {}
    for name in STRUCTURES:
        values = np.array([r["dsc"] for r in rows if r["structure"] == name], dtype=float)
        finite = values[np.isfinite(values)]
        per_structure[name] = {
            "mean": float(finite.mean()) if finite.size else float("nan"),
            "std": float(finite.std()) if finite.size else float("nan"),
            "n": int(finite.size),  # subjects whose reference has the structure
        }
    weighted = []
    for subject in subjects:
        mine = [r for r in rows if r["subject"] == subject]
        weighted.append(weighted_dice([r["dsc"] for r in mine], [r["vol_ref_mm3"] for r in mine]))
    return {
        "avg": float(np.nanmean([v["mean"] for v in per_structure.values()])),
        "wavg": float(np.nanmean(weighted)),
        "n_subjects": len(subjects),
        "per_structure": per_structure,
    }


def main(argv: list[str] | None = None) -> None:
    """Command line: the Dice of two segmentations of one scan, structure by structure.

    ``python -m subseg.evaluation.metrics a_seg.nii.gz b_seg.nii.gz`` (class ids 0-14, as
    ``predict.py`` writes them; ``--ids aseg`` for raw ids). Used to check that a raw scan and its
    skull-stripped twin get the same structures (README, "Your scans").
    """
    import argparse

    from subseg.core import io, labels

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("first", help="a segmentation (NIfTI or .mgz)")
    parser.add_argument("second", help="another segmentation of the same scan grid")
    parser.add_argument("--ids", default=None, help="raw id protocol (aseg, miccai2012, cerebra)")
    args = parser.parse_args(argv)
    with io.cli_errors():
        first = io.load_label(args.first)
        second = io.load_label(args.second, image=first)
        maps = [m.data for m in (first, second)]
        if args.ids:
            maps = [labels.map_to_classes(m, args.ids) for m in maps]
        elif max(int(m.max()) for m in maps) >= NUM_CLASSES:
            raise io.InputError(f"{args.first}: holds ids above 14: give --ids (e.g. aseg)")
        rows = structure_metrics("pair", maps[0], maps[1], first.spacing)
    for row in rows:
        print(f"{row['structure']:18s} {row['dsc']:.3f}")
    print(f"{'mean Dice':18s} {np.nanmean([r['dsc'] for r in rows]):.3f}")


if __name__ == "__main__":
    main()
