"""BIDS layout: the T1w scans of a BIDS dataset, and the names of subseg's derivative outputs.

A BIDS dataset (https://bids-specification.readthedocs.io) keeps each subject's anatomical scans
in ``sub-<label>/[ses-<label>/]anat/``, named by key-value entities and a suffix:
``sub-01_ses-1_acq-mprage_run-1_T1w.nii.gz``. subseg's outputs of such a dataset form a BIDS
Derivatives dataset: the scan's own ``sub-``/``ses-`` folders, its entities with
``desc-subseg`` and a derivative suffix (``_dseg`` for the segmentation, ``_probseg`` for the
probabilities), a ``dseg.tsv`` naming the ids the segmentations hold, and a
``dataset_description.json``.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from subseg.core import io
from subseg.core import labels as label_protocol

PIPELINE = "subseg"
"""The ``desc-`` label of every derivative file, and the ``GeneratedBy`` name."""

BIDS_VERSION = "1.9.0"
"""The BIDS specification the derivative dataset follows."""

DESCRIPTION = "dataset_description.json"
"""A BIDS dataset's description file, at its root."""

LOOKUP = "dseg.tsv"
"""The derivative root's table of the ids the ``_dseg`` files hold (it applies to all of them)."""

DSEG = "dseg.nii.gz"
"""The suffix and extension of a segmentation."""

T1W_NAMES = ("_T1w.nii.gz", "_T1w.nii")
"""How a T1-weighted scan's file name ends."""

LOOKUP_COLUMNS = ["index", "name"]
VOLUME_COLUMNS = ["index", "name", "volume_mm3", "qc"]

_ENTITY = re.compile(r"(?P<key>[a-zA-Z0-9]+)-(?P<value>[a-zA-Z0-9]+)")


def is_dataset(folder: str | os.PathLike) -> bool:
    """Whether a folder is a BIDS dataset's root (``dataset_description.json``, ``sub-*``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    if (folder / DESCRIPTION).is_file():
        return True
    return any(p.name.startswith("sub-") and p.is_dir() for p in folder.iterdir())


def entities(path: str | os.PathLike) -> list[tuple[str, str]]:
    """A BIDS file name's entities in order: ``sub-01_ses-1_T1w.nii.gz`` → sub 01, ses 1.

    Raises:
        io.InputError: the name is not ``sub-<label>[_<key>-<label>…]_<suffix>.<extension>``.
    """
    path = Path(path)
    *pairs, _suffix = path.name.split(".")[0].split("_")
    matches = [_ENTITY.fullmatch(p) for p in pairs]
    if not pairs or not all(matches) or matches[0]["key"] != "sub":
        raise io.InputError(
            f"{path}: not a BIDS file name (sub-<label>[_ses-<label>][_<key>-<label>…]_T1w.nii.gz)"
        )
    return [(m["key"], m["value"]) for m in matches]


def _check_folders(root: Path, path: Path) -> None:
    """Refuse a scan whose ``sub``/``ses`` entities are not its folders' (outputs go by them)."""
    found = dict(entities(path))
    folders = path.parent.relative_to(root).parts[:-1]  # sub-X[/ses-Y] (the last one is anat)
    for folder in folders:
        key, _, value = folder.partition("-")
        if found.get(key) != value:
            raise io.InputError(
                f"{path}: its name does not hold {folder} of its folder; name it as BIDS does "
                f"(sub-<label>[_ses-<label>]_…_T1w.nii.gz in sub-<label>/[ses-<label>/]anat/)"
            )


def dataset_of_subject(folder: str | os.PathLike) -> Path | None:
    """The BIDS dataset a subject's folder (``<root>/sub-X``) belongs to, or ``None``."""
    folder = Path(folder)
    if folder.is_dir() and folder.name.startswith("sub-") and is_dataset(folder.parent):
        return folder.parent
    return None


