"""Segment new scans with a trained model and report structure volumes: what ``predict.py`` runs.

A batch is checked whole before any scan is segmented (readable scans, distinct output names).
A scan that still fails while it is segmented is reported and skipped, the others finish, and
``volumes.csv`` lists exactly this batch's segmentations on disk: it is rewritten after each
scan, and each scan's segmentation is the last of its files to be written.

``out_dir`` is the user's folder as much as ours: one ``predict.py`` at a time writes it (its
lock), it may not be or hold a folder of input scans, and only files listed in its manifest
(:mod:`subseg.core.output_manifest`) are ever replaced or removed.

Inputs are files (NIfTI or FreeSurfer MGH), folders of them, BIDS datasets (their T1w scans;
outputs form a BIDS Derivatives dataset, :mod:`subseg.data.bids`) and FreeSurfer subject folders
(their ``mri/orig.mgz``, outputs named after the folder).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from rich.progress import track

from subseg.core import cache, io, overlay, sides
from subseg.core import labels as label_protocol
from subseg.core.folder_lock import FolderLock
from subseg.core.output_manifest import OutputManifest
from subseg.data import bids
from subseg.evaluation import quality
from subseg.model import inference
from subseg.preprocessing import brain
from subseg.runs.trained_model import model_of

VOLUME_COLUMNS = ["subject", "structure", "volume_mm3", "qc"]
FAILURE_COLUMNS = ["scan", "error"]


OUTPUT_KINDS = ("seg", "prob")
"""What subseg writes beside a scan's name (``<id>_seg.nii.gz``): never taken as a scan."""


def is_output_name(path: Path) -> bool:
    """Whether a NIfTI file is named as one of subseg's outputs (``*_seg``, ``*_prob``)."""
    return cache.stem(path).endswith(tuple(f"_{kind}" for kind in OUTPUT_KINDS))


FREESURFER_SCAN = Path("mri", "orig.mgz")
"""What a FreeSurfer subject folder is recognised by, and the scan of it that is segmented."""


def _items(spec) -> list[Path]:
    return [Path(i) for i in ([spec] if isinstance(spec, str | Path) else list(spec))]


def is_freesurfer_subject(folder: Path) -> bool:
    """Whether a folder is a FreeSurfer subject's (``<SUBJECTS_DIR>/<subject>/mri/orig.mgz``)."""
    return (folder / FREESURFER_SCAN).is_file()


def freesurfer_subjects(folder: Path) -> list[Path]:
    """The FreeSurfer subject folders in a ``SUBJECTS_DIR``, sorted.

    ``fsaverage*`` (FreeSurfer's template subjects, linked into every ``SUBJECTS_DIR`` by
    ``recon-all``) and hidden folders are not subjects.
    """
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _is_listed_subject(p))


def _is_listed_subject(path: Path) -> bool:
    """A subject of a ``SUBJECTS_DIR`` (not a hidden folder, not an ``fsaverage*`` template)."""
    return not path.name.startswith((".", "fsaverage")) and is_freesurfer_subject(path)


def is_subjects_dir(folder: Path) -> bool:
    """Whether a folder is a FreeSurfer ``SUBJECTS_DIR``: subject folders, no scans of its own.

    Checked before BIDS: fMRIPrep names FreeSurfer subjects ``sub-X``, so its ``freesurfer/``
    folder looks like a BIDS dataset but has no ``dataset_description.json``.
    """
    if not folder.is_dir() or (folder / bids.DESCRIPTION).is_file():
        return False
    if any(p.name.endswith(io.VOLUME_SUFFIXES) for p in folder.iterdir()):
        return False  # a folder of scans
    return any(_is_listed_subject(p) for p in folder.iterdir())


def _subject_of(folder: Path, scan: Path) -> str | None:
    """The subject folder's name when ``scan`` is a subject's in ``folder`` (a SUBJECTS_DIR)."""
    subject = scan.parent.parent
    if subject.parent == folder and scan == subject / FREESURFER_SCAN:
        return subject.name
    return None


