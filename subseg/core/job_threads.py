"""Threads for one job: the cores this process may use, shared by the jobs running beside it.

A sweep run by Hydra's joblib launcher (``hydra/launcher=parallel``) starts ``n_jobs`` jobs at
once on one machine. If each took every core for torch, the machine would run ``n_jobs`` times
as many threads as it has cores and every job would slow down; so each job takes its share. The
basic launcher runs one job at a time, and a SLURM job (submitit) has an allocation of its own,
which the process's CPU affinity already reports: both keep every core they may use.
"""

from __future__ import annotations

import os


def cores() -> int:
    """The cores this process may use: its CPU affinity (a SLURM allocation, ``taskset``)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # macOS and Windows have no affinity call


def jobs_at_once() -> int:
    """How many jobs the running Hydra launcher starts at the same time on this machine.

    Returns:
        The joblib launcher's ``n_jobs`` in a multirun (-1: one per core, -2: all but one, as
        joblib counts); 1 for a single run, for launchers without ``n_jobs`` (the basic one,
        submitit) and without Hydra (a task function called directly, as tests do).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return 1
    hydra = HydraConfig.get()
    # Without -m the launcher is never used, whichever one the config selects.
    if hydra.mode != RunMode.MULTIRUN:
        return 1
    n_jobs = hydra.launcher.get("n_jobs")
    if n_jobs is None:
        return 1
    n_jobs = int(n_jobs)
    if n_jobs < 0:
        return max(1, cores() + 1 + n_jobs)
    return max(1, n_jobs)


def share(threads: int = 0) -> int:
    """The threads one job should use.

    Args:
        threads: the config's ``threads``; > 0 is used as given.

    Returns:
        ``threads`` when > 0; otherwise the cores this process may use divided by the jobs the
        launcher runs at once, at least 1.
    """
    if threads > 0:
        return threads
    return max(1, cores() // jobs_at_once())


def apply(threads: int = 0) -> int:
    """Set torch's intra-op threads to this job's share (:func:`share`) and return it.

    Entry points (``train.py`` & co.) call it first, so all of the job's tensor work runs with
    it.

    Args:
        threads: the config's ``threads`` (0: this job's share of the cores).

    Returns:
        The number of threads set.
    """
    import torch  # here: ITK workers read share() without importing torch

    n = share(int(threads))
    torch.set_num_threads(n)
    return n
