"""Whether a T1 looks skull-stripped: the paper's pipeline (and subseg's models) start there.

A skull-stripped T1 is zero outside the brain, and a brain, cerebellum and brainstem included,
fills 1–2 L (the ICBM 2009c brain mask: 1.89 L). A scan whose non-zero voxels fill far more —
scalp, skull, neck and the noise of the air around them — is a raw head scan: segmented as it
is, its structures land in the wrong place (the prior's registration matches head to brain).
"""

from __future__ import annotations

import numpy as np

from subseg import io

MAX_BRAIN_LITRES = 2.6
"""Non-zero voxels filling more than this are not a brain alone (adult brains: 1–2 L)."""


def skull_warning(image: io.Volume) -> str | None:
    """A one-line warning for a scan that is clearly not skull-stripped, else ``None``.

    Args:
        image: the scan as loaded (:func:`subseg.io.load_image`).
    """
    litres = np.count_nonzero(image.data) * image.voxel_volume_mm3 / 1e6
    if litres <= MAX_BRAIN_LITRES:
        return None
    return (
        f"not skull-stripped? its non-zero voxels fill {litres:.1f} L (a brain: 1-2 L); "
        "strip the skull first (e.g. FSL BET, HD-BET, ROBEX) and segment the stripped scan"
    )
