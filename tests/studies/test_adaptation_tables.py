"""The adaptation study's tables (studies/adaptation.py): the goals' figures come from them."""

import importlib.util

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("adaptation", REPO / "studies/adaptation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(no_tl, adabn, tl1, kept=True):
    return {
        "no_tl": no_tl,
        "tl0_adabn": adabn,
        "tl0_adabn_guard": [{"step": "adabn", "kept": kept}],
        "tl1_mean": sum(tl1) / len(tl1),
        "tl1_min": min(tl1),
        "tl1_max": max(tl1),
    }


def test_mean_gain_is_over_scanners_and_an_undone_step_is_shown(study):
    table = {
        # TL-1 below No TL on one scanner: a per-scanner ratio would be meaningless there.
        "a": _row(0.80, 0.81, [0.78, 0.79]),
        "b": _row(0.70, 0.70, [0.78, 0.80], kept=False),
    }
    text = study.markdown({"scanners": table, "rules": {}})
    # TL-1 gains −0.015 and +0.09 (mean +0.0375); AdaBN +0.01 and 0 (mean +0.005, 0.13 of it).
    assert "TL-1 +0.0375; tl0_adabn +0.0050 (0.13 of TL-1's, lowest +0.0000)" in text
    assert "0.7000 [guard undid adabn]" in text
    assert "0.8100 [guard" not in text
    # A Nyúl choice that kept the model's own input is not a step undone.
    table["a"]["tl0_nyul_adabn"] = 0.81
    table["a"]["tl0_nyul_adabn_guard"] = [{"step": "nyul", "kept": False}, {"step": "adabn"}]
    text = study.markdown({"scanners": table, "rules": {}})
    assert "| 0.8100 [Nyúl's input not used] |" in text


def test_rules_table_gives_each_pick_and_the_mean_percentile(study):
    rules = {
        "coverage (medoid)": {
            "a": {"scan": "a006", "tl1": 0.79, "percentile": 100.0},
            "b": {"scan": "b003", "tl1": 0.80, "percentile": 50.0},
        }
    }
    text = study.markdown({"scanners": {"a": {}, "b": {}}, "rules": rules})
    assert "| coverage (medoid) | a006 0.7900 (100) | b003 0.8000 (50) | 75 |" in text


def test_a_label_with_the_pool_is_set_against_the_same_scans_tl1_alone(study):
    row = {"tl1_adabn": 0.8123, "tl1_adabn_alone": {"scan": "b003", "tl1": 0.8010}}
    text = study.markdown({"scanners": {"b": row}, "rules": {}})
    assert "- b: tl1_adabn on b003 0.8123, against TL-1 on it alone 0.8010 (+0.0113)" in text
    assert "| 0.8123 |" in text


def test_the_scan_a_label_with_the_pool_used_is_read_from_its_run(study, tmp_path):
    run = tmp_path / "tl1_adabn"
    run.mkdir()
    (run / "splits.json").write_text('{"train": ["b003"], "val": [], "test": ["b002"]}')
    assert study.tl1_alone(run, {"b003": 0.801, "b008": 0.802}) == {"scan": "b003", "tl1": 0.801}
    assert study.tl1_alone(run, {"b008": 0.802}) is None  # that scan's TL-1 not run