def find_t1w(root: str | os.PathLike, subject: str = "sub-*") -> list[Path]:
    """Every T1w scan of a BIDS dataset: ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``, any entities.

    ``derivatives/``, ``sourcedata/`` and hidden files are not looked into (only the ``sub-*``
    folders at the root are).

    Args:
        root: the dataset's root folder.
        subject: one subject's folder name (``sub-01``) to look in only; default: all.

    Returns:
        The scans, sorted, as paths under ``root``.

    Raises:
        io.InputError: no T1w scan, or one whose name is not a BIDS name matching its folders.
    """
    root = Path(root)
    found = []
    for anat in sorted([*root.glob(f"{subject}/anat"), *root.glob(f"{subject}/ses-*/anat")]):
        if not anat.is_dir():
            continue
        for path in sorted(anat.iterdir()):
            if path.name.startswith(".") or not path.name.endswith(T1W_NAMES):
                continue  # hidden: macOS "._x.nii.gz", interrupted writes
            if path.is_file():
                _check_folders(root, path)
                found.append(path)
    if not found:
        where = root if subject == "sub-*" else root / subject
        raise io.InputError(
            f"{where}: a BIDS {'dataset' if subject == 'sub-*' else 'subject'} with no T1w scan "
            f"({subject}/[ses-*/]anat/*_T1w.nii[.gz])"
        )
    return found


@dataclass(frozen=True)
class DerivativeNames:
    """Where one scan's outputs go in the derivative dataset.

    Attributes:
        scan: the scan's name in whole-batch tables (its file name without extension).
        dseg: the segmentation, ``sub-X/[ses-Y/]anat/<entities>_desc-subseg_dseg.nii.gz``.
        probseg: the probabilities (15 volumes in ``dseg.tsv``'s order), ``…_probseg.nii.gz``.
        volumes: the scan's volume table, ``…_desc-subseg_volumes.tsv``.
        qc: the QC figure, ``sub-X/figures/<entities>_desc-subseg_dseg.png`` (as fMRIPrep
            keeps its figures, outside ``anat/``).
    """

    scan: str
    dseg: Path
    probseg: Path
    volumes: Path
    qc: Path


def derivative_names(
    root: str | os.PathLike, scan: str | os.PathLike, out_dir: str | os.PathLike
) -> DerivativeNames:
    """Name a BIDS scan's outputs in a derivative dataset at ``out_dir``.

    The scan's entities are kept in order (``sub``, ``ses``, ``acq``, ``run`` …), a ``desc``
    entity becomes ``desc-subseg``.

    Args:
        root: the BIDS dataset the scan is in.
        scan: the scan (under ``root``).
        out_dir: the derivative dataset's root.
    """
    root, scan, out_dir = Path(root), Path(scan), Path(out_dir)
    kept = [(k, v) for k, v in entities(scan) if k != "desc"] + [("desc", PIPELINE)]
    prefix = "_".join(f"{k}-{v}" for k, v in kept)
    folder = scan.parent.relative_to(root)  # sub-X[/ses-Y]/anat
    anat = out_dir / folder
    return DerivativeNames(
        scan=scan.name.split(".")[0],
        dseg=anat / f"{prefix}_{DSEG}",
        probseg=anat / f"{prefix}_probseg.nii.gz",
        volumes=anat / f"{prefix}_volumes.tsv",
        qc=out_dir / folder.parts[0] / "figures" / f"{prefix}_dseg.png",
    )


def lookup_rows(raw_ids: label_protocol.LabelSpec | None = None) -> list[dict]:
    """The rows of ``dseg.tsv``: background and the 14 structures with the ids written.

    Args:
        raw_ids: the protocol whose raw ids the segmentations hold (``predict.py raw_ids=``);
            ``None`` for classes 0–14.
    """
    if raw_ids:  # the first raw id of each structure: what labels.map_to_raw writes
        ids = [0, *(ids[0] for ids in label_protocol.raw_ids(raw_ids).values())]
    else:
        ids = list(range(label_protocol.NUM_CLASSES))
    names = ["background", *label_protocol.STRUCTURES]
    return [{"index": i, "name": name} for i, name in zip(ids, names, strict=True)]


