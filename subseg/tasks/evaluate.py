"""Segment labelled test subjects and score them: what ``evaluate.py`` runs, and every run's end.

A run's results (``metrics.csv``, ``summary.json``, overlays, the learning curve) are written by
:func:`publish`; ``evaluate.py`` evaluates a complete run's model again, on its own test split or
on another cohort.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from subseg.core import cache, figures, io, overlay, sharding, sides
from subseg.data import cohort
from subseg.evaluation import metrics, quality
from subseg.model import inference
from subseg.preprocessing.contract import InputContract, as_dict
from subseg.runs import dashboard
from subseg.runs.run_folder import RunFolder
from subseg.runs.trained_model import model_of
from subseg.training.preparation import cached_subjects, check_cohort

COLUMNS = (*metrics.COLUMNS, *quality.COLUMNS)
"""``metrics.csv``: the Dice and distances against the label, and the label-free quality score
``predict.py`` gives (so the score can be checked against true Dice)."""


def evaluate_subjects(
    net, subjects, qc_dir: Path | None = None, seg_dir: Path | None = None
) -> list[dict]:
    """Segment labelled subjects and return their ``metrics.csv`` rows (:data:`COLUMNS`).

    Args:
        net: the network, in eval mode.
        subjects: (subject, item) pairs; items carry ``image``, ``label`` and ``prior``.
        qc_dir: when given, an overlay of each segmentation is written there.
        seg_dir: when given, each segmentation is written there as ``<id>_seg.nii.gz`` (classes
            0–14 on the scan's own grid, as ``predict.py`` writes them).
    """
    rows = []
    for subject, item in subjects:
        volume = np.asarray(item["image"][0])
        classes, probabilities = inference.segment(net, volume, item["prior"])
        sides.warn_sides(classes, item["image"].affine.numpy(), f"{subject.id} (segmentation)")
        if seg_dir is not None:
            stored = io.load_image(subject.image)
            io.save_like(classes.astype(np.uint8), stored, seg_dir / f"{subject.id}_seg.nii.gz")
        spacing = item["image"].meta["spacing"]
        scores = quality.structure_scores(classes, probabilities, item["prior"])
        measured = metrics.structure_metrics(
            subject.id, classes, np.asarray(item["label"][0]), spacing
        )
        for row, score in zip(measured, scores, strict=True):
            rows.append({**row, **{k: score[k] for k in quality.COLUMNS}})
        if qc_dir is not None:
            overlay.save_overlay(
                volume,
                classes,
                spacing,
                qc_dir / f"{subject.id}_seg.png",
                title=f"{subject.id}: segmentation",
            )
    return rows


def publish(
    run: RunFolder, net, cached, ids, by_id, loggers=(), extra=None, segmentations=False
) -> dict:
    """Evaluate on the test subjects and write the run's results.

    In a DDP job every rank segments its share of the subjects and the per-subject metrics are
    gathered; the first rank writes ``metrics.csv`` and ``summary.json`` (together), the learning
    curve from the run's log, and sends W&B loggers a few overlays, the per-structure Dice and
    the run summary (:func:`subseg.runs.dashboard.publish_summary`).

    Args:
        run: the run folder.
        net: the network, in eval mode.
        cached: subject ids → their prepared items
            (:func:`subseg.training.preparation.cached_subjects`).
        ids: the test subjects.
        by_id: subject id → :class:`subseg.data.cohort.Subject`.
        loggers: the fit's Lightning loggers.
        extra: more entries for ``summary.json``.
        segmentations: also write each segmentation to the run's ``segmentations/``.

    Returns:
        The summary (on every rank).
    """
    rank, world = sharding.world()
    mine = sharding.shard(list(ids), rank, world)
    seg_dir = run.segmentations_dir if segmentations else None
    rows = [
        evaluate_subjects(net, [(by_id[item["id"]], item)], run.qc_dir, seg_dir)
        for item in (cached(mine) if mine else [])
    ]
    rows = [row for subject in sharding.gather_shards(rows, world) for row in subject]
    summary = metrics.summarize(rows)
    summary.update(extra or {})
    if rank != 0:
        return summary
    run.publish_results(rows, list(COLUMNS), summary)
    if run.log_file.is_file():
        figures.learning_curve(run.log_file, run.learning_curve_file)
    overlays = sorted(str(p) for p in run.qc_dir.glob("*_seg.png"))[:4]
    for logger in loggers:
        if hasattr(logger, "log_image") and overlays:  # W&B: a few test overlays on the dashboard
            logger.log_image(key="test/segmentations", images=overlays)
            logger.log_metrics(
                {f"test/dice_{k}": v["mean"] for k, v in summary["per_structure"].items()}
            )
    dashboard.publish_summary(loggers, summary)
    return summary


def evaluate_on(
    net,
    dataset,
    test_ids: list[str] | None,
    contract: InputContract,
    out: RunFolder,
    extra=None,
    segmentations: bool = False,
) -> dict:
    """Segment a cohort's test subjects with ``net``; publish ``metrics.csv`` and ``summary.json``.

    Args:
        net: the network, in eval mode.
        dataset: the cohort (a ``conf/dataset`` entry).
        test_ids: the subjects to segment (``None``: every subject of the cohort).
        contract: how the network's input is prepared (its run's).
        out: where the results go.
        extra: more entries for ``summary.json``.
        segmentations: also write each segmentation to the folder's ``segmentations/``.

    Returns:
        The summary.
    """
    dataset = dict(dataset)
    subjects = cohort.list_subjects(dataset)
    by_id = {s.id: s for s in subjects}
    ids = sorted(by_id) if test_ids is None else list(test_ids)
    unknown = sorted(set(ids) - set(by_id))
    if unknown:
        raise io.InputError(f"{dataset['root']}: test subjects not found: {unknown}")
    if not ids:
        raise io.InputError(f"{dataset['root']}: no test subjects to evaluate on")
    cached = cached_subjects(by_id, dataset["label_ids"], contract, contract.load_atlas())
    return publish(
        out,
        net,
        cached,
        ids,
        by_id,
        (),
        {"dataset": dataset["name"], **(extra or {})},
        segmentations,
    )


def _test_split(cfg: DictConfig, run: RunFolder | None, checkpoint: Path):
    """The cohort and test subjects to evaluate on: (dataset entry, test ids or ``None``).

    A run's own cohort gives its test split; its source cohort gives the source's test split
    (never its training subjects); any other cohort its published test list, or every subject.
    Cohorts are told apart by their files (:func:`subseg.data.cohort.same_cohort`), never by name:
    every custom cohort is called ``folder``.
    """
    run_cfg = run.config() if run is not None else None
    dataset = as_dict(cfg.dataset) if cfg.get("dataset") else None
    if dataset is None and run_cfg is None:
        raise io.InputError(f"{checkpoint}: name the cohort to evaluate on: dataset=<cohort>")
    if run_cfg is not None and (dataset is None or cohort.same_cohort(dataset, run_cfg["dataset"])):
        return run_cfg["dataset"] if dataset is None else dataset, run.split("test")
    upstream = (
        RunFolder.of(run_cfg["source_run"]) if run_cfg and run_cfg.get("source_run") else None
    )
    if (
        upstream is not None
        and upstream.is_complete()
        and cohort.same_cohort(upstream.config()["dataset"], dataset)
    ):
        return dataset, upstream.split("test")
    test_ids = dataset.get("test_ids")
    return dataset, None if test_ids is None else list(test_ids)


def evaluate(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Evaluate a trained or fine-tuned model on a cohort's test subjects.

    ``run_dir=<run folder>`` rebuilds everything from the folder: its checkpoint, input
    contract (bias correction, atlas, intensity standardisation), cohort and test split
    (``dataset=<cohort>`` evaluates it on another cohort: that cohort's published test list, or
    all its subjects). ``ckpt=<file> dataset=<cohort>`` evaluates a bare checkpoint with
    ``cfg.preprocess`` and ``cfg.atlas``.

    Writes ``metrics.csv`` (subject, structure, dsc, hd95_mm, assd_mm, vol_ref_mm3,
    vol_pred_mm3), ``summary.json`` (avg, wavg, per-structure mean/std), ``qc/`` and, last,
    ``complete.json`` to ``out_dir``; with ``segmentations=true`` also
    ``segmentations/<id>_seg.nii.gz``.

    Returns:
        The summary.
    """
    out = RunFolder(out_dir)
    model = model_of(cfg)
    checkpoint, contract, net = model.checkpoint, model.contract, model.net
    dataset, test_ids = _test_split(cfg, model.run, checkpoint)
    check_cohort(dataset, test_ids)  # a bad file stops it before anything is written
    digest = out.begin(
        cfg, {"checkpoint": cache.file_digest(checkpoint)}, cohort.file_digests(dataset)
    )
    if digest is None:
        return out.summary()
    out.write_environment()
    print(f"subseg: input: {contract.describe()}")
    summary = evaluate_on(
        net,
        dataset,
        test_ids,
        contract,
        out,
        {"checkpoint": str(checkpoint)},
        bool(cfg.get("segmentations")),
    )
    out.finish("evaluate", digest, cfg)
    print(
        f"subseg: {dataset['name']}: mean Dice {summary['avg']:.3f} (wDSC {summary['wavg']:.3f})"
        f" over {summary['n_subjects']} subjects; written to {out.path}"
    )
    return summary
