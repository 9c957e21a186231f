"""Left/right and label sanity checks that warn, never fail.

A label map whose protocol has the sides exchanged, a label array stored mirrored against its
header, or a header whose orientation is wrong gives a model that trains and scores "fine" with
left and right swapped. Each structure's centroid in world coordinates tells: in RAS+ world
coordinates (nibabel's, NIfTI's) +x points to the subject's *right*, so every right structure
must lie at a larger x than its left twin.

Warnings go to the ``subseg`` logger (Hydra prints them), one line each naming the file, and each
(file, message) is reported once per process: a label is loaded many times in one run.
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np

from subseg.core import labels as label_protocol

LOGGER = logging.getLogger("subseg")

_reported: set[tuple[str, str]] = set()
_lock = threading.Lock()

_HINT = "sides exchanged? check the label mapping or the header's orientation"


def warn_once(name: str | os.PathLike, message: str) -> bool:
    """Log ``subseg: warning: <name>: <message>`` unless that exact warning was logged before.

    Args:
        name: the file the warning is about.
        message: what is wrong (one line).

    Returns:
        Whether the warning was logged now.
    """
    key = (str(name), message)
    with _lock:
        if key in _reported:
            return False
        _reported.add(key)
    LOGGER.warning("subseg: warning: %s: %s", name, message)
    return True


def centroids_x(classes: np.ndarray, affine: np.ndarray) -> dict[int, float]:
    """World x (mm, RAS+) of the centroid of each class present in a segmentation.

    Args:
        classes: 3-D array of output classes (0 background, 1..14).
        affine: the 4×4 voxel → world affine of ``classes`` as stored in that array's orientation.

    Returns:
        Class → centroid x, for the classes 1..14 with at least one voxel.
    """
    classes = np.asarray(classes)
    if classes.ndim != 3:
        raise ValueError(f"expected a 3-D segmentation, got shape {classes.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"expected a 4x4 affine, got shape {affine.shape}")
    ints = np.rint(classes).astype(np.int64, copy=False) if classes.dtype.kind == "f" else classes
    n = label_protocol.NUM_CLASSES
    index = np.nonzero((ints > 0) & (ints < n))
    values = ints[index].astype(np.int64)
    counts = np.bincount(values, minlength=n)
    # world x of a voxel is affine[0, :3] · (i, j, k) + affine[0, 3]: only the foreground voxels.
    x = sum(affine[0, axis] * index[axis].astype(np.float64) for axis in range(3))
    sums = np.bincount(values, weights=x, minlength=n)
    return {int(c): float(sums[c] / counts[c] + affine[0, 3]) for c in range(1, n) if counts[c] > 0}


def side_problems(classes: np.ndarray, affine: np.ndarray) -> list[str]:
    """Describe each left/right pair whose right structure does not lie right of its left twin.

    Args:
        classes: 3-D array of output classes (0 background, 1..14).
        affine: the 4×4 voxel → world (RAS+) affine of ``classes``; for a
            :class:`subseg.core.io.Volume`, its ``affine`` (the canonical one), not
            ``original_affine``.

    Returns:
        One phrase per swapped pair, in class order, e.g. ``"right putamen lies left of left
        putamen"``; empty when every pair present is on its side. A pair with either structure
        absent is skipped.
    """
    x = centroids_x(classes, affine)
    problems = []
    for right, left in label_protocol.LEFT_RIGHT_PAIRS:
        if right in x and left in x and not x[right] > x[left]:
            problems.append(
                f"{label_protocol.structure_name(right)} lies left of "
                f"{label_protocol.structure_name(left)}"
            )
    return problems


def side_warning(classes: np.ndarray, affine: np.ndarray) -> str | None:
    """The one-line warning text (without file name) for :func:`side_problems`, or ``None``."""
    problems = side_problems(classes, affine)
    if not problems:
        return None
    more = len(problems) - 1
    extra = f" (and {more} more pair{'s' if more > 1 else ''})" if more else ""
    return f"{problems[0]}{extra} — {_HINT}"


def warn_sides(classes: np.ndarray, affine: np.ndarray, name: str | os.PathLike) -> str | None:
    """Warn (once per file and message) when a segmentation's left/right pairs are swapped.

    Args:
        classes: 3-D array of output classes (0 background, 1..14), e.g. a predicted segmentation.
        affine: its 4×4 voxel → world (RAS+) affine (a ``Volume``'s ``affine`` for data on its
            canonical grid).
        name: the file to name in the warning.

    Returns:
        The warning's text after the file name, or ``None`` when the sides are right.
    """
    message = side_warning(classes, affine)
    if message is not None:
        warn_once(name, message)
    return message


def warn_label(
    name: str | os.PathLike,
    present: np.ndarray,
    classes: np.ndarray,
    affine: np.ndarray,
    spec: label_protocol.LabelSpec,
) -> list[str]:
    """Warn about a loaded label map's unexplained ids, missing structures and swapped sides.

    Args:
        name: the label file.
        present: the distinct raw ids in the file.
        classes: the file's output classes (:func:`subseg.core.labels.map_to_classes`), 3-D.
        affine: voxel → world (RAS+) affine of ``classes``.
        spec: the cohort's protocol name or explicit mapping.

    Returns:
        The warnings' texts (after the file name), logged once per file and message.
    """
    messages = []
    unexpected = label_protocol.unexpected_ids(present, spec)
    if unexpected:
        shown = ", ".join(str(i) for i in unexpected[:12])
        if len(unexpected) > 12:
            shown += f" … ({len(unexpected)} ids)"
        if len(unexpected) == 1:
            verb, become = "is", "becomes"
            what = f"an id of the {spec} protocol" if isinstance(spec, str) else ""
            shown = f"raw id {shown}"
        else:
            verb, become = "are", "become"
            what = f"ids of the {spec} protocol" if isinstance(spec, str) else ""
            shown = f"raw ids {shown}"
        what = what or "in the label mapping"
        messages.append(
            f"{shown} {verb} not {what} and {become} background — is label_ids right for this file?"
        )
    found = set(np.unique(classes).tolist())
    missing = [
        label_protocol.structure_name(c)
        for c in range(1, label_protocol.NUM_CLASSES)
        if c not in found
    ]
    if missing:
        messages.append(
            f"no voxel of {', '.join(missing)} ({len(missing)} of the "
            f"{label_protocol.NUM_CLASSES - 1} structures missing) — wrong label_ids or a "
            "partial label?"
        )
    sides = side_warning(classes, affine)
    if sides is not None:
        messages.append(sides)
    for message in messages:
        warn_once(name, message)
    return messages
