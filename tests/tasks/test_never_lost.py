"""Nothing a user made is lost, and nothing wrong is silent: one test per finding of the audit.

Each test reproduces a finding as it was reported (a finished run deleted by another config,
two writers in one folder, predict.py over a manual label, …) and checks the guarantee that
replaced it. The list of guarantees and their tests is in docs/engineering.md ("What subseg
never does to your files").
"""

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from subseg.core import io, labels, sides
from subseg.data import cohort
from subseg.model import inference
from subseg.runs.run_folder import RunFolder
from subseg.tasks import evaluate, finetune, predict


def _compose(name, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _tree(folder):
    """Every file under ``folder`` with its bytes (the command log aside: it logs every command)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix != ".log"
    }


def _finished(run, cfg, data=None):
    digest = run.begin(cfg, data=data)
    run.publish_results([{"subject": "s"}], ["subject"], {"avg": 0.5})
    run.finish("finetune", digest, cfg)
    return digest


# --- 1. a finished run is never replaced by another config -----------------------------------


def test_1_a_finished_run_is_refused_to_another_config_and_kept_byte_for_byte(tmp_path, capsys):
    run = RunFolder(tmp_path / "run")
    _finished(run, _compose("finetune", "source_run=x", "seed=0"))
    before = _tree(run.path)
    with pytest.raises(
        io.InputError, match=r"another configuration \(seed: 0 → 1\).*overwrite=true"
    ):
        run.begin(_compose("finetune", "source_run=x", "seed=1"))
    assert _tree(run.path) == before  # nothing deleted, nothing rewritten
    assert run.begin(_compose("finetune", "source_run=x", "seed=1", "overwrite=true"))
    assert not run.is_complete() and not run.summary_file.exists()  # replaced, as asked
    assert "overwrite=true: replacing the finished run" in capsys.readouterr().err


def test_1_default_names_differ_whenever_the_runs_do():
    base = ["source_run=/runs/a"]
    names = {
        _compose("finetune", *base, *more).name
        for more in (
            [],
            ["seed=1"],
            ["target.ids=[t001]"],
            ["target.pick=suggested"],
            ["recipe=paper"],
            ["source_run=/runs/b"],
            ["dataset=folder", "dataset.root=/data/A"],
            ["dataset=folder", "dataset.root=/data/B"],
        )
    }
    assert len(names) == 8
    assert _compose("finetune", *base).name == _compose("finetune", *base, "resume=true").name
    train = {_compose("train", "dataset=folder", f"dataset.root=/data/{r}").name for r in "AB"}
    assert len(train) == 2 and all(n.startswith("folder_") for n in train)


def _finetune_cli(tmp_path, tiny_cohorts, checkpoint, *overrides, multirun=False):
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "finetune.py"),
            *(["-m"] if multirun else []),  # Hydra's flags come before the overrides
            "dataset=synth_tiny_target",
            "~dataset.synth",  # the session's tiny cohort as it is (never regenerated)
            f"dataset.root={tiny_cohorts['target']}",
            "preprocess=none",
            f"paths.output_dir={tmp_path / 'out'}",
            f"source_run={checkpoint}",
            "atlas=none",
            "target.n_images=0",
            "evaluate_source=false",
            "logger=csv",
            *overrides,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1800,
        env={"WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )


@pytest.mark.slow
def test_1_two_seeds_as_a_new_user_runs_them(tiny_cohorts, checkpoint, tmp_path):
    for seed in (0, 1):  # no name=: both complete, both kept
        done = _finetune_cli(tmp_path, tiny_cohorts, checkpoint, f"seed={seed}")
        assert done.returncode == 0, done.stderr[-3000:]
    runs = [RunFolder(p) for p in sorted((tmp_path / "out" / "finetune").iterdir())]
    assert len(runs) == 2 and all(r.is_complete() for r in runs)
    assert {r.completion()["config"]["seed"] for r in runs} == {0, 1}

    first = _finetune_cli(tmp_path, tiny_cohorts, checkpoint, "seed=0", "name=mine")
    assert first.returncode == 0, first.stderr[-3000:]
    mine = RunFolder(tmp_path / "out" / "finetune" / "mine")
    before = _tree(mine.path)
    second = _finetune_cli(tmp_path, tiny_cohorts, checkpoint, "seed=1", "name=mine")
    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "(seed: 0 → 1)" in errors[0] and "Traceback" not in second.stderr
    assert _tree(mine.path) == before  # the finished run, byte for byte, .hydra/ included
    assert mine.config()["seed"] == 0 and (mine.path / ".hydra" / "overrides.yaml").is_file()
    third = _finetune_cli(
        tmp_path, tiny_cohorts, checkpoint, "seed=1", "name=mine", "overwrite=true"
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert mine.completion()["config"]["seed"] == 1


# --- 2. one writer per folder ----------------------------------------------------------------


def _hold_lock(folder):
    """Another process holding ``folder``'s lock until it is killed."""
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from subseg.core.folder_lock import FolderLock; FolderLock(sys.argv[2]).acquire();"
        "print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(REPO), str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_2_a_second_writer_of_a_run_folder_gets_one_line(tmp_path, capsys):
    run = RunFolder(tmp_path / "run")
    holder = _hold_lock(run.path)
    try:
        with pytest.raises(io.InputError, match=rf"being written by pid {holder.pid}"):
            run.begin(_compose("finetune", "source_run=x"))
        assert not run.started_file.exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the dead writer's lock; its record is reported and taken over.
    digest = run.begin(_compose("finetune", "source_run=x"))
    assert digest and f"previous writer (pid {holder.pid}" in capsys.readouterr().err
    run.finish("finetune", digest, _compose("finetune", "source_run=x"))
    assert not (run.path / ".subseg.lock").exists()  # released at the end


@pytest.mark.slow
def test_2_a_joblib_sweep_over_two_seeds_writes_two_consistent_runs(
    tiny_cohorts, checkpoint, tmp_path
):
    result = _finetune_cli(
        tmp_path, tiny_cohorts, checkpoint, "hydra/launcher=parallel", "seed=0,1", multirun=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((tmp_path / "out" / "finetune").glob("synth_tiny_target_k0_*"))
    assert len(runs) == 2
    for run in map(RunFolder, runs):
        record = run.completion()
        assert record is not None and run.metrics_file.is_file()
        assert record["config"]["name"] == run.path.name  # each folder holds its own job
    assert {RunFolder(r).completion()["config"]["seed"] for r in runs} == {0, 1}


# --- 3. predict.py writes only files it owns -------------------------------------------------


def _predict_cfg(out_dir, checkpoint, image, *more):
    return _compose("predict", f"ckpt={checkpoint}", f"input={image}", "atlas=none",
                    f"out_dir={out_dir}", *more)  # fmt: skip


def test_3_predict_never_replaces_a_manual_label(tiny_cohorts, checkpoint, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(tiny_cohorts["target"] / "images" / "t001.nii.gz", scans / "sub01.nii.gz")
    shutil.copy(tiny_cohorts["target"] / "labels" / "t001.nii.gz", scans / "sub01_seg.nii.gz")
    manual = (scans / "sub01_seg.nii.gz").read_bytes()
    for image in (scans / "sub01.nii.gz", scans):  # a file, and the folder (label beside it)
        with pytest.raises(io.InputError, match="out_dir is the input folder"):
            predict.predict(_predict_cfg(scans, checkpoint, image))
        with pytest.raises(io.InputError, match="out_dir holds the input folder"):
            predict.predict(_predict_cfg(tmp_path, checkpoint, image))
    # From the command line too: Hydra writes no .hydra/ or log file into out_dir first.
    refused = subprocess.run(
        [sys.executable, str(REPO / "predict.py"), f"ckpt={checkpoint}", f"input={scans}",
         f"out_dir={scans}", "atlas=none"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={"WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )  # fmt: skip
    assert refused.returncode == 2 and "out_dir is the input folder" in refused.stderr
    assert (scans / "sub01_seg.nii.gz").read_bytes() == manual
    assert sorted(p.name for p in scans.iterdir()) == ["sub01.nii.gz", "sub01_seg.nii.gz"]

    # Folder input: the label is not taken as a scan. In an out_dir holding someone else's
    # file of an output's name, nothing is written; subseg's own outputs are replaced.
    out = tmp_path / "out"
    out.mkdir()
    foreign = out / "sub01_qc.png"
    foreign.write_bytes(b"the user's own figure")
    with pytest.raises(io.InputError, match="sub01_qc.png: already exists and was not written"):
        predict.predict(_predict_cfg(out, checkpoint, scans))
    assert foreign.read_bytes() == b"the user's own figure"
    assert not (out / "sub01_seg.nii.gz").exists()
    foreign.unlink()
    rows = predict.predict(_predict_cfg(out, checkpoint, scans))
    assert {r["subject"] for r in rows} == {"sub01"}  # sub01_seg was not a scan
    predict.predict(_predict_cfg(out, checkpoint, scans))  # again: its own files, replaced
    manifest = json.loads((out / ".subseg-outputs.json").read_text())["files"]
    assert {"sub01_seg.nii.gz", "sub01_qc.png", "volumes.csv", "qc.csv"} <= set(manifest)

    # An output the user corrected is theirs now.
    corrected = out / "sub01_seg.nii.gz"
    img = nib.load(corrected)
    edited = np.asarray(img.dataobj).copy()
    edited[0, 0, 0] = 1
    nib.save(nib.Nifti1Image(edited, img.affine, img.header), corrected)
    kept = corrected.read_bytes()
    with pytest.raises(io.InputError, match="was edited since subseg wrote it"):
        predict.predict(_predict_cfg(out, checkpoint, scans))
    assert corrected.read_bytes() == kept


def test_3_two_predicts_into_one_out_dir_never_mix(tiny_cohorts, checkpoint, tmp_path):
    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        image = tiny_cohorts["target"] / "images" / "t001.nii.gz"
        with pytest.raises(
            io.InputError, match=rf"this out_dir is being written by pid {holder.pid}"
        ):
            predict.predict(_predict_cfg(out, checkpoint, image))
        assert not (out / "t001_seg.nii.gz").exists()
        assert not (out / ".subseg-outputs.json").exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_3_two_predict_commands_at_once_leave_one_consistent_manifest(
    tiny_cohorts, checkpoint, tmp_path
):
    out = tmp_path / "out"
    inputs = {"a": tiny_cohorts["target"] / "images", "b": tiny_cohorts["source"] / "images"}
    commands = [
        subprocess.Popen(
            [
                sys.executable,
                str(REPO / "predict.py"),
                f"ckpt={checkpoint}",
                f"input={folder}",
                f"out_dir={out}",
                "atlas=none",
                "preprocess=none",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={"WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        )  # fmt: skip
        for folder in inputs.values()
    ]
    results = [(c.wait(timeout=1800), c.stderr.read()) for c in commands]
    for code, err in results:  # each either ran whole or was refused with one line
        assert code == 0 or (code == 2 and "this out_dir is being written by pid" in err), err
    assert any(code == 0 for code, _ in results)
    manifest = json.loads((out / ".subseg-outputs.json").read_text())["files"]
    from subseg.core.cache import file_digest

    for name, digest in manifest.items():  # every listed file is on disk as it was written
        assert file_digest(out / name) == digest, name
    with open(out / "volumes.csv", newline="") as f:
        subjects = {row["subject"] for row in csv.DictReader(f)}
    segs = {p.name.removesuffix("_seg.nii.gz") for p in out.glob("*_seg.nii.gz")}
    assert subjects <= segs and all(f"{s}_seg.nii.gz" in manifest for s in segs)


# --- 5. cohorts are told apart by their files, not their names -------------------------------


def _folder_cohort(root):
    return {"name": "folder", "root": str(root), "image": "images/{id}.nii.gz",
            "label": "labels/{id}.nii.gz", "label_ids": "aseg"}  # fmt: skip


def test_5_evaluating_on_the_source_cohort_uses_its_test_split(tiny_cohorts, tmp_path):
    source, target = _folder_cohort(tiny_cohorts["source"]), _folder_cohort(tiny_cohorts["target"])
    upstream = RunFolder(tmp_path / "source")
    upstream.write_json(
        upstream.splits_file, {"train": ["s000", "s001"], "val": [], "test": ["s002"]}
    )
    upstream.finish("train", "0" * 16, {"dataset": source})
    upstream.config_file.parent.mkdir()
    upstream.config_file.write_text("task: train\n")  # as Hydra's own run folders
    tuned = RunFolder(tmp_path / "tuned")
    tuned.write_json(tuned.splits_file, {"train": ["t000"], "val": [], "test": ["t001", "t002"]})
    tuned.finish("finetune", "1" * 16, {"dataset": target, "source_run": str(upstream.path)})
    cfg = _compose("evaluate", f"run_dir={tuned.path}", "dataset=folder",
                   f"dataset.root={tiny_cohorts['source']}")  # fmt: skip
    dataset, test_ids = evaluate._test_split(cfg, tuned, tuned.checkpoint)
    assert dataset["root"] == str(tiny_cohorts["source"])
    assert test_ids == ["s002"]  # the source's test scan, never its training scans
    own = _compose("evaluate", f"run_dir={tuned.path}", "dataset=folder",
                   f"dataset.root={tiny_cohorts['target']}")  # fmt: skip
    assert evaluate._test_split(own, tuned, tuned.checkpoint)[1] == ["t001", "t002"]
    assert cohort.same_cohort(target, {**target, "root": str(tiny_cohorts["target"]) + "/"})
    assert not cohort.same_cohort(source, target)


# --- 6. "complete" covers the data -----------------------------------------------------------


def test_6_a_corrected_label_or_an_added_scan_runs_again(tiny_cohorts, tmp_path, capsys):
    root = tmp_path / "cohort"
    shutil.copytree(tiny_cohorts["target"], root, ignore=shutil.ignore_patterns(".subseg_cache"))
    dataset = {**_folder_cohort(root)}
    cfg = _compose("finetune", "source_run=x")
    run = RunFolder(tmp_path / "run")
    _finished(run, cfg, cohort.file_digests(dataset))
    assert run.begin(cfg, data=cohort.file_digests(dataset)) is None  # unchanged: skipped

    label = root / "labels" / "t001.nii.gz"
    img = nib.load(label)
    corrected = np.asarray(img.dataobj).copy()
    corrected[corrected == corrected.max()] = 0  # the rater erased a structure
    nib.save(nib.Nifti1Image(corrected, img.affine, img.header), label)
    assert run.begin(cfg, data=cohort.file_digests(dataset)) is not None
    assert "cohort changed since this run finished (labels/t001.nii.gz changed)" in (
        capsys.readouterr().err
    )
    run.finish("finetune", run.read_json(run.started_file)["config_hash"], cfg)

    shutil.copy(root / "images" / "t000.nii.gz", root / "images" / "t009.nii.gz")
    assert run.begin(cfg, data=cohort.file_digests(dataset)) is not None
    assert "images/t009.nii.gz added" in capsys.readouterr().err


# --- 7. outputs hold their values ------------------------------------------------------------


def test_7_raw_ids_are_written_as_themselves(tiny_cohorts, checkpoint, tmp_path, monkeypatch):
    real = inference.segment

    def with_every_structure(net, volume, prior, postprocessing):  # an untrained net finds none
        classes, probabilities = real(net, volume, prior, postprocessing)
        inside = np.argwhere(volume != 0)[: len(labels.STRUCTURES)]
        for cls, voxel in enumerate(inside, 1):
            classes[tuple(voxel)] = cls
        return classes, probabilities

    monkeypatch.setattr(inference, "segment", with_every_structure)
    protocol = {name: 40001 + i for i, name in enumerate(labels.STRUCTURES)}
    image = tiny_cohorts["target"] / "images" / "t001.nii.gz"
    cfg = _predict_cfg(tmp_path / "out", checkpoint, image)
    with open_dict(cfg):
        cfg.raw_ids = protocol
    predict.predict(cfg)
    written = np.unique(np.asarray(nib.load(tmp_path / "out" / "t001_seg.nii.gz").dataobj))
    assert set(written) == {0, *protocol.values()}  # 40001 stays 40001, not -25535
    assert labels.raw_dtype("aseg") == np.uint8 and labels.raw_dtype(protocol) == np.int32
    with pytest.raises(labels.LabelSpecError, match="do not fit a 32-bit integer"):
        labels.raw_dtype({**protocol, "left_thalamus": 2**40})


# --- 9. scan ids are plain file names --------------------------------------------------------


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".hidden", "a\\b", ""])
def test_9_ids_that_are_not_plain_file_names_are_refused(bad, tiny_cohorts, tmp_path):
    cfg = _compose("finetune", "source_run=x", "target.n_images=1")
    with open_dict(cfg):
        cfg.target.ids = [bad]
    with pytest.raises(io.InputError, match="target.ids: scan id .* is not a plain file name"):
        finetune.check_options(cfg)
    dataset = {**_folder_cohort(tiny_cohorts["target"]), "ids": [bad]}
    with pytest.raises(io.InputError, match="is not a plain file name"):
        cohort.list_subjects(dataset)


# --- 10. warnings reach qc.csv ---------------------------------------------------------------


def test_10_side_warnings_and_extraction_are_recorded_per_scan(
    tiny_cohorts, checkpoint, tmp_path, monkeypatch
):
    swapped = "left and right look exchanged (test)"
    calls = []

    def second_scan_swapped(classes, affine):
        calls.append(None)
        return swapped if len(calls) == 2 else None

    monkeypatch.setattr(sides, "side_warning", second_scan_swapped)
    folder = tiny_cohorts["source"] / "images"
    predict.predict(_predict_cfg(tmp_path / "out", checkpoint, folder))
    with open(tmp_path / "out" / "qc.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert table[0]["subject"] == "s001" and table[0]["warnings"] == swapped
    assert table[0]["flagged"] == "True"
    assert [r["warnings"] for r in table[1:]] == ["", ""]
    # The tiny source scans are stripped: taken as they are, each brain's volume recorded.
    assert {r["extraction"] for r in table} == {"stripped"}
    assert all(1.0 < float(r["brain_litres"]) < 2.6 for r in table)


def test_lock_file_names_its_holder(tmp_path):
    from subseg.core.folder_lock import FolderLock

    with FolderLock(tmp_path / "f") as lock:
        record = lock.holder()
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["started"][:10] == time.strftime("%Y-%m-%d") and "command" in record
        assert FolderLock(tmp_path / "f").acquire() is lock  # this process: the same lock
    assert not lock.path.exists()
