"""Patches for the patch network: built on the fly by vectorised indexing, never all at once.

A volume is zero-padded once (16 voxels before and 15 after on every axis, docs/method.md §2) and
held in memory; the three 32×32 patches of any batch of voxels are gathered from it with one
advanced-indexing operation per view. Planes in canonical (RAS) arrays:

- axial: fixed S (axis 2); rows run along R (axis 0), columns along A (axis 1);
- coronal: fixed A (axis 1); rows R (axis 0), columns S (axis 2);
- sagittal: fixed R (axis 0); rows A (axis 1), columns S (axis 2).

:mod:`subseg.model.dense` slices volumes in the same planes, so both evaluations see the same
pixels.
"""

from __future__ import annotations

import torch

from subseg.model.network import PATCH, VIEWS

BEFORE = PATCH // 2
"""Voxels of context before the centre (16); ``PATCH - BEFORE - 1`` (15) after."""
AFTER = PATCH - BEFORE - 1

VIEW_AXES = {"axial": (2, (0, 1)), "coronal": (1, (0, 2)), "sagittal": (0, (1, 2))}
"""View → (the fixed axis, the (row, column) axes of its patches)."""


def pad_volume(volume: torch.Tensor) -> torch.Tensor:
    """Zero-pad a 3-D volume by 16 before and 15 after on every axis (the patch context)."""
    # F.pad takes (before, after) pairs from the last axis backwards; all three are the same.
    return torch.nn.functional.pad(volume[None, None], (BEFORE, AFTER) * 3)[0, 0]


def extract_patches(padded: torch.Tensor, coords: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gather the axial, coronal and sagittal patches of a batch of voxels.

    Args:
        padded: a volume from :func:`pad_volume`.
        coords: N×3 integer voxel coordinates in the *unpadded* volume.

    Returns:
        View name → N×1×32×32 patches; the voxel sits at row 16, column 16.
    """
    offsets = torch.arange(PATCH, device=padded.device)
    coords = coords.to(device=padded.device, dtype=torch.long)
    patches = {}
    for view in VIEWS:
        fixed, (rows, cols) = VIEW_AXES[view]
        index: list[torch.Tensor] = [None, None, None]  # type: ignore[list-item]
        index[fixed] = (coords[:, fixed] + BEFORE)[:, None, None]
        index[rows] = coords[:, rows][:, None, None] + offsets[None, :, None]
        index[cols] = coords[:, cols][:, None, None] + offsets[None, None, :]
        patches[view] = padded[index[0], index[1], index[2]][:, None]
    return patches
