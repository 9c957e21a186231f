"""A cohort is data, not code: its subjects from a ``conf/dataset/*.yaml`` entry, and its splits.

A dataset entry names a root folder, file patterns with an ``{id}`` placeholder (a list of
patterns when published train and test sets live in different folders, or the files may be
``.nii`` or ``.nii.gz``; a ``*`` matches any part of one folder or file name, e.g. a BIDS
session or ``acq-`` entity), the label protocol, an optional published test list, and seeded
split fractions. Synthetic cohorts also carry a
``synth:`` block and are generated on first use. Splits are drawn once and written to the run
folder (``splits.json``); a resumed or re-evaluated run reads them back rather than redrawing.
"""

from __future__ import annotations

import csv
import glob
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from subseg.core import cache, io
from subseg.data import synth


@dataclass(frozen=True)
class Subject:
    """One subject of a cohort.

    Attributes:
        id: subject id (the ``{id}`` of the file patterns).
        image: path of the skull-stripped T1.
        label: path of the raw label map, or ``None`` for unlabelled subjects.
        group: scanner sub-group from ``subjects.csv``, when the cohort has one.
    """

    id: str
    image: Path
    label: Path | None
    group: str | None = None

    def as_item(self) -> dict:
        """The dictionary a MONAI pipeline takes."""
        return {
            "id": self.id,
            "image": str(self.image),
            "label": None if self.label is None else str(self.label),
            "group": self.group,
        }


