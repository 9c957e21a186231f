import csv
import json

import numpy as np
import pytest
import yaml

from subseg.core import cache, io
from subseg.core.labels import STRUCTURES
from subseg.evaluation import metrics, stats
from subseg.report import report
from subseg.runs import method_keys
from subseg.runs.run_folder import RunFolder


def _run_folder(root, method, k, draw, dice_by_subject, source=None):
    folder = root / f"{method}_d{draw}"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"target": {"n_images": k, "draw": draw}})
    )
    rows = [
        {
            "subject": subject,
            "structure": name,
            "dsc": dice + 0.01 * i,
            "hd95_mm": 1.0,
            "assd_mm": 0.5,
            "vol_ref_mm3": 100.0 + 10 * i,
            "vol_pred_mm3": 100.0,
        }
        for subject, dice in dice_by_subject.items()
        for i, name in enumerate(STRUCTURES)
    ]
    run = RunFolder(folder)
    summary = {**metrics.summarize(rows), "method": method, "n_images": k}
    run.publish_results(rows, list(metrics.COLUMNS), summary)
    if source is not None:
        _run_folder(folder, "x", 0, 0, source)
        (folder / "x_d0").rename(run.source_test.path)
        run.source_test.marker_file.unlink()  # a run's part, not a run
    run.finish("finetune", "0" * 16)
    return folder


