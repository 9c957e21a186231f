import csv

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir

from subseg.core import io, labels
from subseg.tasks import predict


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("predict", overrides=[f"out_dir={tmp_path / 'pred'}", *overrides])


def test_prediction_comes_back_on_the_input_grid(tiny_cohorts, checkpoint, tmp_path):
    image = tiny_cohorts["target"] / "images" / "t001.nii.gz"
    assert nib.aff2axcodes(nib.load(image).affine) == ("L", "I", "A")
    rows = predict.predict(
        _cfg(
            tmp_path,
            f"ckpt={checkpoint}",
            f"input={image}",
            "atlas=none",
            "probabilities=true",
            "raw_ids=aseg",
        )
    )
    source, seg = nib.load(image), nib.load(tmp_path / "pred" / "t001_seg.nii.gz")
    assert seg.shape == source.shape
    np.testing.assert_array_equal(seg.affine, source.affine)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, *labels.class_lookup("aseg")}
    prob = nib.load(tmp_path / "pred" / "t001_prob.nii.gz")
    assert prob.shape == (*source.shape, 15)
    np.testing.assert_allclose(np.asarray(prob.dataobj).sum(axis=-1), 1.0, atol=1e-4)
    with open(tmp_path / "pred" / "volumes.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["structure"] for r in table] == list(labels.STRUCTURES) and len(rows) == 14
    classes = labels.map_to_classes(np.asarray(seg.dataobj), "aseg")
    voxel = abs(np.linalg.det(source.affine[:3, :3]))
    for row in table:
        expected = (classes == labels.class_of(row["structure"])).sum() * voxel
        assert float(row["volume_mm3"]) == pytest.approx(expected)
    assert (tmp_path / "pred" / "t001_qc.png").is_file()


def test_folder_input_and_bad_inputs(tiny_cohorts, checkpoint, tmp_path):
    folder = tiny_cohorts["source"] / "images"
    rows = predict.predict(_cfg(tmp_path, f"ckpt={checkpoint}", f"input={folder}", "atlas=none"))
    assert len({r["subject"] for r in rows}) == 3
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(io.InputError, match="broken.ckpt: not a readable subseg checkpoint"):
        predict.predict(_cfg(tmp_path, f"ckpt={broken}", f"input={folder}", "atlas=none"))
    with pytest.raises(io.InputError, match="no such file or folder"):
        predict.predict(_cfg(tmp_path, f"ckpt={checkpoint}", f"input={tmp_path / 'x.nii'}"))


def test_qc_csv_ranks_the_scans_and_names_the_ones_to_check_first(
    tiny_cohorts, checkpoint, tmp_path, monkeypatch, capsys
):
    from subseg.evaluation import quality

    real = quality.structure_scores
    calls = []

    def one_scan_off(classes, probabilities, prior):  # the second scan's thalamus far off
        scores = [{**s, "qc": 0.8} for s in real(classes, probabilities, prior)]
        calls.append(None)
        if len(calls) == 2:
            scores[0]["qc"] = 0.3
        return scores

    monkeypatch.setattr(quality, "structure_scores", one_scan_off)
    folder = tiny_cohorts["source"] / "images"
    predict.predict(_cfg(tmp_path, f"ckpt={checkpoint}", f"input={folder}", "atlas=none"))
    with open(tmp_path / "pred" / "qc.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["subject"] for r in table] == ["s001", "s000", "s002"]  # the likeliest wrong first
    assert [r["flagged"] for r in table] == ["True", "False", "False"]
    assert table[0]["worst_structure"] == labels.STRUCTURES[0]
    with open(tmp_path / "pred" / "volumes.csv", newline="") as f:
        assert {float(r["qc"]) for r in csv.DictReader(f)} == {0.8, 0.3}
    out = capsys.readouterr().out
    assert "check first: 1 scan(s)" in out and f"s001 ({labels.STRUCTURES[0]} 0.30)" in out


def test_a_batch_is_checked_before_any_scan_is_segmented(tiny_cohorts, checkpoint, tmp_path):
    scan = tiny_cohorts["source"] / "images" / "s000.nii.gz"
    twin = tmp_path / "other" / "s000.nii.gz"
    twin.parent.mkdir()
    twin.write_bytes(scan.read_bytes())
    with pytest.raises(io.InputError, match="same name as .* would overwrite each other"):
        predict.predict(
            _cfg(tmp_path, f"ckpt={checkpoint}", f"input=[{scan},{twin}]", "atlas=none")
        )
    broken = tmp_path / "bad" / "zz.nii.gz"
    broken.parent.mkdir()
    broken.write_bytes(b"not a nifti")
    with pytest.raises(io.InputError, match="zz.nii.gz: cannot be read as NIfTI"):
        predict.predict(
            _cfg(tmp_path, f"ckpt={checkpoint}", f"input=[{scan},{broken}]", "atlas=none")
        )
    assert not (tmp_path / "pred" / "s000_seg.nii.gz").exists()  # nothing segmented first


def test_a_scan_that_fails_is_skipped_and_the_batch_finishes(
    tiny_cohorts, checkpoint, tmp_path, monkeypatch
):
    folder = tiny_cohorts["source"] / "images"
    segment = predict.segment_scan

    def fails_on_s001(net, prepare, path, cfg, out_dir, manifest, *rest):
        if path.name == "s001.nii.gz":  # fails after writing part of its outputs
            (out_dir / "s001_seg.nii.gz").write_bytes(b"partial")
            manifest.claim(out_dir / "s001_seg.nii.gz")
            raise RuntimeError("registration diverged\nlong library detail")
        return segment(net, prepare, path, cfg, out_dir, manifest, *rest)

    monkeypatch.setattr(predict, "segment_scan", fails_on_s001)
    out = tmp_path / "pred"
    with pytest.raises(io.InputError, match=r"1 of 3 scans failed and were skipped"):
        predict.predict(_cfg(tmp_path, f"ckpt={checkpoint}", f"input={folder}", "atlas=none"))
    assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == [
        "s000_seg.nii.gz",
        "s002_seg.nii.gz",
    ]
    with open(out / "volumes.csv", newline="") as f:
        assert {r["subject"] for r in csv.DictReader(f)} == {"s000", "s002"}
    with open(out / "failures.csv", newline="") as f:
        (failure,) = list(csv.DictReader(f))
    assert failure["scan"].endswith("s001.nii.gz")
    assert failure["error"] == "RuntimeError: registration diverged"

    monkeypatch.setattr(predict, "segment_scan", segment)  # fixed: the rerun is clean
    predict.predict(_cfg(tmp_path, f"ckpt={checkpoint}", f"input={folder}", "atlas=none"))
    assert not (out / "failures.csv").exists() and (out / "s001_seg.nii.gz").is_file()


def test_a_full_disk_stops_the_batch_with_one_line(
    tiny_cohorts, checkpoint, tmp_path, monkeypatch, capsys
):
    import errno

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "pred" / "x"))

    monkeypatch.setattr(predict, "segment_scan", disk_full)
    folder = tiny_cohorts["source"] / "images"
    with pytest.raises(SystemExit) as exit_, io.cli_errors():
        predict.predict(_cfg(tmp_path, f"ckpt={checkpoint}", f"input={folder}", "atlas=none"))
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        last == f"subseg: error: {tmp_path / 'pred' / 'x'}: cannot write (No space left on device)"
    )