def _patterns(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _hidden(root: Path, path: Path) -> bool:
    """Whether a file below ``root`` is hidden or in a hidden folder (``._x.nii.gz``, ``.git``)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _discover_ids(root: Path, patterns: Sequence[str]) -> list[str]:
    ids = set()
    for pattern in patterns:
        # Every occurrence of {id} must hold the same id (IBSR_{id}/IBSR_{id}_ana_strip.nii.gz);
        # a * is any part of one name, as in the glob.
        first, *rest = (re.escape(part).replace(r"\*", "[^/]*") for part in pattern.split("{id}"))
        groups = [r"(?P<id>[^/]+?)" if i == 0 else "(?P=id)" for i in range(len(rest))]
        regex = re.compile(
            first + "".join(g + part for g, part in zip(groups, rest, strict=True)) + "$"
        )
        for path in root.glob(pattern.replace("{id}", "*")):
            if _hidden(root, path):
                continue
            match = regex.match(path.relative_to(root).as_posix())
            if match:
                ids.add(match.group("id"))
    return sorted(ids)


def _expected(root: Path, patterns: Sequence[str], sid: str) -> Path:
    return root / patterns[0].replace("{id}", sid)


def _first_existing(root: Path, patterns: Sequence[str], sid: str) -> Path | None:
    """The subject's file of the first pattern that has one.

    Raises:
        io.InputError: a pattern with ``*`` matches several files of the subject (two
            sessions, two ``acq-`` scans): which one is meant is not for subseg to guess.
    """
    for pattern in patterns:
        if "*" not in pattern:
            candidate = root / pattern.replace("{id}", sid)
            if candidate.is_file():
                return candidate
            continue
        filled = pattern.replace("{id}", glob.escape(sid))
        found = sorted(p for p in root.glob(filled) if p.is_file() and not _hidden(root, p))
        if len(found) > 1:
            shown = ", ".join(str(p.relative_to(root)) for p in found[:3])
            raise io.InputError(
                f"{root / pattern.replace('{id}', sid)}: {len(found)} files of subject '{sid}' "
                f"match ({shown}{' …' if len(found) > 3 else ''}); name the one to use in the "
                "dataset's file pattern (e.g. dataset.session=<label> for a BIDS cohort)"
            )
        if found:
            return found[0]
    return None


def _read_groups(root: Path) -> dict[str, str]:
    table = root / "subjects.csv"
    if not table.is_file():
        return {}
    with open(table, newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a BOM
        reader = csv.DictReader(f)
        if "id" not in (reader.fieldnames or []):
            raise io.InputError(f"{table}: needs an 'id' column (and optionally 'group')")
        return {row["id"]: row.get("group") or None for row in reader}


def prepare(dataset: Mapping) -> Path:
    """Make sure a cohort exists on disk (generating a synthetic one if needed); return its root."""
    if dataset.get("root") in (None, "", "???"):
        raise io.InputError(
            f"dataset '{dataset.get('name')}' has no root folder: add dataset.root=/path/to/cohort"
        )
    root = Path(dataset["root"]).expanduser()
    spec = dataset.get("synth")
    if spec:
        params = synth.CohortParams(
            **{k: v for k, v in dict(spec).items() if k != "extra"},
            extra=dict(spec.get("extra") or {}),
        )
        synth.ensure_cohort(root, params)
    return root


def check_id(subject_id: str, where: str | Path = "subject ids") -> str:
    """Refuse a scan id that is not a plain file name; return it.

    Ids name files and folders inside run folders (``qc/<id>.png``, ``loo/<id>/``, which a new
    run clears): ``../x`` or ``a/b`` would put them, or their removal, outside the folder.

    Raises:
        io.InputError: the id is empty, ``.``/``..``, hidden, or holds a path separator.
    """
    text = str(subject_id)
    if (
        not text
        or text in (".", "..")
        or text.startswith(".")
        or any(c in text for c in ("/", "\\", "\0"))
        or text != text.strip()
    ):
        raise io.InputError(
            f"{where}: scan id {text!r} is not a plain file name (no /, \\, leading dot or "
            "surrounding spaces)"
        )
    return text


def file_digests(dataset: Mapping) -> dict[str, str]:
    """The sha256 of every image and label of a cohort, by path relative to its root.

    What a run's "complete" covers besides its config: a corrected label, an added or replaced
    scan changes these, so the run is redone (and the message names the file).
    """
    root = Path(dataset["root"]).expanduser().resolve()
    digests = {}
    for subject in list_subjects(dataset, require_labels=False):
        for path in (subject.image, subject.label):
            if path is not None:
                path = Path(path).resolve()
                name = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
                digests[name] = cache.file_digest(path)
    return digests


def same_cohort(a: Mapping, b: Mapping) -> bool:
    """Whether two dataset entries are one cohort: the same files, not the same name.

    Every custom cohort is called ``folder``, so names say nothing. Two entries are one cohort
    when their root and file patterns agree, or, for a cohort copied or moved elsewhere, when
    their images have the same content.
    """

    def where(d: Mapping):
        root = Path(str(d.get("root"))).expanduser().resolve()
        return root, _patterns(d.get("image")), _patterns(d.get("label"))

    if where(a) == where(b):
        return True
    try:
        images = [
            sorted(cache.file_digest(s.image) for s in list_subjects(d, require_labels=False))
            for d in (a, b)
        ]
    except io.InputError:  # one of them is not on this machine: not provably the same
        return False
    return images[0] == images[1]


def list_subjects(dataset: Mapping, require_labels: bool = True) -> list[Subject]:
    """List a cohort's subjects from its dataset entry.

    Args:
        dataset: a ``conf/dataset`` entry (``root``, ``image``, ``label``, optional ``ids``).
        require_labels: a subject without a label file is an error; otherwise it is listed
            with ``label=None`` (fine-tuning uses the labelled ones of a partly labelled cohort).

    Returns:
        Subjects sorted by id.

    Raises:
        io.InputError: the root is missing, no image matches, or a listed subject's image (or,
            with ``require_labels``, label) is missing.
    """
    root = prepare(dataset)
    name = dataset.get("name", root.name)
    if not root.is_dir():
        raise io.InputError(f"{root}: dataset '{name}' root folder does not exist")
    image_patterns, label_patterns = _patterns(dataset["image"]), _patterns(dataset.get("label"))
    ids = [
        check_id(str(i), root) for i in dataset.get("ids") or _discover_ids(root, image_patterns)
    ]
    if not ids:
        raise io.InputError(
            f"{root}: dataset '{name}' has no images matching {' or '.join(image_patterns)}"
        )
    groups = _read_groups(root)
    subjects = []
    for sid in ids:
        image = _first_existing(root, image_patterns, sid)
        if image is None:
            raise io.InputError(
                f"{_expected(root, image_patterns, sid)}: image of subject '{sid}' not found"
            )
        label = _first_existing(root, label_patterns, sid) if label_patterns else None
        if label_patterns and label is None and require_labels:
            raise io.InputError(
                f"{_expected(root, label_patterns, sid)}: label of subject '{sid}' not found"
            )
        subjects.append(Subject(sid, image, label, groups.get(sid)))
    return sorted(subjects, key=lambda s: s.id)


def make_splits(
    ids: Sequence[str],
    test_ids: Sequence[str] | None = None,
    test_fraction: float = 0.25,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Split subject ids into train / val / test.

    Args:
        ids: all subject ids.
        test_ids: the published test list; when given it is the test set as is.
        test_fraction: share drawn at random for testing when there is no published list.
        val_fraction: share of the remaining subjects held out for whole-volume validation.
        seed: seed of the draws.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each sorted.
    """
    ids = sorted(map(str, ids))
    rng = np.random.default_rng(seed)
    if test_ids is not None:
        test = sorted(map(str, test_ids))
        unknown = set(test) - set(ids)
        if unknown:
            raise io.InputError(f"test_ids not in the cohort: {sorted(unknown)}")
    else:
        n_test = int(round(test_fraction * len(ids)))
        test = sorted(rng.permutation(ids)[:n_test].tolist())
    rest = [i for i in ids if i not in set(test)]
    n_val = int(round(val_fraction * len(rest))) if len(rest) > 1 else 0
    val = sorted(rng.permutation(rest)[:n_val].tolist())
    train = [i for i in rest if i not in set(val)]
    return {"train": train, "val": val, "test": test}


