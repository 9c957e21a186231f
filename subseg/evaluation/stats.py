"""Statistics of the paper's comparisons: paired Wilcoxon signed-rank tests with Holm correction.

docs/method.md §8: two methods are compared by a paired two-sided Wilcoxon signed-rank test on
their subject × structure Dice pairs (scipy); across a table of comparisons the p-values are
Holm-corrected. No Lightning or Hydra here: usable from a notebook.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats


def dice_by_pair(rows: Iterable[Mapping], key=("subject", "structure")) -> dict[Hashable, float]:
    """``metrics.csv`` rows → {(subject, structure): Dice}, dropping undefined (NaN) Dice."""
    out = {}
    for row in rows:
        value = float(row["dsc"])
        if np.isfinite(value):
            out[tuple(row[k] for k in key)] = value
    return out


def paired(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> tuple[np.ndarray, ...]:
    """The Dice of the pairs both methods have, in one order: (a values, b values)."""
    common = sorted(set(a) & set(b), key=str)
    return np.array([a[k] for k in common]), np.array([b[k] for k in common])


def wilcoxon(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired samples (scipy).

    Returns:
        The p-value; 1.0 when every pair is equal (no evidence of a difference), NaN with no
        pairs.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size == 0:
        return float("nan")
    if np.all(a == b):  # scipy cannot rank all-zero differences
        return 1.0
    return float(stats.wilcoxon(a, b, alternative="two-sided").pvalue)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni step-down adjusted p-values (NaNs stay NaN and do not count).

    scipy offers Benjamini–Hochberg (``false_discovery_control``) but not Holm's family-wise
    correction, and statsmodels is not a dependency: it is a few lines.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(np.isfinite(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        out[index] = running
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of paired values (scipy); NaN with fewer than three pairs."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size < 3:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def percentile_rank(value: float, others: Sequence[float]) -> float:
    """Where ``value`` stands among ``others``: the share of them it reaches or beats, 0–100.

    100 means no other is higher (ties count as reached); 0 means every other is higher.
    """
    others = np.asarray(list(others), dtype=float)
    if not others.size:
        raise ValueError("a percentile rank needs at least one other value")
    return float(100.0 * np.mean(value >= others))
