"""The bad-input matrix: every entry point, fed each kind of bad input a user can give it.

Each row asserts the one line the user sees (``subseg: error: <file>: <what is wrong>``), the
exit status (2), and that nothing was left behind: no run results, no completion marker, no
segmentation. Warnings (labels with unknown ids or exchanged sides) assert the warning and that
the run goes on. The entry points are called as their scripts call them: the task function
inside :func:`subseg.core.io.cli_errors`, on a config composed by Hydra.
"""

import gzip
import logging
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, new_module
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from subseg.core import io, sides
from subseg.preprocessing.contract import InputContract
from subseg.report import report
from subseg.runs.run_folder import RunFolder
from subseg.tasks import evaluate, finetune, predict, train
from subseg.training import fitting

SUBJECTS = ("t000", "t001", "t002")
BAD = "t001"  # the subject each case spoils


def _compose(name, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.fixture(scope="module")
def good_cohort(tiny_cohorts, tmp_path_factory):
    """A folder cohort of three tiny synthetic subjects (aseg ids)."""
    root = tmp_path_factory.mktemp("good")
    for kind in ("images", "labels"):
        shutil.copytree(tiny_cohorts["target"] / kind, root / kind)
    return root


@pytest.fixture(scope="module")
def model(good_cohort, tmp_path_factory):
    """A complete run folder holding an untrained network (no N4, no atlas: quick to use)."""
    run = RunFolder(tmp_path_factory.mktemp("model") / "run")
    cfg = _compose(
        "train", "dataset=folder", f"dataset.root={good_cohort}", "preprocess=none", "atlas=none"
    )
    run.config_file.parent.mkdir(parents=True)
    OmegaConf.save(cfg, run.config_file)
    torch.manual_seed(0)
    none = {"kind": "none", "name": "none"}
    run.write_contract(InputContract(none, none))
    fitting.save_untrained(run, new_module())
    run.splits_file.write_text(
        '{"dataset": "folder", "train": [], "val": [], "test": ["t000", "t001", "t002"]}'
    )
    run.finish("train", "0" * 16)
    return run


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), path)


