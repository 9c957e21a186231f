import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, write_nifti
from hydra import compose, initialize_config_dir

from subseg.core import io, labels
from subseg.report import cohort_preview
from subseg.runs import method_keys

TINY = ["dataset@source=synth_tiny_source", "dataset@target=synth_tiny_target"]


def _run(script, *overrides, cwd):
    return subprocess.run(
        [sys.executable, str(REPO / script), *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        # Generous: only a hang should fail it. The quick demo takes about 4 min on an idle
        # 2-core machine and more than 10 on a loaded one (600 s failed under load).
        timeout=3600,
    )


@pytest.mark.slow
def test_demo_quick_tells_the_whole_story(tmp_path):
    common = [f"paths.data_dir={tmp_path / 'data'}", f"output_dir={tmp_path / 'demo'}"]
    result = _run("demo.py", "--config-name", "demo_quick", *common, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "demo"
    summary = json.loads((out / "cohorts.json").read_text())
    source, target = summary["source"], summary["target"]
    assert source["n_subjects"] == target["n_subjects"] == 4
    assert source["orientations"] == ["RAS"] and target["orientations"] == ["LIA"]
    assert source["intensity_max"][0] > 1000 and target["intensity_max"][1] < 300
    for cohort_summary in (source, target):
        volumes = cohort_summary["structure_volumes_mm3"]
        assert len(volumes) == 14 and all(v["mean"] > 100 for v in volumes.values())
    assert "synth_tiny_target — 4 subjects" in (out / "cohorts.md").read_text()
    assert (out / "cohorts.png").stat().st_size > 10_000

    report = json.loads((out / "summary.json").read_text())
    keys = {"no_tl", "tl1", "tl1_suggested", "tl2", "tl3", "scratch3", "nyul_no_tl", "tl0_adabn"}
    assert set(report["methods"]) == keys
    for method in report["methods"].values():
        assert 0.0 <= method["avg"] <= 1.0 and len(method["per_structure"]) == 14
    assert len(report["findings"]) == 4
    # TL-1 on each of the 3 candidates, TL-2 on two draws: every run counts, the report gives
    # their range.
    assert report["methods"]["tl1"]["n_runs"] == 3 and report["methods"]["tl2"]["n_runs"] == 2
    trained = [
        json.loads((out / "runs" / f"tl1_{s}" / "splits.json").read_text())["train"]
        for s in ("t000", "t001", "t002")
    ]
    assert trained == [["t000"], ["t001"], ["t002"]]
    # AdaBN read the 3 candidates' images and said what it did to their quality score.
    free = json.loads((out / "runs" / "tl0_adabn" / "transfer.json").read_text())["label_free"]
    assert free["pool"] == ["t000", "t001", "t002"]
    assert [step["step"] for step in free["steps"]] == ["adabn"]
    assert {"pool_qc_before", "pool_qc_after", "kept"} <= set(free["steps"][0])
    # The report gives the label-free gain as a share of TL-1's over the same 3 scans.
    (found,) = report["label_free"]
    assert found["method"] == "tl0_adabn" and found["pool"] == 3
    assert found["gain"] == pytest.approx(
        report["methods"]["tl0_adabn"]["avg"] - report["methods"]["no_tl"]["avg"]
    )
    # Budgets are epochs; the clock is a safety net the report names when it fires.
    assert isinstance(report["capped"], list)
    assert "source_test" in report["methods"]["tl3"]  # retention on the source scanner
    text = (out / "report.md").read_text()
    assert "| structure | no_tl |" in text and "Source-domain retention" in text
    assert "| Avg range over draws |" in text
    assert "tl0_adabn adapted to 3 unlabelled scans (their labels unread)" in text
    assert ("wall-clock safety net" in text) == bool(report["capped"])
    assert (out / "learning_curve.png").stat().st_size > 5_000
    # TL-1 on suggest.py's top scan, beside the random draws; the quality score checked.
    ranking = (out / "runs" / "tl1_suggested" / "suggest.csv").read_text().splitlines()
    picked = json.loads((out / "runs" / "tl1_suggested" / "splits.json").read_text())["train"]
    assert picked == [ranking[1].split(",")[1]] and len(ranking) == 1 + 3  # header + candidates
    assert report["suggestion"]["draws"] == 3 and "suggest.py ranks first" in text
    assert report["suggestion"]["percentile"] in (0.0, 50.0, 100.0)  # among the 2 other scans
    assert f"reaches the TL-1 of {report['suggestion']['percentile']:.0f} %" in text
    assert -1.0 <= report["quality"]["spearman"] <= 1.0 and "## Quality score" in text
    assert report["quality"]["n_pairs"] == (1 + 3) * 14  # No TL and TL-1's three runs, 1 scan
    assert (out / "quality_vs_dice.png").stat().st_size > 5_000

    image = tmp_path / "data" / "synth" / "synth_tiny_source" / "images" / "s000.nii.gz"
    stamp = image.stat().st_mtime_ns
    only_no_tl = [f"~methods.{m}" for m in sorted(keys - {"no_tl"})]
    again = _run("demo.py", "--config-name", "demo_quick", *common, *only_no_tl, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert image.stat().st_mtime_ns == stamp  # the cached cohort was reused
    assert "reusing the source run" in again.stdout


def test_finetune_and_evaluate_name_what_is_missing_in_one_line(tmp_path):
    result = _run("finetune.py", f"source_run={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"subseg: error: {tmp_path}: neither a subseg training run folder nor a checkpoint file"
    )
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    result = _run(
        "evaluate.py", f"ckpt={tmp_path / 'junk.ckpt'}", "dataset=synth_tiny_target", cwd=tmp_path
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"subseg: error: {tmp_path / 'junk.ckpt'}: not a readable")


@pytest.mark.slow
def test_bad_input_is_one_line_from_the_command_line(tmp_path):
    root = tmp_path / "cohort"
    image = np.random.default_rng(0).uniform(1, 2, (6, 6, 6)).astype(np.float32)
    image[1, 2, 3] = np.nan
    write_nifti(root / "images" / "x1.nii.gz", image)
    write_nifti(root / "labels" / "x1.nii.gz", np.full((6, 6, 6), 10, np.int16))
    result = _run(
        "train.py",
        "dataset=folder",
        f"dataset.root={root}",
        f"paths.output_dir={tmp_path / 'out'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"subseg: error: {root / 'images' / 'x1.nii.gz'}: 1 voxels are NaN or infinite"
    )


def test_cli_errors_unwraps_monai_errors(capsys):
    with pytest.raises(SystemExit) as exit_info, io.cli_errors():
        try:
            raise io.InputError("a.nii.gz: empty brain")
        except io.InputError as exc:
            raise RuntimeError("applying transform <LoadSubjectd>") from exc
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "subseg: error: a.nii.gz: empty brain\n"
    with pytest.raises(SystemExit), io.cli_errors():
        labels.raw_ids({"right_thalamus": 49})
    assert capsys.readouterr().err.startswith("subseg: error: label mapping must name exactly")
    with pytest.raises(KeyError), io.cli_errors():
        raise KeyError("a bug, not bad input: keep the traceback")


def test_summary_of_a_tiny_cohort(tmp_path):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("demo", overrides=[*TINY, f"paths.data_dir={tmp_path}"])
    summary = cohort_preview.summarize_cohort(cfg.target)
    assert summary["groups"] == {"ge": 3, "siemens": 1}
    assert summary["voxel_mm"] == [(2.3438, 2.3438, 3.75)]
    first = summary["subjects"][0]
    voxel = 2.34375 * 2.34375 * 3.75
    raw = io.load_label(tmp_path / "synth" / "synth_tiny_target" / "labels" / "t000.nii.gz")
    assert first["volumes_mm3"]["left_thalamus"] == pytest.approx((raw.data == 10).sum() * voxel)
    assert "| left_thalamus |" in cohort_preview.format_summary(summary)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["target.n_images=0"], "no_tl"),
        (["target.n_images=3"], "tl3"),
        (["target.n_images=2", "freeze=bn_only"], "tl2_bn_only"),
        (["target.n_images=0", "intensity=nyul"], "nyul_no_tl"),
        (["target.n_images=3", "init=scratch", "freeze=none"], "scratch3"),
        (["target.n_images=2", "init=scratch", "mix_source=true"], "mixed2"),
        (["+experiment=full"], "full"),
        (["+experiment=loo", "target.fold=4"], "full"),
        (["target.n_images=all"], "tl_all"),
        (["target.n_images=1", "target.pick=suggested"], "tl1_suggested"),
    ],
)
def test_method_keys_name_the_papers_methods(overrides, key):
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        assert method_keys.method_key(compose("finetune", overrides=overrides)) == key
