"""Dense against patch inference on one whole subject, with the same weights.

The subject is a 1 mm synthetic source subject; the ROI is its structures dilated by 15 voxels
(L1), the size an atlas ROI has. Dense evaluation runs over the whole ROI. Patch evaluation (the
reference implementation) is timed on a random sample of ROI voxels and its time per voxel
scaled to the whole ROI — evaluating every ROI voxel by patches takes tens of minutes here. The
largest probability difference is taken over the sampled voxels.

The two are timed alternately, ``REPEATS`` times each (a fresh sample of voxels every time), and
the ratio is that of the medians: the machine is often shared, and a burst of load on one side
only would otherwise move the ratio (about 1.5 min on 2 quiet cores).
"""

import statistics
import time

import torch
from common import record

from subseg.core import io, labels
from subseg.data import synth
from subseg.model import dense, patches
from subseg.model.network import NUM_CLASSES, VIEWS, SubcorticalNet
from subseg.preprocessing import atlas

SAMPLE = 4096
PATCH_BATCH = 512
REPEATS = 3


def main() -> None:
    torch.manual_seed(0)
    params = synth.CohortParams(domain="source", n_subjects=1, seed=42)
    root = synth.ensure_cohort("outputs/bench/subject", params, progress=False)
    image = io.load_image(root / "images" / "s000.nii.gz")
    raw = io.load_label(root / "labels" / "s000.nii.gz", image=image).data
    classes = labels.map_to_classes(raw, "miccai2012")
    roi = torch.from_numpy(atlas._regions(classes > 0, 15, 5) > 0)
    brain = image.data[image.data != 0]
    volume = torch.from_numpy((image.data - brain.mean()) / brain.std()).float()
    volume[torch.from_numpy(image.data == 0)] = 0
    coords = torch.nonzero(roi)
    prior = torch.softmax(torch.randn(len(coords), NUM_CLASSES), dim=1)
    model = SubcorticalNet().eval()

    padded = patches.pad_volume(volume)
    dense_times, patch_times, difference = [], [], 0.0
    for _ in range(REPEATS):
        sample = torch.randperm(len(coords))[:SAMPLE]
        start = time.perf_counter()
        with torch.no_grad():
            patch_probs = torch.cat(
                [
                    torch.softmax(model(*(b[v] for v in VIEWS), prior[idx]), dim=1)
                    for idx in sample.split(PATCH_BATCH)
                    for b in [patches.extract_patches(padded, coords[idx])]
                ]
            )
        patch_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        dense_probs = dense.dense_probabilities(model, volume, roi, prior)
        dense_times.append(time.perf_counter() - start)
        difference = max(difference, float((dense_probs[sample] - patch_probs).abs().max()))
    t_dense, t_sample = statistics.median(dense_times), statistics.median(patch_times)
    t_patch = t_sample / len(sample) * len(coords)
    record(
        "dense_vs_patch_inference",
        {
            "compared": f"patch vs dense evaluation of the same random weights over the ROI of one "
            f"1 mm subject ({len(coords)} voxels, grid {tuple(volume.shape)}), float32, "
            f"{torch.get_num_threads()} threads; patch time scaled from {len(sample)} "
            f"sampled voxels; medians of {REPEATS} alternating repeats",
            "seconds_dense": round(t_dense, 2),
            "seconds_patch": round(t_patch, 2),
            "seconds_patch_sample": round(t_sample, 2),
            "ratio_patch_over_dense": round(t_patch / t_dense, 1),
            "voxels_per_second_dense": round(len(coords) / t_dense),
            "voxels_per_second_patch": round(len(sample) / t_sample),
            "seconds_dense_repeats": [round(t, 2) for t in dense_times],
            "seconds_patch_sample_repeats": [round(t, 2) for t in patch_times],
            "max_abs_probability_difference": difference,
        },
    )


if __name__ == "__main__":
    main()
