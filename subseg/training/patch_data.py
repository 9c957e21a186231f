"""The data of one fit, as a Lightning ``DataModule``: prepared once, sharded across ranks.

Lightning calls :meth:`PatchData.prepare_data` in one process only (the first rank of the whole
job) and holds the others at a barrier until it returns; then every rank calls :meth:`setup`.
So the slow, cached work (bias correction, atlas registration, QC overlays, the splits) is done
once per subject, and every rank then reads it from the cache. Each rank's loaders deal out the
epoch with :class:`subseg.core.sharding.EpochShard`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import lightning as L
from torch.utils.data import DataLoader, Dataset

from subseg.core.sharding import EpochShard, EvenBatches
from subseg.training import samples


@dataclass
class FitData:
    """What a fit trains and validates on.

    Attributes:
        pooled: every sample (patches or cached features), training and validation.
        train: indices of the training samples in ``pooled``.
        val: indices of the validation samples.
        volumes: whole held-out subjects (:class:`subseg.training.lit_module.VolumeSubject`) for
            whole-volume validation Dice; may be empty.
    """

    pooled: Dataset
    train: object
    val: object
    volumes: list = field(default_factory=list)


class PatchData(L.LightningDataModule):
    """Training and validation loaders of a fit.

    Args:
        build: makes the :class:`FitData` (on every rank, after ``prepare``).
        batch_size: samples per batch (``sampling.batch_size``).
        seed: the run's seed: every epoch's order comes from it and the epoch number.
        prepare: the slow once-per-job work (``None``: nothing to do first).
        num_workers: loader processes.
    """

    def __init__(
        self,
        build: Callable[[], FitData],
        batch_size: int,
        seed: int,
        prepare: Callable[[], None] | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        # Once per job, not once per node: the run folder and the caches are one shared place.
        self.prepare_data_per_node = False
        self._build, self._prepare = build, prepare
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.num_workers = int(num_workers)
        self.fit_data: FitData | None = None

    def prepare_data(self) -> None:
        """The slow work, once per job (Lightning calls it on the first rank only)."""
        if self._prepare is not None:
            self._prepare()

    def setup(self, stage: str) -> None:
        """Build the samples on this rank (from the caches ``prepare_data`` filled)."""
        if self.fit_data is None:
            self.fit_data = self._build()

    def _loader(self, indices, shuffle: bool) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        sampler = EpochShard(len(indices), rank, world, shuffle=shuffle, seed=self.seed)
        return DataLoader(
            self.fit_data.pooled.subset(indices),
            batch_sampler=EvenBatches(sampler, self.batch_size),
            collate_fn=samples.collate_batch,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        """This rank's share of the training samples, in a new order every epoch."""
        return self._loader(self.fit_data.train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """This rank's share of the validation samples."""
        return self._loader(self.fit_data.val, shuffle=False)
