"""The 14-structure output protocol and the raw label-id tables of the cohorts we read.

Class 0 is background; classes 1..14 follow docs/method.md §1 (right before left). A raw label
map from any protocol is mapped to classes through a lookup table in which every raw id not listed
maps to background; MONAI's ``MapLabelValue`` passes unlisted ids through unchanged, which would
leak cortex or ventricles into the class range, hence this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources

import numpy as np
import yaml


@cache
def _tables() -> dict:
    text = resources.files(__package__).joinpath("label_tables.yaml").read_text()
    return yaml.safe_load(text)


STRUCTURES: tuple[str, ...] = tuple(_tables()["structures"])
"""Structure names in output-class order: ``STRUCTURES[c - 1]`` is class ``c``."""

NUM_CLASSES = len(STRUCTURES) + 1
"""Output classes including background (15)."""

PROTOCOLS: tuple[str, ...] = tuple(_tables()["protocols"])
"""Names of the built-in raw-id tables (``miccai2012``, ``aseg``, ``cerebra``)."""

LEFT_RIGHT_PAIRS: tuple[tuple[int, int], ...] = tuple(
    (STRUCTURES.index(f"right_{name}") + 1, STRUCTURES.index(f"left_{name}") + 1)
    for name in dict.fromkeys(s.split("_", 1)[1] for s in STRUCTURES)
)
"""(right class, left class) for each of the seven structures."""


def class_of(structure: str) -> int:
    """Return the output class of a structure name such as ``"left_putamen"``."""
    return STRUCTURES.index(structure) + 1


def mirror_class(cls: int) -> int:
    """Return the class of the same structure in the other hemisphere (0 stays 0)."""
    for right, left in LEFT_RIGHT_PAIRS:
        if cls == right:
            return left
        if cls == left:
            return right
    if cls == 0:
        return 0
    raise ValueError(f"not an output class: {cls}")


LabelSpec = str | Mapping[str, int | Sequence[int]]


class LabelSpecError(ValueError):
    """A label protocol name or mapping (a user's configuration) is unusable."""


def raw_ids(spec: LabelSpec) -> dict[str, tuple[int, ...]]:
    """Resolve a label protocol to the raw ids of each of the 14 structures.

    Args:
        spec: a protocol name from ``PROTOCOLS`` or an explicit mapping from every structure name
            to one raw id or a list of raw ids (a cohort whose protocol splits a structure).

    Returns:
        Structure name → tuple of raw ids, in output-class order.

    Raises:
        LabelSpecError: unknown protocol, a structure missing from the mapping, an unknown structure
            name, or one raw id given to two structures.
    """
    if isinstance(spec, str):
        if spec not in PROTOCOLS:
            raise LabelSpecError(f"unknown label protocol {spec!r}; choose one of {PROTOCOLS}")
        spec = _tables()["protocols"][spec]
    if not isinstance(spec, Mapping):
        raise LabelSpecError(f"label_ids must be a protocol name or a mapping, not {spec!r}")
    unknown = set(spec) - set(STRUCTURES)
    missing = [s for s in STRUCTURES if s not in spec]
    if unknown or missing:
        raise LabelSpecError(
            f"label mapping must name exactly the 14 structures; unknown {sorted(unknown)}, "
            f"missing {missing}"
        )
    table = {}
    for name in STRUCTURES:
        ids = spec[name]
        ids = list(ids) if isinstance(ids, Sequence) and not isinstance(ids, str) else [ids]
        # bool is an int subclass, and a string would be read digit by digit: both are mistakes.
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise LabelSpecError(f"{name}: raw ids must be integers, got {spec[name]!r}")
        if 0 in ids:
            raise LabelSpecError(f"{name}: raw id 0 is background and cannot name a structure")
        table[name] = tuple(int(i) for i in ids)
    flat = [i for ids in table.values() for i in ids]
    if len(flat) != len(set(flat)):
        raise LabelSpecError(f"a raw id is given to two structures: {table}")
    return table


def class_lookup(spec: LabelSpec) -> dict[int, int]:
    """Return raw id → output class for a protocol (ids not in it are background)."""
    return {raw: cls for cls, ids in enumerate(raw_ids(spec).values(), 1) for raw in ids}


def reference_tissue_ids(protocol: str) -> dict[str, int]:
    """Raw ids of tissues outside the 14 structures (ventricles, white matter) in a protocol."""
    return dict(_tables()["reference_tissues"].get(protocol, {}))


def structure_name(cls: int) -> str:
    """Return a class's structure as people write it (``"left putamen"``); 0 is background."""
    return "background" if cls == 0 else STRUCTURES[cls - 1].replace("_", " ")


# Every raw id a file of a built-in protocol may legitimately hold, as inclusive ranges. The
# tables above list only the 14 structures and a few reference tissues, but real label maps hold
# many more tissues (cortex, white matter, ventricles, cerebellum, CSF …) that rightly become
# background; warning about them for every file would bury the warnings that matter. An id
# outside these ranges, though, is not of the protocol at all (another numbering, a resampled
# or probabilistic map) and is worth a warning.
_DOCUMENTED_ID_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    # Neuromorphometrics numbering of the MICCAI 2012 challenge: non-cortical 4..76, cortex
    # 100..207.
    "miccai2012": ((1, 207),),
    # FreeSurferColorLUT ids that recon-all's label volumes hold: aseg (≤ 255, corpus callosum
    # 251..255), aparc+aseg cortex (1000s, 2000s), wmparc (3000s, 4000s, 5001, 5002) and
    # aparc.a2009s+aseg (11100s, 12100s). IBSR 18 uses the same numbering.
    "aseg": (
        (1, 255),
        (1000, 1035),
        (2000, 2035),
        (3000, 3035),
        (4000, 4035),
        (5001, 5002),
        (11100, 11175),
        (12100, 12175),
    ),
    # CerebrA: 51 regions per hemisphere, right 1..51, left 52..102.
    "cerebra": ((1, 102),),
}