def read_lookup(path: str | os.PathLike) -> list[dict] | None:
    """The rows of an existing ``dseg.tsv`` (values as text), or ``None`` if unreadable."""
    try:
        with open(path, newline="") as f:
            return [
                {k: row.get(k) for k in LOOKUP_COLUMNS} for row in csv.DictReader(f, delimiter="\t")
            ]
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def same_lookup(path: str | os.PathLike, raw_ids: label_protocol.LabelSpec | None) -> bool:
    """Whether an existing ``dseg.tsv`` lists exactly the ids this batch writes."""
    wanted = [{k: str(v) for k, v in row.items()} for row in lookup_rows(raw_ids)]
    return read_lookup(path) == wanted


def write_lookup(out_dir: str | os.PathLike, raw_ids: label_protocol.LabelSpec | None) -> Path:
    """Write ``dseg.tsv`` at the derivative root (atomically); return its path."""
    return io.write_tsv(lookup_rows(raw_ids), LOOKUP_COLUMNS, Path(out_dir) / LOOKUP)


def write_volumes(
    path: str | os.PathLike, rows: Sequence[Mapping], raw_ids: label_protocol.LabelSpec | None
) -> Path:
    """Write a scan's volume table (``index``, ``name``, ``volume_mm3``, ``qc``) atomically.

    Args:
        path: the table (:attr:`DerivativeNames.volumes`).
        rows: the scan's rows of ``volumes.csv`` (``structure``, ``volume_mm3``, ``qc``).
        raw_ids: as in :func:`lookup_rows`: ``index`` is the id the segmentation holds.
    """
    index = {row["name"]: row["index"] for row in lookup_rows(raw_ids)}
    table = [
        {
            "index": index[r["structure"]],
            "name": r["structure"],
            "volume_mm3": r["volume_mm3"],
            "qc": r["qc"],
        }
        for r in rows
    ]
    return io.write_tsv(table, VOLUME_COLUMNS, path)


def version() -> str:
    """The installed version of subseg."""
    try:
        return metadata.version("subseg")
    except metadata.PackageNotFoundError:
        return "unknown"


def _source(root: Path) -> dict:
    """A ``SourceDatasets`` entry: where the source dataset is, and its DOI if it says one."""
    entry = {"URL": root.resolve().as_uri()}
    try:
        doi = json.loads((root / DESCRIPTION).read_text()).get("DatasetDOI")
    except (OSError, ValueError, AttributeError):
        doi = None  # no or an unreadable description: the URL alone says where it came from
    if isinstance(doi, str) and doi:
        entry["DOI"] = doi
    return entry


def description(sources: Iterable[str | os.PathLike], earlier: Mapping | None = None) -> dict:
    """The derivative dataset's ``dataset_description.json``.

    Args:
        sources: the BIDS datasets segmented.
        earlier: the description subseg wrote there before, if any: its sources are kept (the
            folder still holds their segmentations).
    """
    listed = [_source(Path(root)) for root in sources]
    old = (earlier or {}).get("SourceDatasets")
    for entry in old if isinstance(old, list) else []:
        if isinstance(entry, dict) and entry.get("URL") not in {e["URL"] for e in listed}:
            listed.append(entry)
    return {
        "Name": "subseg segmentations of 14 sub-cortical structures",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": PIPELINE,
                "Version": version(),
                "Description": "Sub-cortical segmentation (dseg: ids in dseg.tsv; probseg: one "
                "volume per row of dseg.tsv)",
            }
        ],
        "SourceDatasets": listed,
    }


def write_description(out_dir: str | os.PathLike, sources: Iterable[str | os.PathLike]) -> Path:
    """Write ``dataset_description.json`` at the derivative root (atomically); return its path.

    Sources of an existing description are kept; call it only on a description subseg wrote.
    """
    path = Path(out_dir) / DESCRIPTION
    try:
        earlier = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        earlier = None
    record = description(sources, earlier if isinstance(earlier, dict) else None)
    with io.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return path
