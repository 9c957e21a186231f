import pytest

from subseg.core.labels import STRUCTURES
from subseg.tasks import protocol


def _method(avg, bump=None):
    per = {name: {"mean": avg, "std": 0.0} for name in STRUCTURES}
    for name, value in (bump or {}).items():
        per[name] = {"mean": value, "std": 0.0}
    return {"avg": avg, "per_structure": per}


def test_a_failed_finding_carries_its_per_structure_evidence():
    methods = {
        "no_tl": _method(0.78),
        "tl1": _method(0.80, {"right_putamen": 0.90, "left_amygdala": 0.70}),
        "tl3": _method(0.84),
        "scratch3": _method(0.81),
    }
    checked = {f["claim"]: f for f in protocol.findings(methods)}
    assert set(checked) == {
        "No TL clearly below TL-1 (by >= 0.10 Avg Dice)",
        "TL-3 >= TL-1",
        "TL-3 > scratch-3",
    }  # Nyúl was not run: not checked
    failed = checked["No TL clearly below TL-1 (by >= 0.10 Avg Dice)"]
    assert not failed["holds"] and list(failed["values"]) == ["tl1", "no_tl"]
    gains = failed["per_structure"]
    assert list(gains)[0] == "right_putamen" and list(gains)[-1] == "left_amygdala"
    assert abs(gains["right_putamen"] - 0.12) < 1e-9 and abs(gains["left_amygdala"] + 0.08) < 1e-9
    note = protocol.finding_note(failed)
    assert note.startswith("does NOT hold") and "tl1 − no_tl: right_putamen +0.120" in note
    assert "left_amygdala -0.080" in note
    held = checked["TL-3 > scratch-3"]
    assert held["holds"] and "per_structure" not in held
    assert protocol.finding_note(held).startswith("holds")


class _Early:
    def __init__(self, wait_count, patience=4):
        self.wait_count, self.patience = wait_count, patience


class _Trainer:
    def __init__(self, epochs, interrupted=False, callbacks=()):
        self.current_epoch, self.interrupted, self.callbacks = epochs, interrupted, list(callbacks)
        self.max_epochs = 10


def test_fit_record_says_what_stopped_training():
    from lightning.pytorch.callbacks import Timer

    from subseg.training import fitting

    spent = Timer(duration="00:00:00:01")
    spent.time_remaining = lambda stage=None: 0.0
    left = Timer(duration="00:00:01:00")
    left.time_remaining = lambda stage=None: 30.0
    cases = [
        (_Trainer(10, callbacks=[left]), _Early(1), "max_epochs"),
        (_Trainer(6, callbacks=[left]), _Early(4), "early_stopping"),
        (_Trainer(3, callbacks=[spent]), _Early(0), "max_time"),
        (_Trainer(3, interrupted=True, callbacks=[left]), _Early(0), "interrupted"),
        (_Trainer(3, callbacks=[left]), _Early(0), "other"),
    ]
    for trainer, early, expected in cases:
        record = fitting.fit_record(trainer, early, "00:00:01:00")
        assert record["stopped_by"] == expected and record["epochs"] == trainer.current_epoch


def test_the_suggested_scan_is_compared_with_the_mean_of_the_random_draws():
    methods = {"tl1": {"avg_per_draw": [0.806, 0.782, 0.782]}, "tl1_suggested": {"avg": 0.7904}}
    found = protocol.suggestion_finding(methods)
    assert found["holds"] and found["random_mean"] == pytest.approx(0.79)
    assert (found["random_min"], found["random_max"], found["draws"]) == (0.782, 0.806, 3)
    assert found["percentile"] == pytest.approx(200 / 3)  # above 2 of the 3 runs
    note = protocol._suggestion_note(found)[0]
    assert "reached that mean (+0.0004)" in note and "reaches the TL-1 of 67 % of" in note
    methods["tl1_suggested"]["avg"] = 0.7896
    found = protocol.suggestion_finding(methods)
    assert not found["holds"]
    assert "did NOT reach that mean (-0.0004)" in protocol._suggestion_note(found)[0]
    assert protocol.suggestion_finding({"tl1": methods["tl1"]}) is None