def input_images(spec) -> list[Path]:
    """T1 files named by a file, a folder or a list of either.

    A folder is a FreeSurfer subject's (its ``mri/orig.mgz``), a BIDS dataset's root (its
    ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``, :func:`subseg.data.bids.find_t1w`) or one subject's
    folder of one (``sub-X/``: its scans, named as the dataset's would be), a folder of scans
    (every .nii, .nii.gz, .mgz and .mgh in it), or else a FreeSurfer ``SUBJECTS_DIR`` (the
    ``mri/orig.mgz`` of each subject folder in it). A folder of scans' ``*_seg`` and
    ``*_prob`` files, and files its subseg manifest lists, are outputs (subseg's, or labels
    named like them), not scans: they are left out, and a line says so.
    """
    files = []
    for item in _items(spec):
        if item.is_dir() and is_freesurfer_subject(item):
            files.append(item / FREESURFER_SCAN)
        elif is_subjects_dir(item):
            files += [subject / FREESURFER_SCAN for subject in freesurfer_subjects(item)]
        elif bids.is_dataset(item):
            files += bids.find_t1w(item)
        elif bids.dataset_of_subject(item) is not None:  # one subject of a dataset: sub-X/
            files += bids.find_t1w(bids.dataset_of_subject(item), item.name)
        elif item.is_dir():
            ours = set(OutputManifest(item).files)
            candidates = [
                p
                for p in item.iterdir()
                if p.name.endswith(io.VOLUME_SUFFIXES) and not p.name.startswith(".")
            ]
            found = sorted(p for p in candidates if not is_output_name(p) and p.name not in ours)
            if len(found) < len(candidates):
                print(
                    f"subseg: {item}: {len(candidates) - len(found)} file(s) named as outputs "
                    "(*_seg, *_prob) or written by subseg are not taken as scans",
                    file=sys.stderr,
                )
            if not found:
                raise io.InputError(
                    f"{item}: no .nii, .nii.gz, .mgz or .mgh scans in this folder (nor FreeSurfer "
                    "subject folders with mri/orig.mgz, nor a BIDS dataset)"
                )
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise io.InputError(f"{item}: no such file or folder")
    return files


@dataclass(frozen=True)
class ScanOutputs:
    """Where one scan's outputs go (:func:`scan_outputs`).

    Attributes:
        name: the scan's name in ``volumes.csv`` and ``qc.csv``.
        seg: its segmentation.
        prob: its probabilities (with ``probabilities=true``).
        qc: its QC figure.
        volumes: its own volume table (BIDS derivatives only).
    """

    name: str
    seg: Path
    prob: Path
    qc: Path
    volumes: Path | None = None

    @property
    def files(self) -> list[Path]:
        """Every file of the scan, the segmentation first."""
        return [p for p in (self.seg, self.prob, self.qc, self.volumes) if p is not None]


def scan_outputs(spec, out_dir: Path, scan: Path) -> ScanOutputs:
    """Name a scan's outputs by how the input named the scan.

    A scan of a BIDS dataset given as input gets BIDS Derivatives names under ``out_dir``
    (:func:`subseg.data.bids.derivative_names`); the ``mri/orig.mgz`` of a FreeSurfer subject folder
    is named after that folder; any other scan after its file name, in ``out_dir`` itself:
    ``<name>_seg.nii.gz``, ``<name>_prob.nii.gz``, ``<name>_qc.png``.

    Args:
        spec: the input as given (``cfg.input``).
        out_dir: the output folder.
        scan: one of :func:`input_images`'s files.
    """
    name = cache.stem(scan)
    for item in _items(spec):
        if item.is_dir() and is_freesurfer_subject(item):
            if scan == item / FREESURFER_SCAN:
                name = item.resolve().name  # "." names the folder it is
                break
        elif _subject_of(item, scan):  # <SUBJECTS_DIR>/<subject>/mri/orig.mgz (paths only)
            name = _subject_of(item, scan)
            break
        elif scan.is_relative_to(item) and _bids_root(item) is not None:
            named = bids.derivative_names(_bids_root(item), scan, out_dir)
            return ScanOutputs(named.scan, named.dseg, named.probseg, named.qc, named.volumes)
    return ScanOutputs(
        name, *(out_dir / f"{name}_{kind}" for kind in ("seg.nii.gz", "prob.nii.gz", "qc.png"))
    )


def _bids_root(item: Path) -> Path | None:
    """The BIDS dataset an input is (its root) or is a subject of (``sub-X/``), or ``None``."""
    if is_freesurfer_subject(item) or is_subjects_dir(item):
        return None
    return item if bids.is_dataset(item) else bids.dataset_of_subject(item)


