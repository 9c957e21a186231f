"""Train a network from scratch on a source cohort: what ``train.py`` runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from subseg import cohort, evaluation, fitting
from subseg.contract import as_dict
from subseg.preparation import cached_subjects, check_cohort, prepare_run
from subseg.run_folder import RunFolder


def _whole_volumes(cached, ids) -> list:
    """Validation subjects for whole-volume Dice (none when the cohort holds none out)."""
    from subseg.lit_module import VolumeSubject

    return [
        VolumeSubject(
            item["id"], np.asarray(item["image"][0]), item["prior"], np.asarray(item["label"][0])
        )
        for item in (cached(ids) if ids else [])
    ]


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train a network from scratch on a source cohort and evaluate it on the test split.

    Writes the run folder (:mod:`subseg.run_folder`): ``splits.json``, ``preprocessing.json``,
    ``environment.json``, ``qc/``, ``checkpoints/best.ckpt`` and ``last.ckpt``,
    ``logs/metrics.csv``, an offline W&B run with the default logger, ``metrics.csv`` and
    ``summary.json`` for the test subjects, and last ``complete.json``. A run already complete
    with the same config is left as it is; ``resume=true`` continues a killed one.

    Args:
        cfg: the composed ``conf/train.yaml``.
        run_dir: the run folder.

    Returns:
        The test summary (``avg``, ``wavg``, ``per_structure``, ``fit``).
    """
    import lightning as L

    from subseg import data
    from subseg.lit_module import SegmentationModule, VolumeDice

    run = RunFolder(run_dir)
    dataset, recipe = as_dict(cfg.dataset), as_dict(cfg.recipe)
    subjects = check_cohort(dataset)  # a bad file stops the run before it writes anything
    splits = cohort.default_splits(dataset, subjects)
    digest = run.begin(cfg)
    if digest is None:
        return run.summary()
    L.seed_everything(int(cfg.seed), workers=True)
    run.write_environment(str(cfg.accelerator))
    splits, subjects, source, contract = prepare_run(cfg, run, subjects, splits)
    run.write_contract(contract)
    by_id = {s.id: s for s in subjects}
    cached = cached_subjects(by_id, dataset["label_ids"], contract, source, cfg.num_workers)

    rng = np.random.default_rng(int(cfg.seed))
    samples, train_idx, val_idx = fitting.pooled_samples(cached(splits["train"]), recipe, rng)
    pooled = data.PatchDataset(samples)
    del samples  # the padded copies in ``pooled`` are all training needs

    volume_subjects = _whole_volumes(cached, splits["val"])
    module = SegmentationModule(dropout=float(recipe["dropout"]), lr=float(recipe["lr"]))
    best, trainer, fit = fitting.fit(
        cfg,
        run,
        module,
        pooled,
        (train_idx, val_idx),
        recipe,
        [VolumeDice(volume_subjects, int(recipe["volume_dice_every"]))] if volume_subjects else [],
    )
    if best is None:  # a DDP rank other than the first: rank 0 writes the results
        return {}
    net = SegmentationModule.load_from_checkpoint(best, map_location="cpu").net.eval()
    summary = evaluation.publish(
        run,
        net,
        cached(splits["test"]),
        by_id,
        trainer.loggers,
        {"checkpoint": str(best.resolve().relative_to(run.path.resolve())), "fit": fit},
    )
    run.finish("train", digest, cfg)
    print(
        f"subseg: test mean Dice {summary['avg']:.3f} (wDSC {summary['wavg']:.3f}) over "
        f"{summary['n_subjects']} subjects; run folder {run.path}"
    )
    return summary
