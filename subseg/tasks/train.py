"""Train a network from scratch on a source cohort: what ``train.py`` runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from subseg.data import cohort
from subseg.preprocessing.contract import as_dict
from subseg.runs.run_folder import RunFolder, is_first_process
from subseg.tasks import evaluate
from subseg.training import fitting
from subseg.training.preparation import cached_subjects, check_cohort, prepare_run


def _whole_volumes(cached, ids) -> list:
    """Validation subjects for whole-volume Dice (none when the cohort holds none out)."""
    from subseg.training.lit_module import VolumeSubject

    return [
        VolumeSubject(
            item["id"], np.asarray(item["image"][0]), item["prior"], np.asarray(item["label"][0])
        )
        for item in (cached(ids) if ids else [])
    ]


def _fit_data(cfg: DictConfig, run: RunFolder, subjects: list):
    """The fit's data module: prepared once per job, then read from the caches on every rank."""
    from subseg.training.patch_data import FitData, PatchData
    from subseg.training.samples import PatchDataset

    dataset, sampling = as_dict(cfg.dataset), as_dict(cfg.sampling)

    def prepare() -> None:  # the first rank only; the others wait at Lightning's barrier
        splits = cohort.default_splits(dataset, subjects)
        _, _, _, contract = prepare_run(cfg, run, subjects, splits)
        run.write_contract(contract)

    def build() -> FitData:  # every rank
        splits = cohort.ensure_splits(run.splits_file, dataset, subjects)
        contract = run.contract()
        cached = run_subjects(cfg, run, subjects, contract)
        rng = np.random.default_rng(int(cfg.seed))
        samples, train_idx, val_idx = fitting.pooled_samples(cached(splits["train"]), sampling, rng)
        return FitData(
            PatchDataset(samples), train_idx, val_idx, _whole_volumes(cached, splits["val"])
        )

    return PatchData(build, sampling["batch_size"], int(cfg.seed), prepare, int(cfg.num_workers))


def run_subjects(cfg: DictConfig, run: RunFolder, subjects: list, contract=None):
    """Subject ids → their items prepared as the run's recorded input contract."""
    contract = contract or run.contract()
    by_id = {s.id: s for s in subjects}
    protocol = cfg.dataset.label_ids
    return cached_subjects(by_id, protocol, contract, contract.load_atlas(), cfg.num_workers)


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train a network from scratch on a source cohort and evaluate it on the test split.

    Writes the run folder (:mod:`subseg.runs.run_folder`): ``splits.json``, ``preprocessing.json``,
    ``environment.json``, ``qc/``, ``checkpoints/best.ckpt`` and ``last.ckpt``,
    ``logs/metrics.csv``, an offline W&B run with the default logger, ``metrics.csv`` and
    ``summary.json`` for the test subjects, and last ``complete.json``. A run already complete
    with the same config is left as it is; ``resume=true`` continues a killed one.

    With ``trainer=ddp`` (or any multi-process trainer) the subjects are bias-corrected and
    registered once, by the first process, before the ranks train; each rank trains on its
    share of every epoch's samples, and validation and test subjects are split across the
    ranks; the first process writes the results.

    Args:
        cfg: the composed ``conf/train.yaml``.
        run_dir: the run folder.

    Returns:
        The test summary (``avg``, ``wavg``, ``per_structure``, ``fit``).
    """
    import lightning as L
    from hydra.utils import instantiate

    from subseg.runs.trained_model import load_network
    from subseg.training.lit_module import VolumeDice

    run = RunFolder(run_dir)
    dataset = as_dict(cfg.dataset)
    subjects = check_cohort(dataset)  # a bad file stops the run before it writes anything
    cohort.default_splits(dataset, subjects)  # an impossible split too
    digest = run.begin(cfg, data=cohort.file_digests(dataset))
    if digest is None:
        return run.summary()
    L.seed_everything(int(cfg.seed), workers=True)
    if is_first_process():
        run.write_environment(str(cfg.trainer.accelerator))
    module = instantiate(cfg.model)  # conf/model: the network, its optimiser and scheduler
    best, trainer, fit = fitting.fit(
        cfg,
        run,
        module,
        _fit_data(cfg, run, subjects),
        [VolumeDice(every_n_epochs=int(cfg.volume_dice_every))],
    )
    net = load_network(best)
    by_id = {s.id: s for s in subjects}
    summary = evaluate.publish(
        run,
        net,
        run_subjects(cfg, run, subjects),
        run.split("test"),
        by_id,
        trainer.loggers,
        {"checkpoint": str(best.resolve().relative_to(run.path.resolve())), "fit": fit},
    )
    if not trainer.is_global_zero:  # another DDP rank: the first one writes the results
        return summary
    run.finish("train", digest, cfg)
    print(
        f"subseg: test mean Dice {summary['avg']:.3f} (wDSC {summary['wavg']:.3f}) over "
        f"{summary['n_subjects']} subjects; run folder {run.path}"
    )
    return summary