def unexpected_ids(present: Sequence[int] | np.ndarray, spec: LabelSpec) -> list[int]:
    """Return the raw ids of a label file that a protocol does not explain (they become background).

    Background (0) and the structures' ids are expected. For a built-in protocol so is every id of
    its documented numbering (other tissues, see ``_DOCUMENTED_ID_RANGES``); for an explicit
    mapping nothing else is known, so every other non-zero id is reported.

    Args:
        present: the distinct raw ids found in a label file.
        spec: the cohort's protocol name or explicit mapping.

    Returns:
        The unexplained ids, sorted.
    """
    ids = np.unique(np.asarray(present, dtype=np.int64))
    known = np.isin(ids, [0, *class_lookup(spec)])
    if isinstance(spec, str):
        for low, high in _DOCUMENTED_ID_RANGES.get(spec, ()):
            known |= (ids >= low) & (ids <= high)
        known |= np.isin(ids, list(reference_tissue_ids(spec).values()))
    return [int(i) for i in ids[~known]]


def map_to_classes(raw: np.ndarray, spec: LabelSpec) -> np.ndarray:
    """Map a raw label map to output classes; every unlisted id becomes background.

    Args:
        raw: integer (or integer-valued float) label array of any shape.
        spec: the cohort's protocol name or explicit mapping (see :func:`raw_ids`).

    Returns:
        A ``uint8`` array of classes 0..14 with the shape of ``raw``.
    """
    return _apply_lookup(raw, class_lookup(spec), np.uint8)


def raw_dtype(spec: LabelSpec) -> np.dtype:
    """The smallest integer type that holds every id :func:`map_to_raw` writes for ``spec``.

    uint8, int16 or int32 (NIfTI readers handle these widely), so that an id such as 40001 is
    written as itself, never wrapped round (``int16`` made it −25535).

    Raises:
        LabelSpecError: an id outside the 32-bit integer range.
    """
    written = [0, *(ids[0] for ids in raw_ids(spec).values())]
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= min(written) and max(written) <= info.max:
            return np.dtype(dtype)
    raise LabelSpecError(
        f"raw ids {min(written)}..{max(written)} do not fit a 32-bit integer label file"
    )


def map_to_raw(classes: np.ndarray, spec: LabelSpec) -> np.ndarray:
    """Map output classes back to a protocol's raw ids (the first id of each structure).

    Args:
        classes: array of classes 0..14.
        spec: the protocol to write in.

    Returns:
        An ``int32`` array of raw ids; background stays 0. Write it as :func:`raw_dtype`.
    """
    inverse = {cls: ids[0] for cls, ids in enumerate(raw_ids(spec).values(), 1)}
    return _apply_lookup(classes, inverse, np.int32)


def _apply_lookup(values: np.ndarray, lookup: Mapping[int, int], dtype) -> np.ndarray:
    ints = np.rint(values).astype(np.int64)
    keys = np.fromiter(lookup, dtype=np.int64, count=len(lookup))
    vals = np.fromiter(lookup.values(), dtype=np.int64, count=len(lookup))
    order = np.argsort(keys)
    keys, vals = keys[order], vals[order]
    # searchsorted works for any id range (negative or huge ids included) without a dense LUT.
    pos = np.clip(np.searchsorted(keys, ints), 0, len(keys) - 1)
    hit = keys[pos] == ints
    return np.where(hit, vals[pos], 0).astype(dtype)
