"""The boundary to ANTsPy: import with ITK's thread count, arrays as ANTs images, worker pools.

Registration (:mod:`subseg.preprocessing.atlas`) and bias-field correction
(:mod:`subseg.preprocessing.bias`) both run ITK filters through ANTsPy; what they share about
talking to it lives here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from rich.progress import track


def load(threads: int = 0):
    """Import ANTsPy with ITK's thread count set (ITK reads it once, when the library loads).

    Args:
        threads: ITK threads; 0 = this job's share of the cores it may use (a SLURM
            allocation, not every core the machine has; shared among a launcher's parallel
            jobs: :func:`subseg.core.job_threads.share`).
    """
    if "ants" not in sys.modules:
        from subseg.core import job_threads

        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(job_threads.share(threads))
    import ants

    return ants


def image(ants, array: np.ndarray, affine: np.ndarray):
    """An ANTs image of a voxel array with a RAS affine (ITK's physical space is LPS)."""
    lps = np.diag([-1.0, -1.0, 1.0])
    matrix = lps @ affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    return ants.from_numpy(
        np.ascontiguousarray(array, dtype=np.float32),
        origin=tuple(float(v) for v in lps @ affine[:3, 3]),
        spacing=tuple(float(v) for v in spacing),
        direction=matrix / spacing,
    )


def progress(items: Iterable, description: str, enabled: bool = True):
    """A rich progress bar over ``items`` (or the items as they are)."""
    if not enabled:
        return items
    items = list(items)
    return track(items, description=description, total=len(items))


def map_in_processes(
    function: Callable,
    arguments: Sequence[tuple],
    description: str,
    initializer: Callable | None = None,
    initargs: tuple = (),
    workers: int | None = None,
    progress_bar: bool = True,
) -> None:
    """Call ``function(*args)`` for every entry of ``arguments``, one single-threaded ITK per core.

    One multi-threaded ITK filter keeps two cores only partly busy; one single-threaded filter
    per core gets more volumes through. Results are not returned: the functions publish them
    (to a cache).

    Args:
        function: a module-level function (it is pickled to the workers).
        arguments: one argument tuple per call.
        description: the progress bar's text.
        initializer: run once in each worker, after ITK is set to one thread.
        initargs: its arguments.
        workers: processes (default: one per core of this job's share,
            :func:`subseg.core.job_threads.share`).
        progress_bar: show a progress bar.
    """
    if not arguments:  # everything cached: no progress bar sitting at 0 %
        return
    from subseg.core import job_threads

    workers = max(1, min(len(arguments), workers or job_threads.share()))
    if workers == 1:
        if initializer is not None:
            initializer(*initargs)
        for args in progress(arguments, description, progress_bar):
            function(*args)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # "spawn": workers start free of the parent's threads (torch); each loads ITK single-threaded.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_start_worker,
        initargs=(initializer, initargs),
    ) as pool:
        futures = [pool.submit(function, *args) for args in arguments]
        for future in progress(as_completed(futures), description, progress_bar):
            future.result()


def _start_worker(initializer: Callable | None, initargs: tuple) -> None:
    load(1)  # one ITK thread per worker process (ITK reads it once, when the library loads)
    if initializer is not None:
        initializer(*initargs)