def bids_roots(spec) -> list[Path]:
    """The BIDS datasets that inputs are, or are subjects of (a derivative dataset's sources)."""
    roots = [_bids_root(i) for i in _items(spec)]
    return list(dict.fromkeys(r for r in roots if r is not None))


def check_batch(files: list[Path], spec=None) -> None:
    """Refuse a batch before any scan is segmented: duplicate output names, unreadable scans.

    Outputs are named by the scan's file name (or its FreeSurfer subject folder, or its BIDS
    name), so two ``T1.nii.gz`` from different folders would overwrite each other; a bad scan
    found at the end of a long batch would waste it.

    Args:
        files: the scans.
        spec: the input as given, to name them as :func:`scan_outputs` does; without it, by
            their file names.
    """
    taken: dict[str | Path, Path] = {}
    for path in files:
        if spec is None:
            keys = [cache.stem(path)]
        else:  # the name in the tables, and the segmentation (BIDS: a desc- entity is replaced)
            named = scan_outputs(spec, Path(), path)
            keys = [named.name, named.seg]
        for key in keys:
            twin = taken.setdefault(key, path)
            if twin != path:
                raise io.InputError(
                    f"{path}: has the same name as {twin}; their outputs would overwrite each "
                    "other (segment them into different out_dir=)"
                )
    for path in track(files, description="checking inputs"):
        io.load_image(path)  # one line naming the file on a bad one


def check_out_dir(out_dir: Path, spec, files: list[Path]) -> None:
    """Refuse an ``out_dir`` that is, or holds, a folder of input scans.

    Outputs beside the scans mix with the user's files (a manual ``<id>_seg.nii.gz`` has the
    very name of an output) and become inputs of the next folder run.

    Raises:
        io.InputError: one line naming the input folder.
    """
    items = [spec] if isinstance(spec, str | Path) else list(spec)
    folders = {Path(i).resolve() for i in items if Path(i).is_dir()}
    folders |= {f.resolve().parent for f in files}
    out = out_dir.resolve()
    for folder in sorted(folders):
        if folder == out or folder.is_relative_to(out):
            where = "is" if folder == out else "holds"
            raise io.InputError(
                f"{out_dir}: out_dir {where} the input folder {folder}; write the outputs to a "
                "folder of their own (out_dir=...)"
            )


def segment_scan(
    net,
    prepare,
    path: Path,
    cfg: DictConfig,
    out_dir: Path,
    manifest: OutputManifest,
    preprocess: dict | None = None,
) -> list[dict]:
    """Segment one scan and write its outputs, each recorded in ``manifest``.

    Args:
        net: the network.
        prepare: the model's input pipeline
            (:meth:`subseg.preprocessing.contract.InputContract.pipeline`).
        path: the scan.
        cfg: the predict config.
        out_dir: the output folder.
        manifest: its output manifest.
        preprocess: the model's ``preprocess`` entry (``prepare`` extracted the brain with it).

    Returns:
        The scan's rows of ``volumes.csv``, with its ``warnings``, ``extraction`` (how its brain
        was found) and ``brain_litres``.
    """
    named = scan_outputs(cfg.input, out_dir, path)
    subject = named.name
    image = io.load_image(path)
    warnings = []
    item = prepare({"image": str(path)})
    volume, prior = item["image"][0].numpy(), item["prior"]
    # What the pipeline just did to the scan (the mask comes from the cache it filled).
    extracted = brain.brain_mask(path, image.data, image.affine, preprocess)
    cut = quality.mask_cut_warning(prior, extracted.mask)
    if cut is not None:
        sides.warn_once(path, cut)
        warnings.append(cut)
    classes, probabilities = inference.segment(net, volume, prior, bool(cfg.postprocessing))
    swapped = sides.warn_sides(classes, image.affine, path)  # the paper's No-TL runs swapped sides
    if swapped is not None:
        warnings.append(swapped)
    if cfg.probabilities:
        full = np.zeros((*image.data.shape, label_protocol.NUM_CLASSES), np.float32)
        full[..., 0] = 1.0
        full[prior.box] = np.moveaxis(probabilities, 0, -1)
        full[prior.box][~(prior.regions > 0)] = np.eye(label_protocol.NUM_CLASSES)[0]
        manifest.claim(io.save_like(full, image, named.prob))
    overlay.save_overlay(
        image.data,
        classes,
        image.spacing,
        named.qc,
        title=f"{subject}: subseg segmentation (yellow: brain mask, {extracted.describe()})",
        outline=extracted.mask,
    )
    manifest.claim(named.qc)
    if cfg.raw_ids:  # a type that holds every id of the protocol (40001 stays 40001)
        stored = label_protocol.map_to_raw(classes, cfg.raw_ids)
        stored = stored.astype(label_protocol.raw_dtype(cfg.raw_ids))
    else:
        stored = classes.astype(np.uint8)
    seg = io.save_like(  # the segmentation last: on disk, it comes with everything else
        stored,
        image,
        named.seg,
    )
    manifest.claim(seg)
    counts = np.bincount(classes.ravel(), minlength=label_protocol.NUM_CLASSES)
    scores = quality.structure_scores(classes, probabilities, prior)
    return [
        {
            "subject": subject,
            "structure": name,
            "volume_mm3": float(counts[c] * image.voxel_volume_mm3),
            "qc": score["qc"],
            "warnings": "; ".join(warnings),
            "extraction": extracted.method,
            "brain_litres": round(extracted.litres, 4),
        }
        for (c, name), score in zip(enumerate(label_protocol.STRUCTURES, 1), scores, strict=True)
    ]


