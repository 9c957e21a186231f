"""Segment a subject: ROI from the atlas prior → dense probabilities → argmax → post-processing.

Post-processing (docs/method.md §6): for each class 1..14, keep the 6-connected component with the
most voxels inside the post-processing mask (the atlas support dilated by 5); every other voxel
of that class becomes background. MONAI's ``KeepLargestConnectedComponent`` keeps the *largest*
component, not the one the atlas supports, hence the few lines below. A class the network does
not predict stays absent (the released code filled the whole volume with it).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from subseg.core.labels import NUM_CLASSES
from subseg.model import dense
from subseg.model.network import SubcorticalNet
from subseg.preprocessing import atlas

_SIX_CONNECTED = ndimage.generate_binary_structure(3, 1)


def postprocess(classes: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Keep, per class, the 6-connected component with the most voxels inside ``mask``.

    Args:
        classes: X×Y×Z class map (0..14).
        mask: X×Y×Z boolean post-processing mask.

    Returns:
        A new class map; dropped components become background. A class with no component
        inside the mask is dropped entirely.
    """
    out = np.zeros_like(classes)
    for cls in range(1, NUM_CLASSES):
        components, count = ndimage.label(classes == cls, _SIX_CONNECTED)
        if count == 0:
            continue
        inside = np.bincount(components[mask], minlength=count + 1)
        inside[0] = 0
        if inside.max() > 0:
            out[components == int(np.argmax(inside))] = cls
    return out


@torch.no_grad()
def segment(
    model: SubcorticalNet, volume: np.ndarray, prior: atlas.Prior, postprocessing: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Segment one z-scored volume inside its ROI.

    Args:
        model: the network, in eval mode.
        volume: X×Y×Z z-scored T1 (canonical).
        prior: the subject's atlas prior and ROI.
        postprocessing: keep one atlas-supported component per class.

    Returns:
        (X×Y×Z uint8 class map, 15×x×y×z probabilities inside ``prior.box``; zero outside the ROI).
    """
    roi = prior.regions > 0  # inside the box; nonzero order matches the full grid's
    box_probs = prior.probabilities()
    probs = (
        dense.dense_probabilities(
            model,
            torch.from_numpy(np.asarray(volume, np.float32)),
            torch.from_numpy(prior.roi),
            torch.from_numpy(box_probs[:, roi].T.copy()),
        )
        .cpu()
        .numpy()
    )
    probabilities = np.zeros((NUM_CLASSES, *roi.shape), np.float32)
    probabilities[:, roi] = probs.T
    classes = np.zeros(prior.shape, np.uint8)
    classes[prior.box] = np.where(roi, probabilities.argmax(axis=0), 0)
    if postprocessing:
        classes[prior.box] = postprocess(classes[prior.box], prior.regions > 1)
    return classes, probabilities
