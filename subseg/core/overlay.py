"""Orthogonal-slice overlays of the 14 structures on a T1: the first thing a user looks at.

Used for cohort previews, atlas-prior checks and the per-subject QC image of a segmentation.
Arrays are in canonical (RAS+) orientation; slices are drawn with the voxel size honoured so that
thick-slice scans are not squashed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap, Normalize, to_rgb
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.patches import Patch

from subseg.core import labels as label_protocol
from subseg.core.figures import save_figure

# One hue per structure, right a shade darker than left, so pairs read as pairs.
_HUES = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#17becf", "#e377c2"]


def _palette() -> ListedColormap:
    colours = [(0, 0, 0, 0)]
    for hue in _HUES:
        rgb = np.array(to_rgb(hue))
        colours += [(*(rgb * 0.75), 0.6), (*rgb, 0.6)]
    return ListedColormap(colours)


def _class_norm() -> Normalize:
    # Class c lands exactly on palette entry c only with this norm; draw_row and the legend share
    # it so that a legend patch is the colour the class is drawn in.
    return Normalize(vmin=0, vmax=label_protocol.NUM_CLASSES - 1)


def class_colour(cls: int) -> tuple[float, float, float, float]:
    """The palette colour of output class ``cls`` (1..14), made opaque for legend patches.

    The overlay itself is drawn semi-transparent over the T1; the legend shows the full colour so
    that right (darker) and left (lighter) of a pair stay distinguishable on a white background.
    """
    red, green, blue, _ = _palette()(_class_norm()(cls))
    return (red, green, blue, 1.0)


def structure_label(cls: int) -> str:
    """A short display name of output class ``cls``, e.g. ``"R thalamus"`` for class 1."""
    side, name = label_protocol.STRUCTURES[cls - 1].split("_", 1)
    return f"{side[0].upper()} {name.replace('_', ' ')}"


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
                norm=_class_norm(),
                origin="lower",
                aspect=aspect,
                interpolation="nearest",
            )
        if edge is not None and edge.any() and not edge.all():
            ax.contour(edge.astype(float), levels=[0.5], colors="yellow", linewidths=0.7)
        ax.set_title(f"{title} {plane}".strip(), fontsize=8)
        ax.axis("off")


def _present_classes(classes_present: np.ndarray | Iterable[int] | None) -> list[int]:
    structures = range(1, label_protocol.NUM_CLASSES)
    if classes_present is None:
        return list(structures)
    values = np.asarray(
        classes_present if isinstance(classes_present, np.ndarray) else list(classes_present)
    )
    # One comparison per class rather than np.unique: a full-resolution class map has ~10^7 voxels
    # and may be float (MONAI labels), where unique would sort and bincount would need a copy.
    return [c for c in structures if np.any(values == c)]


def add_legend(
    fig: Figure, classes_present: np.ndarray | Iterable[int] | None = None, fontsize: float = 8
) -> Legend:
    """Add a structure colour key along the bottom of a figure of overlays.

    The key sits in a band below the slices; :func:`save_figure` lays the axes out above that
    band, so no anatomy is hidden. Figures with several :func:`draw_row` rows need one call,
    just before :func:`save_figure`.

    Args:
        fig: the figure the overlays are drawn in.
        classes_present: a class map (any shape, e.g. the drawn volume) or the output classes to
            list; ``None`` lists all 14 structures. Background and values outside 1..14 are
            ignored.
        fontsize: font size of the entries, in points.

    Returns:
        The figure legend. Its handles are opaque patches in the palette colour of each class,
        listed in class order so that with two rows each column is one right/left pair.
    """
    classes = _present_classes(classes_present)
    handles = [Patch(facecolor=class_colour(c), edgecolor="none") for c in classes]
    labels = [structure_label(c) for c in classes]
    legend = fig.legend(
        handles,
        labels,
        loc="lower center",
        bbox_to_anchor=(0.5, 0.0),
        # Two rows filled column by column: classes alternate right/left, so each column is a
        # pair with the darker right shade above the left, which is how the palette reads.
        ncols=max(1, (len(classes) + 1) // 2),
        fontsize=fontsize,
        frameon=False,
        handlelength=1.2,
        columnspacing=1.2,
        borderaxespad=0.3,
        # An empty key still says so, rather than silently suggesting the overlay was skipped.
        title=None if classes else "no structures in the class map",
        title_fontsize=fontsize,
    )
    return legend


def overlay_figure(
    image: np.ndarray,
    classes: np.ndarray | None,
    spacing: Sequence[float],
    title: str = "",
    outline: np.ndarray | None = None,
) -> Figure:
    """Build the figure :func:`save_overlay` writes: three orthogonal slices and a colour key.

    Args:
        image: canonical T1 array.
        classes: canonical class map (0..14) or ``None``; when given, the key lists the structures
            present in it.
        spacing: voxel size along the canonical axes, in mm.
        title: figure title.
        outline: optional boolean mask drawn as a contour.

    Returns:
        The figure, not yet laid out (:func:`save_figure` does that).
    """
    # Taller than the slices need so that the key's band does not shrink them; the size does not
    # depend on ``classes`` so overlays of one subject with and without structures line up.
    fig = Figure(figsize=(10, 4.1))
    axes = fig.subplots(1, 3)
    draw_row(axes, image, classes, spacing, outline=outline)
    if classes is not None:
        add_legend(fig, classes)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_overlay(
    image: np.ndarray,
    classes: np.ndarray | None,
    spacing: Sequence[float],
    path: str | Path,
    title: str = "",
    outline: np.ndarray | None = None,
) -> Path:
    """Write a PNG of one subject's three orthogonal slices with the structures overlaid.

    A colour key of the structures present in ``classes`` is drawn below the slices.

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
    return save_figure(overlay_figure(image, classes, spacing, title, outline), path)
