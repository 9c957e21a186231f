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


def test_a_label_free_method_is_reported_as_its_share_of_tl1s_gain_with_its_guard():
    methods = {
        "no_tl": {"avg": 0.78},
        "tl1": {"avg_per_draw": [0.82, 0.80]},  # mean gain +0.03
        "tl0_adabn": {"avg": 0.795},
        "tl0_self": {"avg": 0.78},
    }
    step = {"pool_qc_before": 0.674, "pool_qc_after": 0.677}
    step |= {"pool_agreement_before": 0.747, "pool_agreement_after": 0.755}
    accounts = {
        "tl0_adabn": {"pool": 13, "steps": [{"step": "adabn", **step, "kept": True}]},
        "tl0_self": {
            "pool": 13,
            "steps": [{"step": "self-training round 1", **step, "kept": False}],
        },
        "tl2_never_run": {"pool": 13, "steps": []},
    }
    found = {f["method"]: f for f in protocol.label_free_findings(methods, accounts)}
    assert set(found) == {"tl0_adabn", "tl0_self"}
    assert found["tl0_adabn"]["gain"] == pytest.approx(0.015)
    assert found["tl0_adabn"]["share"] == pytest.approx(0.5)
    assert found["tl0_self"]["share"] == pytest.approx(0.0)
    adabn, self_training = protocol._label_free_notes(list(found.values()))
    assert "+0.0150 over No TL, 0.50 of TL-1's mean gain (+0.0300)" in adabn
    assert "adabn kept (the pool's quality score 0.674 → 0.677" in adabn
    assert "self-training round 1 undone" in self_training
    # TL-1 lost on this cohort: no meaningless ratio.
    methods["tl1"]["avg_per_draw"] = [0.77]
    lost = protocol.label_free_findings(methods, accounts)[0]
    assert lost["share"] is None
    assert "TL-1 did not gain over No TL here (-0.0100)" in protocol._label_free_notes([lost])[0]
    assert protocol.label_free_findings({"tl0_adabn": {"avg": 0.8}}, accounts) == []


def test_a_nyul_step_is_reported_as_the_input_chosen_not_as_a_step_undone():
    step = {"pool_qc_before": 0.726, "pool_qc_after": 0.7256}
    step |= {"pool_agreement_before": 0.79, "pool_agreement_after": 0.785}
    item = {"method": "tl0_nyul_adabn", "avg": 0.80, "gain": 0.01, "tl1_gain": None, "pool": 8}
    steps = [{"step": "nyul", **step, "kept": False}, {"step": "adabn", **step, "kept": True}]
    (note,) = protocol._label_free_notes([{**item, "steps": steps}])
    assert "Nyúl's input not used (the model's own kept) (the pool's quality score 0.726" in note
    assert "nyul undone" not in note and "adabn kept" in note
    steps[0]["kept"] = True
    assert "Nyúl's input chosen" in protocol._label_free_notes([{**item, "steps": steps}])[0]