def _spoil(root, case):
    """Spoil subject t001's image or label; return the file the error must name."""
    image, label = root / "images" / f"{BAD}.nii.gz", root / "labels" / f"{BAD}.nii.gz"
    stored = nib.load(image)
    data, affine = np.asarray(stored.dataobj), stored.affine
    labels = np.asarray(nib.load(label).dataobj)
    if case == "missing file":
        label.unlink()
        return label
    elif case == "not NIfTI":
        image.write_text("subject,age\nt001,42\n")
    elif case == "truncated":
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    elif case == "2-D":
        _save(image, data[:, :, data.shape[2] // 2], affine)
    elif case == "4-D":
        _save(image, np.stack([data, data], axis=-1), affine)
    elif case == "NaN":
        data = data.astype(np.float32)
        data[3, 3, 3] = np.nan
        _save(image, data, affine)
    elif case == "inf":
        data = data.astype(np.float32)
        data[3, 3, 3] = np.inf
        _save(image, data, affine)
    elif case == "all zero":
        _save(image, np.zeros_like(data), affine)
    elif case == "label shape":
        _save(label, labels[:-1], affine)
        return label
    elif case == "label affine":
        shifted = affine.copy()
        shifted[:3, 3] += 4.0
        _save(label, labels, shifted)
        return label
    elif case == "no expected ids":
        _save(label, np.where(labels > 0, 999, 0).astype(np.int16), affine)
        return label
    else:
        raise ValueError(case)
    return image


# case → the message's text after "subseg: error: <file>: "
IMAGE_CASES = {
    "missing file": "label of subject 't001' not found",
    "not NIfTI": "cannot be read as NIfTI",
    "truncated": "cannot be read as NIfTI",
    "2-D": "expected a 3-D volume",
    "4-D": "a 4-D file with 2 volumes; give one 3-D volume",
    "NaN": "1 voxels are NaN or infinite",
    "inf": "1 voxels are NaN or infinite",
    "all zero": "empty brain",
}
LABEL_CASES = {
    "label shape": "label grid",
    "label affine": "label affine differs from image",
    "no expected ids": "none of the 14 structure ids of aseg is present",
}


def _fails(capsys, call):
    """Run ``call`` as an entry point does; its exit status and last stderr line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_, io.cli_errors():
        call()
    lines = capsys.readouterr().err.strip().splitlines()
    return exit_.value.code, lines[-1] if lines else ""


def _nothing_written(run: RunFolder):
    assert not run.marker_file.exists() and not run.summary_file.exists()
    assert not run.metrics_file.exists() and not run.checkpoints_dir.exists()


def _cohort(tmp_path, good_cohort, case):
    root = tmp_path / "cohort"
    shutil.copytree(good_cohort, root)
    return root, _spoil(root, case) if case in IMAGE_CASES | LABEL_CASES else None


@pytest.mark.parametrize("case", [*IMAGE_CASES, *LABEL_CASES])
def test_train_refuses_a_bad_cohort_file(case, good_cohort, tmp_path, capsys):
    root, named = _cohort(tmp_path, good_cohort, case)
    run = RunFolder(tmp_path / "run")
    cfg = _compose("train", "dataset=folder", f"dataset.root={root}", "preprocess=none")
    status, line = _fails(capsys, lambda: train.train(cfg, run.path))
    expected = {**IMAGE_CASES, **LABEL_CASES}[case]
    assert status == 2 and line.startswith(f"subseg: error: {named}") and expected in line
    _nothing_written(run)
    assert not run.path.exists()  # the files are checked before the run folder is touched


@pytest.mark.parametrize("case", ["NaN", "label affine", "truncated", "no expected ids"])
def test_finetune_and_evaluate_refuse_a_bad_cohort_file(case, good_cohort, model, tmp_path, capsys):
    root, named = _cohort(tmp_path, good_cohort, case)
    expected = {**IMAGE_CASES, **LABEL_CASES}[case]
    tuned = RunFolder(tmp_path / "tuned")
    cfg = _compose("finetune", "dataset=folder", f"dataset.root={root}", f"source_run={model.path}")
    status, line = _fails(capsys, lambda: finetune.finetune(cfg, tuned.path))
    assert status == 2 and line.startswith(f"subseg: error: {named}") and expected in line
    assert not tuned.path.exists()

    out = RunFolder(tmp_path / "evaluated")
    cfg = _compose("evaluate", f"run_dir={model.path}", "dataset=folder", f"dataset.root={root}")
    status, line = _fails(capsys, lambda: evaluate.evaluate(cfg, out.path))
    assert status == 2 and line.startswith(f"subseg: error: {named}") and expected in line
    assert not out.path.exists()


@pytest.mark.parametrize("case", [c for c in IMAGE_CASES if c != "missing file"])
def test_predict_refuses_a_bad_scan_before_segmenting_any(
    case, good_cohort, model, tmp_path, capsys
):
    root, named = _cohort(tmp_path, good_cohort, case)
    out = tmp_path / "pred"
    cfg = _compose("predict", f"run_dir={model.path}", f"input={root / 'images'}")
    cfg.out_dir = str(out)
    status, line = _fails(capsys, lambda: predict.predict(cfg))
    assert status == 2 and line.startswith(f"subseg: error: {named}")
    assert IMAGE_CASES[case] in line
    assert not out.exists() or not any(out.iterdir())


def test_a_missing_scan_is_one_line_for_predict(model, tmp_path, capsys):
    cfg = _compose("predict", f"run_dir={model.path}", f"input={tmp_path / 'nope.nii.gz'}")
    cfg.out_dir = str(tmp_path / "pred")
    assert _fails(capsys, lambda: predict.predict(cfg)) == (
        2,
        f"subseg: error: {tmp_path / 'nope.nii.gz'}: no such file or folder",
    )


def _other_architecture(path):
    """A real Lightning checkpoint, of a different network."""
    import lightning as L

    class Other(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 2)

    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(Other())
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("kind", ["other architecture", "truncated"])
def test_every_model_reader_refuses_a_bad_checkpoint(kind, good_cohort, model, tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    if kind == "other architecture":
        _other_architecture(bad)
    else:
        data = model.checkpoint.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    scan = good_cohort / "images" / "t000.nii.gz"
    predict_cfg = _compose("predict", f"ckpt={bad}", f"input={scan}", "preprocess=none")
    predict_cfg.out_dir = str(tmp_path / "pred")
    evaluate_cfg = _compose(
        "evaluate", f"ckpt={bad}", "dataset=folder", f"dataset.root={good_cohort}", "atlas=none"
    )
    finetune_cfg = _compose(
        "finetune", "dataset=folder", f"dataset.root={good_cohort}", f"source_run={bad}"
    )
    for call in (
        lambda: predict.predict(predict_cfg),
        lambda: evaluate.evaluate(evaluate_cfg, tmp_path / "evaluated"),
        lambda: finetune.finetune(finetune_cfg, tmp_path / "tuned"),
    ):
        status, line = _fails(capsys, call)
        assert status == 2 and line.startswith(f"subseg: error: {bad}: ")
        assert "not a readable" in line or "not a subseg model" in line
    assert not (tmp_path / "pred").exists() or not any((tmp_path / "pred").iterdir())
    assert not (tmp_path / "evaluated").exists() and not (tmp_path / "tuned").exists()


def test_an_empty_dataset_folder_and_too_many_images(tmp_path, model, good_cohort, capsys):
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    cfg = _compose("train", "dataset=folder", f"dataset.root={empty}")
    status, line = _fails(capsys, lambda: train.train(cfg, tmp_path / "run"))
    assert status == 2 and line.startswith(
        f"subseg: error: {empty}: dataset 'folder' has no images"
    )
    assert not (tmp_path / "run").exists()

    cfg = _compose(
        "finetune",
        "dataset=folder",
        f"dataset.root={good_cohort}",
        f"source_run={model.path}",
        "target.n_images=7",
    )
    status, line = _fails(capsys, lambda: finetune.finetune(cfg, tmp_path / "tuned"))
    assert status == 2 and "target.n_images=7" in line and "3" in line
    assert not (tmp_path / "tuned").exists()


def test_an_unwritable_output_folder_is_one_line_everywhere(model, good_cohort, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder should be")
    scan = good_cohort / "images" / "t000.nii.gz"
    predict_cfg = _compose("predict", f"run_dir={model.path}", f"input={scan}")
    predict_cfg.out_dir = str(blocker / "pred")
    train_cfg = _compose(
        "train", "dataset=folder", f"dataset.root={good_cohort}", "preprocess=none", "atlas=none"
    )
    finetune_cfg = _compose(
        "finetune", "dataset=folder", f"dataset.root={good_cohort}", f"source_run={model.path}"
    )
    evaluate_cfg = _compose("evaluate", f"run_dir={model.path}")
    for call, folder in (
        (lambda: predict.predict(predict_cfg), blocker / "pred"),
        (lambda: train.train(train_cfg, blocker / "run"), blocker / "run"),
        (lambda: finetune.finetune(finetune_cfg, blocker / "tuned"), blocker / "tuned"),
        (lambda: evaluate.evaluate(evaluate_cfg, blocker / "evaluated"), blocker / "evaluated"),
        (lambda: report.write_report([], blocker / "report"), blocker / "report"),
    ):
        assert _fails(capsys, call) == (
            2,
            f"subseg: error: {folder}: cannot write here (Not a directory)",
        )


def test_the_report_refuses_folders_without_complete_runs(tmp_path, capsys):
    status, line = _fails(capsys, lambda: report.main([str(tmp_path), "--out", str(tmp_path)]))
    assert status == 2 and line == (
        f"subseg: error: {tmp_path}: no complete fine-tuning run folders (with complete.json)"
    )
    assert not (tmp_path / "report.md").exists()


@pytest.mark.parametrize("case", ["unknown extra ids", "sides exchanged"])
def test_suspicious_labels_warn_at_load_naming_the_file(
    case, good_cohort, tmp_path, caplog, monkeypatch
):
    root = tmp_path / "cohort"
    shutil.copytree(good_cohort, root)
    label = root / "labels" / f"{BAD}.nii.gz"
    stored = nib.load(label)
    data = np.asarray(stored.dataobj).astype(np.int16)
    if case == "unknown extra ids":
        data[0, 0, 0] = 7000  # not an id FreeSurfer's tables use
        expected = "raw id 7000 is not an id of the aseg protocol"
    else:
        data = data[::-1]  # stored mirrored against its header
        expected = "lies left of left"
    _save(label, data, stored.affine)
    monkeypatch.setattr(sides, "_reported", set())  # warnings are once per file and process
    caplog.set_level(logging.WARNING, logger="subseg")
    from subseg.training import preparation

    dataset = OmegaConf.to_container(
        _compose("train", "dataset=folder", f"dataset.root={root}").dataset, resolve=True
    )
    assert [s.id for s in preparation.check_cohort(dataset)] == list(SUBJECTS)
    (warning,) = [r.getMessage() for r in caplog.records if BAD in r.getMessage()]
    assert warning.startswith(f"subseg: warning: {label}: ") and expected in warning


def test_a_compressed_file_cut_short_names_itself(good_cohort, tmp_path, capsys):
    scan = tmp_path / "cut.nii.gz"
    raw = gzip.decompress((good_cohort / "images" / "t000.nii.gz").read_bytes())
    scan.write_bytes(gzip.compress(raw[: len(raw) // 3]))  # valid gzip, too few voxels
    status, line = _fails(capsys, lambda: io.load_image(scan))
    assert status == 2 and line.startswith(f"subseg: error: {scan}: ")