def draw_target(
    ids: Sequence[str],
    n_images: int | str,
    draw: int = 0,
    test_ids: Sequence[str] | None = None,
    seed: int = 0,
    fold: int | None = None,
    chosen: Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """The target images of TL-k, draw j: nested (TL-k ⊂ TL-(k+1) for the same draw).

    One seeded permutation of the candidates per draw; TL-k takes its first ``k``. The test
    set is the published list, or every subject not drawn for training (docs/method.md §5).
    ``n_images="all"`` takes every candidate (full training on the target; with no published
    test list nothing is left to test, and the test list is empty); ``fold=i`` makes
    the i-th subject (sorted ids) the only test subject and every other a candidate: fold i of a
    leave-one-out. (To leave out a subject by id, give ``test_ids=[id]``.) ``chosen`` names the
    k images instead of drawing them: the scans a user labelled to adapt to.

    Args:
        ids: the cohort's subject ids.
        n_images: k, the labelled target images to fine-tune on (0: No TL), or ``"all"``.
        draw: j, which random draw.
        test_ids: the published test list, if any (never drawn for training).
        seed: the cohort's split seed.
        fold: leave-one-out fold, an index into the sorted ids: the only test subject.
        chosen: the training images by id (``n_images`` must be their number).

    Returns:
        ``{"train": [...], "val": [], "test": [...]}`` (validation is voxel-level).

    Raises:
        io.InputError: more images asked for than the cohort has outside its test list, a
            fold the cohort does not have, or chosen images that are not candidates.
    """
    ids = sorted(map(str, ids))
    published = None if test_ids is None else sorted(map(str, test_ids))
    if fold is not None:
        if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < len(ids):
            raise io.InputError(
                f"target.fold={fold}: the cohort has {len(ids)} subjects (folds 0..{len(ids) - 1})"
            )
        published = [ids[fold]]
    candidates = [i for i in ids if published is None or i not in set(published)]
    if n_images == "all":
        n_images = len(candidates)
    if isinstance(n_images, str) or not 0 <= n_images <= len(candidates):
        raise io.InputError(
            f"target.n_images={n_images}: the cohort has {len(candidates)} subjects to draw from"
            " (give a number or 'all')"
        )
    if chosen is not None:
        train = sorted(set(map(str, chosen)))
        unknown = [i for i in train if i not in set(candidates)]
        if unknown:
            raise io.InputError(
                f"target.ids: {', '.join(unknown)}: not a labelled scan of the cohort outside "
                "its test list"
            )
        if len(train) != n_images:
            raise io.InputError(
                f"target.ids names {len(train)} scans but target.n_images={n_images}: give "
                f"target.n_images={len(train)} (the run's k)"
            )
    else:
        order = np.random.default_rng([seed, draw]).permutation(candidates).tolist()
        train = sorted(order[:n_images])
    # Empty when every labelled scan is trained on: a user's own adaptation, which has no
    # held-out scan to measure (the fine-tuning run says so, and offers target.loo).
    test = published if published is not None else [i for i in ids if i not in set(train)]
    return {"train": train, "val": [], "test": test}


def default_splits(dataset: Mapping, subjects: Sequence[Subject]) -> dict[str, list[str]]:
    """A cohort's own train/val/test split (its ``split`` block and ``test_ids``).

    Raises:
        io.InputError: the cohort is too small to leave a subject to train on and one to test.
    """
    split = dict(dataset.get("split") or {})
    test_ids = dataset.get("test_ids")
    splits = make_splits(
        [s.id for s in subjects],
        None if test_ids is None else list(test_ids),
        split.get("test_fraction", 0.25),
        split.get("val_fraction", 0.2),
        split.get("seed", 0),
    )
    if not splits["train"] or not splits["test"]:
        raise io.InputError(
            f"{dataset.get('root')}: {len(subjects)} subject(s) leave {len(splits['train'])} to "
            f"train on and {len(splits['test'])} to test: give at least 2 labelled subjects"
        )
    return splits


def ensure_splits(
    path: str | Path,
    dataset: Mapping,
    subjects: Sequence[Subject] | None = None,
    splits: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, list[str]]:
    """Read a run's splits file, or draw the cohort's splits and write them there once.

    Args:
        path: the run's splits file (:attr:`subseg.runs.run_folder.RunFolder.splits_file`).
        dataset: the cohort's dataset entry (its ``split`` block: ``seed``, ``test_fraction``,
            ``val_fraction``; and ``test_ids`` when published).
        subjects: the cohort's subjects, if already listed.
        splits: splits drawn elsewhere (e.g. :func:`draw_target`) to write instead.

    Returns:
        The splits, as in :func:`make_splits`.
    """
    path = Path(path)
    subjects = subjects if subjects is not None else list_subjects(dataset)
    if path.is_file():
        stored = json.loads(path.read_text())
        kept = {k: stored[k] for k in ("train", "val", "test")}
        missing = {i for ids in kept.values() for i in ids} - {s.id for s in subjects}
        if stored.get("dataset") != dataset.get("name") or missing:
            raise io.InputError(
                f"{path}: holds the splits of dataset '{stored.get('dataset')}'"
                f"{' with subjects missing here' if missing else ''}; this run folder belongs "
                f"to another cohort: choose another run name (name=...)"
            )
        if splits is not None and any(sorted(splits[k]) != kept[k] for k in kept):
            raise io.InputError(
                f"{path}: holds other splits than this run draws; this run folder belongs "
                f"to another run: choose another run name (name=...)"
            )
        return kept
    split = dict(dataset.get("split") or {})
    if splits is None:
        splits = default_splits(dataset, subjects)
    splits = {k: sorted(map(str, splits[k])) for k in ("train", "val", "test")}
    record = {"dataset": dataset.get("name"), "seed": split.get("seed", 0), **splits}
    with io.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    return splits