def predict(cfg: DictConfig) -> list[dict]:
    """Segment new T1 scans and report their structure volumes.

    Writes to ``cfg.out_dir``: ``<id>_seg.nii.gz`` (same shape, affine and orientation as the
    input; classes 0–14 or the raw ids of ``cfg.raw_ids``), ``<id>_qc.png``, optionally
    ``<id>_prob.nii.gz``, ``volumes.csv`` (subject, structure, volume_mm3, qc: the label-free
    quality score of :mod:`subseg.evaluation.quality`), ``qc.csv`` (one row per scan, the likeliest
    wrong first, ``flagged`` as :func:`subseg.evaluation.quality.scan_table` says) and,
    when some scans failed, ``failures.csv`` (scan, error). The scans of a BIDS dataset get
    BIDS Derivatives names instead (``sub-X/[ses-Y/]anat/…_desc-subseg_dseg.nii.gz``, its
    ``_volumes.tsv``, ``_probseg``; ``sub-X/figures/…png``) and ``out_dir`` gets
    ``dataset_description.json`` and ``dseg.tsv`` (:mod:`subseg.data.bids`); a FreeSurfer subject
    folder's scan is named after the folder.

    Returns:
        The rows of ``volumes.csv``.

    Raises:
        io.InputError: the model or the batch is unusable (nothing is segmented), or some scans
            failed while being segmented (the others are written).
    """
    out_dir = Path(cfg.out_dir)
    model = model_of(cfg)
    if cfg.raw_ids:
        label_protocol.raw_dtype(cfg.raw_ids)  # ids no label file can hold: refused now
    files = input_images(cfg.input)
    check_out_dir(out_dir, cfg.input, files)
    check_batch(files, cfg.input)
    with FolderLock(out_dir, "out_dir"):  # one predict.py at a time writes here
        return _predict_batch(
            cfg, out_dir, model.net, model.contract, files, brain_reference(model)
        )


def _check_lookup(out_dir: Path, manifest: OutputManifest, raw_ids, batch: set[Path]) -> None:
    """Refuse to give ``dseg.tsv`` other ids while segmentations holding the old ones stay.

    Those (earlier scans, not in this batch) would be misnamed by the new table.

    Raises:
        io.InputError: one line naming the table and a segmentation that would be misnamed.
    """
    lookup = out_dir / bids.LOOKUP
    if not lookup.is_file() or bids.same_lookup(lookup, raw_ids):
        return
    others = sorted(
        key
        for key in manifest.files
        if key.endswith(f"_{bids.DSEG}")
        and (out_dir / key).is_file()
        and out_dir / key not in batch
    )
    if others:
        raise io.InputError(
            f"{lookup}: lists other label ids than this batch writes (raw_ids="
            f"{raw_ids or 'null'}), and {len(others)} segmentation(s) here hold them (first: "
            f"{others[0]}); segment into another out_dir="
        )


