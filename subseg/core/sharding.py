"""Split work across the processes of a distributed (DDP) run: samples, subjects, results.

Training samples: every epoch is one permutation of the training samples, drawn from the seed and
the epoch number (the same on every rank), dealt out so that each sample is seen by exactly one
rank, none twice and none dropped. torch's ``DistributedSampler`` instead pads the epoch with
repeated samples (or drops the tail) so that every rank gets the same count; here the ranks'
shards differ by at most one sample, and every rank still takes the same number of optimiser
steps (DDP synchronises gradients at each step, so one rank with an extra step would hang).

Whole subjects (validation and test volumes) are dealt round-robin and their results gathered
back in the original order, so any number of ranks gives the very numbers one process gives.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, Sampler


def world() -> tuple[int, int]:
    """(this process's rank, number of processes) of the initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochShard(Sampler[int]):
    """One rank's share of an epoch: every ``world``-th sample of the epoch's permutation.

    Args:
        n: samples in the epoch.
        rank: this process's rank.
        world: number of processes.
        shuffle: draw a new order every epoch (from ``seed`` and the epoch); else in order.
        seed: the run's seed.
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0):
        if n < world:
            raise ValueError(f"{n} samples cannot be shared by {world} processes")
        self.n, self.rank, self.world = n, rank, world
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def order(self) -> np.ndarray:
        """The whole epoch's order (the same on every rank)."""
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.rank :: self.world].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))

    def steps(self, batch_size: int) -> int:
        """Batches per epoch on every rank: those of the largest shard."""
        return math.ceil(math.ceil(self.n / self.world) / batch_size)


class EvenBatches(BatchSampler):
    """Batches of an :class:`EpochShard`, the same number on every rank.

    Batches are ``batch_size`` consecutive samples of the shard, the last one smaller, as a
    plain ``DataLoader`` makes them. A shard one sample short of the largest can come out one
    batch short: then its last full batch is split in two.
    """

    def __init__(self, sampler: EpochShard, batch_size: int):
        super().__init__(sampler, batch_size, drop_last=False)

    def __iter__(self) -> Iterator[list[int]]:
        shard = list(self.sampler)
        size = self.batch_size
        batches = [shard[i : i + size] for i in range(0, len(shard), size)]
        while len(batches) < len(self):
            last = batches.pop()
            half = (len(last) + 1) // 2
            batches += [last[:half], last[half:]]
        yield from batches

    def __len__(self) -> int:
        return self.sampler.steps(self.batch_size)


def shard(items: Sequence, rank: int, world: int) -> list:
    """This rank's round-robin share of ``items`` (whole subjects)."""
    return list(items[rank::world])


def gather_shards(mine: list, world: int) -> list:
    """Every rank's :func:`shard` results, back in the order of the items they were dealt from.

    ``mine`` holds one result per item of this rank's shard. Uses
    ``torch.distributed.all_gather_object``: Lightning's ``all_gather`` only takes tensors of one
    shape on every rank, and subjects' results are lists of unequal length.
    """
    if world == 1:
        return list(mine)
    everyone: list = [None] * world
    torch.distributed.all_gather_object(everyone, mine)
    out = []
    for i in range(max(len(part) for part in everyone)):
        out += [part[i] for part in everyone if i < len(part)]
    return out
