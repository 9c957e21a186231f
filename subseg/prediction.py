"""Segment new scans with a trained model and report structure volumes: what ``predict.py`` runs.

A batch is checked whole before any scan is segmented (readable scans, distinct output names).
A scan that still fails while it is segmented is reported and skipped, the others finish, and
``volumes.csv`` lists exactly this batch's segmentations on disk: it is rewritten after each
scan, and each scan's segmentation is the last of its files to be written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from rich.progress import track

from subseg import cache, inference, io, overlay, quality, sides
from subseg import labels as label_protocol
from subseg.trained_model import load_network, model_of

VOLUME_COLUMNS = ["subject", "structure", "volume_mm3", "qc"]
FAILURE_COLUMNS = ["scan", "error"]


def input_images(spec) -> list[Path]:
    """T1 files named by a file, a folder (every .nii / .nii.gz in it) or a list of either."""
    items = [spec] if isinstance(spec, str | Path) else list(spec)
    files = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(
                p
                for p in item.iterdir()
                if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith(".")
            )
            if not found:
                raise io.InputError(f"{item}: no .nii or .nii.gz files in this folder")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise io.InputError(f"{item}: no such file or folder")
    return files


def check_batch(files: list[Path]) -> None:
    """Refuse a batch before any scan is segmented: duplicate output names, unreadable scans.

    Outputs are named by the scan's file name, so two ``T1.nii.gz`` from different folders
    would overwrite each other; a bad scan found at the end of a long batch would waste it.
    """
    by_name: dict[str, Path] = {}
    for path in files:
        twin = by_name.setdefault(cache.stem(path), path)
        if twin != path:
            raise io.InputError(
                f"{path}: has the same name as {twin}; their outputs would overwrite each other "
                "(segment them into different out_dir=)"
            )
    for path in track(files, description="checking inputs"):
        io.load_image(path)  # one line naming the file on a bad one


def _outputs(out_dir: Path, scan: Path) -> list[Path]:
    """The files a scan's segmentation writes."""
    subject = cache.stem(scan)
    return [out_dir / f"{subject}_{kind}" for kind in ("seg.nii.gz", "prob.nii.gz", "qc.png")]


def segment_scan(net, prepare, path: Path, cfg: DictConfig, out_dir: Path) -> list[dict]:
    """Segment one scan and write its outputs; its rows of ``volumes.csv``."""
    subject = cache.stem(path)
    image = io.load_image(path)
    item = prepare({"image": str(path)})
    volume, prior = item["image"][0].numpy(), item["prior"]
    classes, probabilities = inference.segment(net, volume, prior, bool(cfg.postprocessing))
    sides.warn_sides(classes, image.affine, path)  # the paper's No-TL runs swapped sides
    if cfg.probabilities:
        full = np.zeros((*image.data.shape, label_protocol.NUM_CLASSES), np.float32)
        full[..., 0] = 1.0
        full[prior.box] = np.moveaxis(probabilities, 0, -1)
        full[prior.box][~(prior.regions > 0)] = np.eye(label_protocol.NUM_CLASSES)[0]
        io.save_like(full, image, out_dir / f"{subject}_prob.nii.gz")
    overlay.save_overlay(
        image.data,
        classes,
        image.spacing,
        out_dir / f"{subject}_qc.png",
        title=f"{subject}: subseg segmentation",
    )
    stored = label_protocol.map_to_raw(classes, cfg.raw_ids) if cfg.raw_ids else classes
    io.save_like(  # the segmentation last: on disk, it comes with everything else
        stored.astype(np.int16 if cfg.raw_ids else np.uint8),
        image,
        out_dir / f"{subject}_seg.nii.gz",
    )
    counts = np.bincount(classes.ravel(), minlength=label_protocol.NUM_CLASSES)
    scores = quality.structure_scores(classes, probabilities, prior)
    return [
        {
            "subject": subject,
            "structure": name,
            "volume_mm3": float(counts[c] * image.voxel_volume_mm3),
            "qc": score["qc"],
        }
        for (c, name), score in zip(enumerate(label_protocol.STRUCTURES, 1), scores, strict=True)
    ]


def predict(cfg: DictConfig) -> list[dict]:
    """Segment new T1 scans and report their structure volumes.

    Writes to ``cfg.out_dir``: ``<id>_seg.nii.gz`` (same shape, affine and orientation as the
    input; classes 0–14 or the raw ids of ``cfg.raw_ids``), ``<id>_qc.png``, optionally
    ``<id>_prob.nii.gz``, ``volumes.csv`` (subject, structure, volume_mm3, qc: the label-free
    quality score of :mod:`subseg.quality`), ``qc.csv`` (one row per scan, the likeliest wrong
    first, ``flagged`` as :func:`subseg.quality.scan_table` says) and,
    when some scans failed, ``failures.csv`` (scan, error).

    Returns:
        The rows of ``volumes.csv``.

    Raises:
        io.InputError: the model or the batch is unusable (nothing is segmented), or some scans
            failed while being segmented (the others are written).
    """
    out_dir = Path(cfg.out_dir)
    checkpoint, contract, _ = model_of(cfg)
    net = load_network(checkpoint)
    files = input_images(cfg.input)
    check_batch(files)
    io.ensure_writable(out_dir)
    stale_tables = [out_dir / "failures.csv", out_dir / "qc.csv"]
    for stale in [*stale_tables, *(p for f in files for p in _outputs(out_dir, f))]:
        stale.unlink(missing_ok=True)  # an earlier batch's outputs of these scans
    print(f"subseg: input: {contract.describe()}")
    prepare = contract.pipeline()  # exactly the model's own: N4, standardisation, atlas
    rows, failures, table = [], [], []
    for path in track(files, description="segmenting"):
        try:
            rows += segment_scan(net, prepare, path, cfg, out_dir)
        except Exception as exc:  # one bad scan must not cost the rest of the batch
            if io.find_output_error(exc) is not None:  # a full disk fails every scan: stop
                raise
            reason = io.find_input_error(exc) or f"{type(exc).__name__}: {exc}".splitlines()[0]
            for partial in _outputs(out_dir, path):
                partial.unlink(missing_ok=True)
            failures.append({"scan": str(path), "error": str(reason)})
            print(f"subseg: skipped {path}: {reason}", file=sys.stderr)
        io.write_csv(rows, VOLUME_COLUMNS, out_dir / "volumes.csv")
        table = quality.scan_table(rows)  # relative to the batch: redone as the batch grows
        io.write_csv(table, quality.SCAN_COLUMNS, out_dir / "qc.csv")
    done = len(files) - len(failures)
    print(f"subseg: {done} of {len(files)} scans segmented; volumes in {out_dir / 'volumes.csv'}")
    flagged = [r for r in table if r["flagged"]]
    if flagged:
        names = ", ".join(
            f"{r['subject']} ({r['worst_structure']} {r['worst_qc']:.2f})" for r in flagged[:5]
        )
        print(
            f"subseg: check first: {len(flagged)} scan(s) with a structure scoring far below the "
            f"batch's ({names}{' …' if len(flagged) > 5 else ''}); every scan ranked in qc.csv"
        )
    if failures:
        io.write_csv(failures, FAILURE_COLUMNS, out_dir / "failures.csv")
        raise io.InputError(
            f"{out_dir}: {len(failures)} of {len(files)} scans failed and were skipped "
            f"(listed in failures.csv; first: {failures[0]['scan']})"
        )
    return rows
