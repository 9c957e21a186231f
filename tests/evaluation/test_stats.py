import numpy as np
import pytest
from scipy import stats as scipy_stats

from subseg.evaluation import stats


def _rows(values, subjects=("a", "b", "c", "d", "e"), structures=("x", "y", "z")):
    it = iter(values)
    return [{"subject": s, "structure": t, "dsc": next(it)} for s in subjects for t in structures]


def test_wilcoxon_pairs_rows_by_subject_and_structure_and_equals_scipy():
    rng = np.random.default_rng(0)
    a_values = rng.uniform(0.6, 0.9, 15)
    b_values = a_values + rng.normal(0.03, 0.02, 15)
    a_rows, b_rows = _rows(a_values), _rows(b_values)
    b_rows = b_rows[::-1]  # pairing must not depend on row order
    b_rows.append({"subject": "f", "structure": "x", "dsc": 0.5})  # unpaired: ignored
    a_rows[0]["dsc"] = float("nan")  # undefined: the pair is dropped
    a, b = stats.paired(stats.dice_by_pair(a_rows), stats.dice_by_pair(b_rows))
    assert len(a) == 14
    assert sorted(zip(a, b, strict=True)) == sorted(zip(a_values[1:], b_values[1:], strict=True))
    expected = scipy_stats.wilcoxon(a_values[1:], b_values[1:], alternative="two-sided").pvalue
    assert stats.wilcoxon(a, b) == pytest.approx(expected, rel=1e-12)
    assert stats.wilcoxon(a, a) == 1.0


def test_holm_by_hand():
    adjusted = stats.holm([0.01, 0.04, 0.03, float("nan")])
    np.testing.assert_allclose(adjusted[:3], [0.03, 0.06, 0.06])
    assert np.isnan(adjusted[3])
    np.testing.assert_allclose(stats.holm([0.5, 0.6]), [1.0, 1.0])


def test_percentile_rank_is_the_share_of_the_others_reached():
    from subseg.evaluation.stats import percentile_rank

    others = [0.70, 0.75, 0.80, 0.85]
    assert percentile_rank(0.90, others) == 100.0  # the best
    assert percentile_rank(0.60, others) == 0.0  # the worst
    assert percentile_rank(0.80, others) == 75.0  # ties count as reached
    with pytest.raises(ValueError):
        percentile_rank(0.5, [])