def test_an_unwritable_output_folder_is_one_line(tiny_cohorts, checkpoint, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    scan = tiny_cohorts["source"] / "images" / "s000.nii.gz"
    cfg = _cfg(tmp_path, f"ckpt={checkpoint}", f"input={scan}", "atlas=none")
    cfg.out_dir = str(blocker / "pred")
    with pytest.raises(io.InputError, match=r"a_file/pred: cannot write here \(Not a directory\)"):
        predict.predict(cfg)


def test_a_segmentation_with_its_sides_exchanged_is_warned(
    tiny_cohorts, checkpoint, tmp_path, monkeypatch, caplog
):
    import logging

    from subseg.core import sides

    scan = tiny_cohorts["target"] / "images" / "t001.nii.gz"
    label = io.load_label(tiny_cohorts["target"] / "labels" / "t001.nii.gz", warn=False)
    truth = labels.map_to_classes(label.data, "aseg")  # on the scan's canonical (RAS) grid
    caplog.set_level(logging.WARNING, logger="subseg")
    for segmentation, warned in ((truth, False), (truth[::-1].copy(), True)):
        monkeypatch.setattr(sides, "_reported", set())
        monkeypatch.setattr(
            predict.inference,
            "segment",
            lambda net, volume, prior, *a, s=segmentation, **k: (
                s,
                np.zeros((labels.NUM_CLASSES, *prior.regions.shape), np.float32),
            ),
        )
        caplog.clear()
        predict.predict(_cfg(tmp_path, f"ckpt={checkpoint}", f"input={scan}", "atlas=none"))
        found = [r.getMessage() for r in caplog.records if "lies left of" in r.getMessage()]
        assert bool(found) == warned
    assert found[0].startswith(f"subseg: warning: {scan}: right ")