def test_report_table_statistics_and_figures(tmp_path):
    runs = tmp_path / "runs"
    subjects = [f"t{i}" for i in range(6)]
    # No TL is the source model: its retention row is the source run's own test metrics.
    source = _run_folder(tmp_path, "source", 0, 0, {"s1": 0.8})
    (source / "splits.json").write_text(json.dumps({"train": [], "val": [], "test": ["s1"]}))
    model = RunFolder(source).checkpoint
    model.parent.mkdir()
    model.write_bytes(b"the source model")
    no_tl = _run_folder(runs, "no_tl", 0, 0, {s: 0.5 for s in subjects})
    record = {"init": str(model), "source_sha256": cache.file_digest(model)}
    RunFolder(no_tl).transfer_file.write_text(json.dumps(record))
    for draw in (0, 1):
        _run_folder(runs, "tl1", 1, draw, {s: 0.7 + 0.01 * draw for s in subjects[1:]})
        _run_folder(runs, "tl2", 2, draw, {s: 0.75 for s in subjects[2:]}, source={"s1": 0.7})
    _run_folder(runs, "scratch2", 2, 0, {s: 0.4 for s in subjects[2:]})
    for fold, subject in enumerate(subjects):  # leave-one-out folds: pooled as one method
        _run_folder(runs / f"loo{fold}", "full", 5, 0, {subject: 0.9})
    out = tmp_path / "report"
    summary = report.write_report(report.find_runs([runs]), out)

    methods = summary["methods"]
    assert list(methods) == ["no_tl", "tl1", "tl2", "scratch2", "full"]
    assert methods["full"]["n_runs"] == 6 and methods["full"]["n_subjects"] == 6
    assert methods["tl1"]["n_runs"] == 2 and methods["tl1"]["n_subjects"] == 10
    assert methods["tl1"]["avg"] == pytest.approx(0.705 + 0.065, abs=1e-9)
    assert methods["no_tl"]["source_test"]["avg"] == pytest.approx(0.865)
    assert methods["tl2"]["source_test"]["avg"] == pytest.approx(0.765)
    assert "source_test" not in methods["tl1"]
    # p of tl1 vs No TL: scipy's Wilcoxon on subject × structure pairs (tl1's two draws
    # averaged per subject first), Holm-corrected.
    a = [
        np.mean([0.7 + 0.01 * d + 0.01 * i for d in (0, 1)])
        for _ in subjects[1:]
        for i in range(14)
    ]
    b = [0.5 + 0.01 * i for _ in subjects[1:] for i in range(14)]
    raw = [
        stats.wilcoxon(a, b),
        methods["tl2"]["p_vs_baseline"],
        methods["scratch2"]["p_vs_baseline"],
        methods["full"]["p_vs_baseline"],
    ]
    assert methods["tl1"]["p_vs_baseline"] == pytest.approx(raw[0])
    assert methods["tl1"]["p_vs_baseline_holm"] == pytest.approx(stats.holm(raw)[0])

    with open(out / "report.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["structure"] for r in table[:14]] == list(STRUCTURES)
    assert table[14]["structure"] == "Avg" and table[14]["tl2"] == f"{methods['tl2']['avg']:.3f}"
    text = (out / "report.md").read_text()
    assert "Source-domain retention" in text and "| no_tl | 0.865 |" in text
    assert (out / "learning_curve.png").stat().st_size > 5_000
    assert (out / "structures_vs_k.png").stat().st_size > 5_000


def test_a_subject_tested_twice_by_one_method_is_refused(tmp_path):
    _run_folder(tmp_path / "a", "full", 5, 0, {"t0": 0.9})
    _run_folder(tmp_path / "b", "full", 5, 0, {"t0": 0.8})
    with pytest.raises(io.InputError, match="both test t0 with full, draw 0"):
        report.summarize_methods(report.find_runs([tmp_path]))


def test_runs_on_named_scans_are_draws_of_their_own(tmp_path):
    """TL-1 on each candidate in turn (target.ids, every one draw 0) tests the same scans:
    each run is one draw, named by the scans it trained on."""
    for scan, dice in (("t0", 0.7), ("t1", 0.8)):
        folder = _run_folder(tmp_path / scan, "tl1", 1, 0, {"t9": dice})
        (folder / ".hydra" / "config.yaml").write_text(
            yaml.safe_dump({"target": {"n_images": 1, "draw": 0, "ids": [scan]}})
        )
    methods = report.summarize_methods(report.find_runs([tmp_path]), "tl1")["methods"]
    assert methods["tl1"]["draws"] == ["t0", "t1"] and methods["tl1"]["n_runs"] == 2
    assert sorted(methods["tl1"]["avg_per_draw"]) == pytest.approx([0.765, 0.865])


def test_method_families():
    assert method_keys.family_of("tl3") == ("tl", 3)
    assert method_keys.family_of("nyul_tl2") == ("nyul_tl", 2)
    assert method_keys.family_of("scratch3") == ("scratch", 3)
    assert method_keys.family_of("no_tl") == ("no_tl", 0)
    assert method_keys.family_of("tl1_bn_only") == ("tl_bn_only", 1)
    assert method_keys.family_of("tl0_adabn") == ("tl_adabn", 0)
    assert method_keys.family_of("tl1_self") == ("tl_self", 1)


def test_report_names_the_software_each_run_was_made_with(tmp_path):
    from subseg.runs.run_folder import RunFolder

    runs = tmp_path / "runs"
    first = _run_folder(runs, "no_tl", 0, 0, {"t1": 0.5, "t2": 0.6})
    second = _run_folder(runs, "tl1", 1, 0, {"t1": 0.7, "t2": 0.8})
    recorded = RunFolder(first).write_environment("cpu")
    assert recorded["packages"]["torch"].startswith("2.")
    other = {**recorded, "packages": {**recorded["packages"], "torch": "9.9.9"}}
    RunFolder(second).environment_file.write_text(json.dumps(other))
    summary = report.write_report(report.find_runs([runs]), tmp_path / "out")
    lines = sorted(summary["software"])
    assert len(lines) == 2 and any("torch 9.9.9" in line for line in lines)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Software" in text and "made with different software or machines" in text

    RunFolder(second).environment_file.unlink()  # a run from before the record existed
    summary = report.write_report(report.find_runs([runs]), tmp_path / "out2")
    assert summary["software"]["not recorded"] == ["tl1_d0"]


def test_report_skips_a_run_without_its_completion_marker(tmp_path, capsys):
    runs = tmp_path / "runs"
    _run_folder(runs, "no_tl", 0, 0, {"t1": 0.5, "t2": 0.6})
    killed = _run_folder(runs, "tl1", 1, 0, {"t1": 0.9, "t2": 0.9})
    RunFolder(killed).marker_file.unlink()  # what a killed run leaves: results, no marker
    assert [r.method for r in report.find_runs([runs])] == ["no_tl"]
    assert f"skipped {killed}: not a complete run" in capsys.readouterr().err
    RunFolder(runs / "no_tl_d0").marker_file.unlink()
    with pytest.raises(io.InputError, match="no complete fine-tuning run folders"):
        report.find_runs([runs])


def test_report_says_how_many_subjects_a_structure_averages(tmp_path):
    rows = [
        {
            "subject": subject,
            "structure": name,
            # t2's reference label has no left accumbens: no Dice for it
            "dsc": float("nan") if (subject, name) == ("t2", "left_accumbens") else 0.8,
            "hd95_mm": 1.0,
            "assd_mm": 0.5,
            "vol_ref_mm3": 100.0,
            "vol_pred_mm3": 100.0,
        }
        for subject in ("t1", "t2")
        for name in STRUCTURES
    ]
    run = report.Run(folder=tmp_path, method="tl1", n_images=1, draw=0, rows=rows)
    table = {r["structure"]: r["tl1"] for r in report.table_rows(report.summarize_methods([run]))}
    assert table["left_accumbens"].endswith("(1 of 2)")
    assert table["right_accumbens"] == "0.800 ± 0.000"


def test_no_tl_retention_is_dropped_when_the_source_was_trained_again(tmp_path):
    source = _run_folder(tmp_path, "source", 0, 0, {"s1": 0.8})
    model = RunFolder(source).checkpoint
    model.parent.mkdir()
    model.write_bytes(b"the source model")
    no_tl = _run_folder(tmp_path / "runs", "no_tl", 0, 0, {"t1": 0.5})
    record = {"init": str(model), "source_sha256": cache.file_digest(model)}
    RunFolder(no_tl).transfer_file.write_text(json.dumps(record))
    (run,) = report.find_runs([tmp_path / "runs"])
    assert run.source_rows  # the source's own test metrics: No TL's retention row
    model.write_bytes(b"a source model trained again since")
    (run,) = report.find_runs([tmp_path / "runs"])
    assert not run.source_rows  # its metrics are another model's now
