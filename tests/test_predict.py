import csv

import lightning as L
import nibabel as nib
import numpy as np
import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir

from subseg import io, labels, tasks
from subseg.lit_module import SegmentationModule


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained network saved as a Lightning checkpoint, as training would."""
    L.seed_everything(0)
    module = SegmentationModule(dropout=0.3, lr=1e-3)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(module)
    path = tmp_path_factory.mktemp("ckpt") / "best.ckpt"
    trainer.save_checkpoint(path)
    return path


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("predict", overrides=[f"out_dir={tmp_path / 'pred'}", *overrides])


def test_prediction_comes_back_on_the_input_grid(tiny_cohorts, checkpoint, tmp_path):
    image = tiny_cohorts["target"] / "images" / "t001.nii.gz"
    assert nib.aff2axcodes(nib.load(image).affine) == ("L", "I", "A")
    rows = tasks.predict(
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
    rows = tasks.predict(_cfg(tmp_path, f"ckpt={checkpoint}", f"input={folder}", "atlas=none"))
    assert len({r["subject"] for r in rows}) == 3
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(io.InputError, match="broken.ckpt: not a readable subseg checkpoint"):
        tasks.predict(_cfg(tmp_path, f"ckpt={broken}", f"input={folder}", "atlas=none"))
    with pytest.raises(io.InputError, match="no such file or folder"):
        tasks.predict(_cfg(tmp_path, f"ckpt={checkpoint}", f"input={tmp_path / 'x.nii'}"))


def test_a_batch_is_checked_before_any_scan_is_segmented(tiny_cohorts, checkpoint, tmp_path):
    scan = tiny_cohorts["source"] / "images" / "s000.nii.gz"
    twin = tmp_path / "other" / "s000.nii.gz"
    twin.parent.mkdir()
    twin.write_bytes(scan.read_bytes())
    with pytest.raises(io.InputError, match="same name as .* would overwrite each other"):
        tasks.predict(_cfg(tmp_path, f"ckpt={checkpoint}", f"input=[{scan},{twin}]", "atlas=none"))
    broken = tmp_path / "bad" / "zz.nii.gz"
    broken.parent.mkdir()
    broken.write_bytes(b"not a nifti")
    with pytest.raises(io.InputError, match="zz.nii.gz: cannot be read as NIfTI"):
        tasks.predict(
            _cfg(tmp_path, f"ckpt={checkpoint}", f"input=[{scan},{broken}]", "atlas=none")
        )
    assert not (tmp_path / "pred" / "s000_seg.nii.gz").exists()  # nothing segmented first
