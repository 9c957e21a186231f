import numpy as np
import pytest

from subseg.evaluation import metrics


def _maps():
    a = np.zeros((60, 70, 50), np.uint8)
    a[10:20, 10:20, 10:20] = 1
    a[30:40, 30:35, 30:40] = 5
    a[30:34, 5:9, 40:44] = 9
    b = np.roll(a, 1, axis=0)
    b[31:33, 6:8, 41:43] = 0
    return a, b


def test_rows_match_hand_computations_and_the_uncropped_volume(monkeypatch):
    reference, prediction = _maps()
    rows = metrics.structure_metrics("s1", prediction, reference, (1.0, 1.0, 2.0))
    thalamus = rows[0]
    assert thalamus["dsc"] == pytest.approx(2 * 900 / 2000)  # a 10-cube moved by one voxel
    assert thalamus["vol_ref_mm3"] == 2000.0 and thalamus["vol_pred_mm3"] == 2000.0
    assert thalamus["hd95_mm"] == pytest.approx(1.0)
    assert np.isnan(rows[1]["dsc"]) and np.isnan(rows[1]["hd95_mm"])  # absent from both
    whole = lambda a, b, margin: tuple(slice(0, s) for s in a.shape)  # noqa: E731
    monkeypatch.setattr(metrics, "_structure_box", whole)
    uncropped = metrics.structure_metrics("s1", prediction, reference, (1.0, 1.0, 2.0))
    for cropped, full in zip(rows, uncropped, strict=True):
        for key in ("dsc", "hd95_mm", "assd_mm"):
            assert cropped[key] == pytest.approx(full[key], nan_ok=True)


def test_weighted_dice_by_hand():
    # Σ DSC / V² ÷ Σ 1 / V²: small structures weigh more.
    assert metrics.weighted_dice([0.9, 0.5], [100.0, 50.0]) == pytest.approx(
        (0.9 / 100**2 + 0.5 / 50**2) / (1 / 100**2 + 1 / 50**2)
    )
    assert metrics.weighted_dice([0.9, np.nan], [100.0, 0.0]) == pytest.approx(0.9)


def test_summary():
    reference, prediction = _maps()
    rows = metrics.structure_metrics("a", prediction, reference, (1, 1, 1))
    rows += metrics.structure_metrics("b", reference, reference, (1, 1, 1))
    summary = metrics.summarize(rows)
    assert summary["n_subjects"] == 2
    thal = summary["per_structure"]["right_thalamus"]
    assert thal["mean"] == pytest.approx((0.9 + 1.0) / 2)
    present = [v["mean"] for v in summary["per_structure"].values() if not np.isnan(v["mean"])]
    assert summary["avg"] == pytest.approx(np.mean(present))


def test_dice_agrees_with_monai_dice_metric():
    import torch
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    rng = np.random.default_rng(0)
    reference = rng.integers(0, 15, (30, 32, 28)).astype(np.uint8)
    prediction = np.where(rng.random(reference.shape) < 0.3, 0, reference).astype(np.uint8)
    rows = metrics.structure_metrics("s", prediction, reference, (1.0, 1.0, 1.5))
    metric = DiceMetric(include_background=False, reduction="none")
    expected = metric(
        one_hot(torch.from_numpy(prediction.astype(np.int64))[None, None], 15),
        one_hot(torch.from_numpy(reference.astype(np.int64))[None, None], 15),
    )[0].numpy()
    np.testing.assert_allclose([r["dsc"] for r in rows], expected, rtol=1e-6)
