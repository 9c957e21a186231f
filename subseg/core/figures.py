"""Figures people would rather see than read, and the one writer every figure goes through.

:func:`save_figure` lays out and writes every PNG subseg makes (overlays, learning curves, the
report's figures, suggestions), atomically; :func:`learning_curve` is a run's loss and
validation Dice per epoch.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from subseg.core import io


def learning_curve(log_csv: str | Path, path: str | Path) -> Path | None:
    """Plot losses and whole-volume Dice per epoch from a Lightning CSV log.

    Args:
        log_csv: ``logs/metrics.csv`` of a run (Lightning's CSVLogger).
        path: the PNG to write.

    Returns:
        The PNG path, or ``None`` when the log holds no epoch-level values.
    """
    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))

    def series(key: str) -> tuple[np.ndarray, np.ndarray]:
        points = [(float(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return (np.array([p[0] for p in points]), np.array([p[1] for p in points]))

    fig = Figure(figsize=(10, 3.6))
    loss_ax, dice_ax = fig.subplots(1, 2)
    drawn = False
    for key, label in (("train_loss_epoch", "train"), ("val_loss", "validation")):
        x, y = series(key)
        if x.size:
            loss_ax.plot(x, y, marker="o", label=label)
            drawn = True
    x, y = series("val_dice_mean")
    if x.size:
        dice_ax.plot(x, y, marker="o", color="tab:green")
    if not drawn:
        return None
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    loss_ax.legend()
    dice_ax.set(xlabel="epoch", ylabel="mean Dice (14 structures)", title="whole-volume validation")
    return save_figure(fig, path)


def _bottom_band(fig: Figure) -> float:
    # tight_layout ignores figure legends, so measure those anchored at the bottom (add_legend's)
    # and keep the axes above them.
    top = 0.0
    for legend in fig.legends:
        box = legend.get_window_extent().transformed(fig.transFigure.inverted())
        if box.y0 < 0.5:
            top = max(top, box.y1)
    return min(top, 0.5)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save a matplotlib figure atomically (figures are built without pyplot: no display).

    Axes are laid out with ``tight_layout`` above any colour key drawn below them
    (:func:`subseg.core.overlay.add_legend`).
    """
    fig.tight_layout(rect=(0, _bottom_band(fig), 1, 1))
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    return Path(path)