def _flag_reason(row: dict) -> str:
    """A flagged scan in the closing line: its warning, else its worst structure."""
    if row["warnings"]:
        return f"{row['subject']}: {row['warnings'].split(';')[0]}"
    return f"{row['subject']} ({row['worst_structure']} {row['worst_qc']:.2f})"


def brain_reference(model) -> tuple[float, str] | None:
    """The median brain volume of the scans a model was made with, to compare new scans with.

    Args:
        model: the :class:`subseg.runs.trained_model.TrainedModel`.

    Returns:
        (litres, what they are), or ``None`` for a checkpoint from elsewhere or a model that
        predates brain extraction (the batch median is used then).
    """
    volumes = model.brain_litres
    if not volumes:
        return None
    return float(np.median(volumes)), f"the {len(volumes)} scans the model was made with"


def _predict_batch(
    cfg: DictConfig,
    out_dir: Path,
    net,
    contract,
    files: list[Path],
    reference: tuple[float, str] | None = None,
) -> list:
    """Segment a checked batch into ``out_dir`` (its lock held): see :func:`predict`."""
    manifest = OutputManifest(out_dir)
    tables = [out_dir / name for name in ("volumes.csv", "qc.csv", "failures.csv")]
    named = {f: scan_outputs(cfg.input, out_dir, f) for f in files}
    outputs = [*tables, *(p for n in named.values() for p in n.files)]
    roots = bids_roots(cfg.input)
    derivative = [out_dir / bids.DESCRIPTION, out_dir / bids.LOOKUP] if roots else []
    # A file subseg did not write: refused, nothing touched.
    manifest.check_writable([*outputs, *derivative])
    if roots:
        _check_lookup(out_dir, manifest, cfg.raw_ids, {n.seg for n in named.values()})
    for stale in outputs[1:]:
        manifest.remove(stale)  # an earlier batch's outputs of these scans (ours only)
    if roots:  # a valid derivative dataset from the first scan on
        description = bids.write_description(out_dir, roots)
        manifest.claim(description, bids.write_lookup(out_dir, cfg.raw_ids))
    print(f"subseg: input: {contract.describe()}")
    prepare = contract.pipeline()  # exactly the model's own: N4, standardisation, atlas
    rows, failures, table = [], [], []
    for path in track(files, description="segmenting"):
        try:
            scan_rows = segment_scan(
                net, prepare, path, cfg, out_dir, manifest, contract.preprocess
            )
            if named[path].volumes is not None:  # BIDS: the scan's own table beside its dseg
                table_file = bids.write_volumes(named[path].volumes, scan_rows, cfg.raw_ids)
                manifest.claim(table_file)
            rows += scan_rows
        except Exception as exc:  # one bad scan must not cost the rest of the batch
            if io.find_output_error(exc) is not None:  # a full disk fails every scan: stop
                raise
            reason = io.find_input_error(exc) or f"{type(exc).__name__}: {exc}".splitlines()[0]
            for partial in named[path].files:
                manifest.remove(partial)
            failures.append({"scan": str(path), "error": str(reason)})
            print(f"subseg: skipped {path}: {reason}", file=sys.stderr)
        volumes = [{k: r[k] for k in VOLUME_COLUMNS} for r in rows]
        manifest.claim(io.write_csv(volumes, VOLUME_COLUMNS, out_dir / "volumes.csv"))
        table = quality.scan_table(rows, reference)  # relative to the batch: redone as it grows
        manifest.claim(io.write_csv(table, quality.SCAN_COLUMNS, out_dir / "qc.csv"))
    done = len(files) - len(failures)
    print(f"subseg: {done} of {len(files)} scans segmented; volumes in {out_dir / 'volumes.csv'}")
    flagged = [r for r in table if r["flagged"]]
    if flagged:
        names = ", ".join(_flag_reason(r) for r in flagged[:5])
        print(
            f"subseg: check first: {len(flagged)} scan(s) with a warning or a structure scoring "
            f"far below the batch's ({names}{' …' if len(flagged) > 5 else ''}); every scan "
            "ranked in qc.csv"
        )
    if failures:
        manifest.claim(io.write_csv(failures, FAILURE_COLUMNS, out_dir / "failures.csv"))
        raise io.InputError(
            f"{out_dir}: {len(failures)} of {len(files)} scans failed and were skipped "
            f"(listed in failures.csv; first: {failures[0]['scan']})"
        )
    return rows
