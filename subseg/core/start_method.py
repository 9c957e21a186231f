"""Process pools inside a sweep job: a start method the processes it spawns can set.

Hydra's joblib launcher runs each job in a loky worker process, whose global multiprocessing
start method is ``"loky"``. Python's spawn hands the parent's global start method to every child
it starts, even one started through an explicit ``get_context("spawn")``, and a fresh child
cannot set ``"loky"``: every process pool such a job starts (N4 and registration workers,
synthetic-cohort generation, Lightning's ``ddp_spawn``) dies with ``ValueError: cannot find
context for 'loky'`` (``BrokenProcessPool``). Resetting the worker's start method to Python's
default fixes all of them at once.
"""

from __future__ import annotations

import multiprocessing


def reset_in_loky_worker() -> bool:
    """In a loky worker, give the process Python's default start method back; elsewhere no-op.

    Returns:
        Whether it was reset.
    """
    if multiprocessing.get_start_method(allow_none=True) != "loky":
        return False
    multiprocessing.set_start_method(None, force=True)
    return True
