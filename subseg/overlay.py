"""Orthogonal-slice overlays of the 14 structures on a T1: the first thing a user looks at.

Used for cohort previews, atlas-prior checks and the per-subject QC image of a segmentation.
Arrays are in canonical (RAS+) orientation; slices are drawn with the voxel size honoured so that
thick-slice scans are not squashed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap, to_rgb
from matplotlib.figure import Figure

from subseg import io
from subseg import labels as label_protocol

# One hue per structure, right a shade darker than left, so pairs read as pairs.
_HUES = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#17becf", "#e377c2"]


def _palette() -> ListedColormap:
    colours = [(0, 0, 0, 0)]
    for hue in _HUES:
        rgb = np.array(to_rgb(hue))
        colours += [(*(rgb * 0.75), 0.6), (*rgb, 0.6)]
    return ListedColormap(colours)


PLANES = ("axial", "coronal", "sagittal")


def slice_planes(
    image: np.ndarray, classes: np.ndarray | None, centre: Sequence[int]
) -> list[tuple[np.ndarray, np.ndarray | None, int]]:
    """Cut axial, coronal and sagittal slices through ``centre`` (canonical RAS arrays).

    Returns:
        For each plane: the image slice and class slice, transposed so that rows run
        inferior→superior or posterior→anterior as radiologists expect with ``origin="lower"``,
        and the index of the array axis the slice is normal to.
    """
    cuts = []
    for axis in (2, 1, 0):  # axial (S), coronal (A), sagittal (R)
        take = [slice(None)] * 3
        take[axis] = int(centre[axis])
        img = image[tuple(take)].T
        cls = None if classes is None else classes[tuple(take)].T
        cuts.append((img, cls, axis))
    return cuts


def structure_centre(classes: np.ndarray | None, image: np.ndarray) -> tuple[int, int, int]:
    """The centroid of the structures, or of the brain when there are none."""
    mask = classes > 0 if classes is not None and np.any(classes) else image != 0
    return tuple(int(round(c)) for c in np.argwhere(mask).mean(axis=0))


def draw_row(
    axes: Sequence[Axes],
    image: np.ndarray,
    classes: np.ndarray | None,
    spacing: Sequence[float],
    title: str = "",
    outline: np.ndarray | None = None,
) -> None:
    """Draw one subject's three orthogonal slices into three matplotlib axes.

    Args:
        axes: three axes (axial, coronal, sagittal).
        image: canonical T1 array.
        classes: canonical class map (0..14) or ``None``.
        spacing: voxel size along the canonical axes, in mm.
        title: put before the plane name.
        outline: optional boolean mask (e.g. the ROI) drawn as a yellow contour.
    """
    palette = _palette()
    nonzero = image[image != 0]
    low, high = np.percentile(nonzero, [1, 99.5]) if nonzero.size else (0, 1)
    centre = structure_centre(classes, image)
    outlines = (
        [None] * 3 if outline is None else [c for _, c, _ in slice_planes(image, outline, centre)]
    )
    for ax, (img, cls, axis), plane, edge in zip(
        axes, slice_planes(image, classes, centre), PLANES, outlines, strict=True
    ):
        shown = [a for a in range(3) if a != axis]  # columns = shown[0], rows = shown[1]
        aspect = spacing[shown[1]] / spacing[shown[0]]
        ax.imshow(img, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspect)
        if cls is not None:
            ax.imshow(
                np.ma.masked_equal(cls, 0),
                cmap=palette,
                vmin=0,
                vmax=label_protocol.NUM_CLASSES - 1,
                origin="lower",
                aspect=aspect,
                interpolation="nearest",
            )
        if edge is not None and edge.any() and not edge.all():
            ax.contour(edge.astype(float), levels=[0.5], colors="yellow", linewidths=0.7)
        ax.set_title(f"{title} {plane}".strip(), fontsize=8)
        ax.axis("off")


def save_overlay(
    image: np.ndarray,
    classes: np.ndarray | None,
    spacing: Sequence[float],
    path: str | Path,
    title: str = "",
    outline: np.ndarray | None = None,
) -> Path:
    """Write a PNG of one subject's three orthogonal slices with the structures overlaid.

    Args:
        image: canonical T1 array.
        classes: canonical class map (0..14) or ``None``.
        spacing: voxel size along the canonical axes, in mm.
        path: PNG to write (atomically).
        title: figure title.
        outline: optional boolean mask drawn as a contour.

    Returns:
        The path written.
    """
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 3)
    draw_row(axes, image, classes, spacing, outline=outline)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save a matplotlib figure atomically (figures are built without pyplot: no display)."""
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    return Path(path)
