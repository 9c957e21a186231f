import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from subseg.core import io, labels
from subseg.runs import trained_model
from subseg.runs.run_folder import RunFolder
from subseg.tasks import finetune

SOURCE = [
    "dataset=synth_tiny_source",
    "atlas=none",
    "sampling.samples_per_subject=400",
    "trainer.max_epochs=2",
    "volume_dice_every=2",
    "sampling.batch_size=64",
    "logger=csv",
]
TARGET = [
    "dataset=synth_tiny_target",
    "sampling.samples_per_subject=300",
    "trainer.max_epochs=2",
    "sampling.batch_size=64",
    "logger=csv",
]


def _run(script, *overrides, cwd):
    result = subprocess.run(
        [sys.executable, str(REPO / script), *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env={"WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin", "HOME": str(cwd)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A tiny source model trained by train.py (a real run folder, .hydra included)."""
    root = tmp_path_factory.mktemp("ft")
    paths = [f"paths.data_dir={root / 'data'}", f"paths.output_dir={root / 'out'}"]
    _run("train.py", *SOURCE, *paths, cwd=root)
    (run,) = (root / "out" / "train").glob("synth_tiny_source_*")  # name_<config id>
    return root, paths, run


def _finetune(root, paths, source, run_name, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("finetune", overrides=[*TARGET, *paths, f"source_run={source}", *overrides])
    run = root / "out" / "finetune" / run_name
    (run / ".hydra").mkdir(parents=True, exist_ok=True)  # as Hydra's own run folders
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return finetune.finetune(cfg, run), run


@pytest.mark.slow
def test_no_tl_and_tl1_with_cached_features(source_run):
    root, paths, source = source_run
    no_tl, run0 = _finetune(root, paths, source, "k0", "target.n_images=0")
    assert no_tl["method"] == "no_tl" and no_tl["n_subjects"] == 4  # nothing drawn: all tested
    kept = torch.load(run0 / "checkpoints" / "best.ckpt")["state_dict"]
    given = torch.load(source / "checkpoints" / "best.ckpt")["state_dict"]
    assert kept.keys() == given.keys()
    assert all(torch.equal(kept[k], given[k]) for k in given)  # the source model as is

    tl1, run1 = _finetune(root, paths, source, "k1", "target.n_images=1")
    assert tl1["method"] == "tl1" and tl1["n_subjects"] == 3
    splits = json.loads((run1 / "splits.json").read_text())
    assert len(splits["train"]) == 1 and splits["train"][0] not in splits["test"]
    record = json.loads((run1 / "transfer.json").read_text())
    assert record["cached_features"] and record["reset"] == ["classifier"]
    assert record["copied"] == len(torch.load(source / "checkpoints" / "best.ckpt")["state_dict"])
    assert not record["skipped"] and not record["missing"]
    # Frozen conv blocks (BatchNorm statistics included) are the source's; the head moved.
    before = torch.load(source / "checkpoints" / "best.ckpt")["state_dict"]
    after = torch.load(run1 / "checkpoints" / "best.ckpt")["state_dict"]
    for name, value in before.items():
        if ".conv" in name:
            assert torch.equal(after[name], value), name
    assert not torch.equal(after["net.fc1.weight"], before["net.fc1.weight"])
    assert (run1 / "metrics.csv").is_file() and (run1 / "learning_curve.png").is_file()
    # Fine-tuning logs per-structure Dice on its held-out voxel samples every epoch.
    with open(run1 / "logs" / "metrics.csv", newline="") as f:
        logged = [row for row in csv.DictReader(f) if row.get("val_sample_dice_mean")]
    assert len(logged) == 2  # two epochs
    assert all(row[f"val_sample_dice/{name}"] for name in labels.STRUCTURES for row in logged)
    assert 0.0 <= float(logged[-1]["val_sample_dice_mean"]) <= 1.0  # tiny: may be 0
    retained = json.loads((run1 / "source_test" / "summary.json").read_text())
    assert retained["dataset"] == "synth_tiny_source" and retained["n_subjects"] == 1

    # A rerun told to replace the run replaces the model (Lightning would save best-v1.ckpt
    # beside the old one); a run of another config there without overwrite=true is refused.
    old_model = (run1 / "checkpoints" / "best.ckpt").read_bytes()
    tl1, run1 = _finetune(
        root, paths, source, "k1", "target.n_images=1", "seed=1", "overwrite=true"
    )
    assert sorted(p.name for p in (run1 / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert (run1 / "checkpoints" / "best.ckpt").read_bytes() != old_model
    with pytest.raises(
        io.InputError, match=r"finished run with another configuration \(seed: 1 → 0"
    ):
        _finetune(root, paths, source, "k1", "target.n_images=2")

    # evaluate.py rebuilds the model from the run folder alone and finds the same Dice.
    _run("evaluate.py", f"run_dir={run1}", *paths, "name=again", cwd=root)
    again = json.loads((root / "out" / "evaluate" / "again" / "summary.json").read_text())
    assert again["avg"] == pytest.approx(tl1["avg"], abs=1e-6)

    # A bare network state_dict (trained elsewhere) is a source too: No TL gives the source
    # run's Dice, and its run folder holds a checkpoint evaluate.py and predict.py can read.
    bare = root / "bare.pt"
    weights = torch.load(source / "checkpoints" / "best.ckpt")["state_dict"]
    torch.save({k.removeprefix("net."): v for k, v in weights.items()}, bare)
    from_file, run = _finetune(root, paths, bare, "bare0", "target.n_images=0", "atlas=none")
    assert from_file["avg"] == pytest.approx(no_tl["avg"], abs=1e-6)
    assert json.loads((run / "transfer.json").read_text())["init"] == str(bare)
    assert not (run / "source_test").exists()
    rebuilt = trained_model.load_network(run / "checkpoints" / "best.ckpt").state_dict()
    assert all(torch.equal(rebuilt[k.removeprefix("net.")], v) for k, v in weights.items())

    # A rerun that stops before its first validation keeps no model at all, never the old one.
    with pytest.raises(io.InputError, match="stopped before its first validation"):
        _finetune(
            root, paths, source, "k1", "target.n_images=1", "trainer.max_epochs=0", "overwrite=true"
        )
    assert not (run1 / "checkpoints" / "best.ckpt").exists()


@pytest.mark.slow
def test_scratch_mixed_and_nyul_baselines(source_run):
    root, paths, source = source_run
    scratch, run = _finetune(
        root, paths, source, "s1", "target.n_images=1", "init=scratch", "freeze=none"
    )
    assert scratch["method"] == "scratch1"
    record = json.loads((run / "transfer.json").read_text())
    assert record["init"] == "scratch" and not record["cached_features"]

    mixed, run = _finetune(
        root,
        paths,
        source,
        "m1",
        "target.n_images=1",
        "init=scratch",
        "freeze=none",
        "mix_source=true",
    )
    assert mixed["method"] == "mixed1"
    source_train = json.loads((source / "splits.json").read_text())["train"]
    assert json.loads((run / "transfer.json").read_text())["mixed_source_images"] == len(
        source_train
    )

    # A leave-one-out fold: full training from scratch on every other target subject.
    fold, run = _finetune(root, paths, source, "loo2", "+experiment=loo", "target.fold=2")
    splits = json.loads((run / "splits.json").read_text())
    assert fold["method"] == "full" and fold["n_subjects"] == 1 and fold["n_images"] == 3
    assert splits["test"] == ["t002"] and "t002" not in splits["train"]

    nyul, run = _finetune(root, paths, source, "n0", "target.n_images=0", "intensity=nyul")
    assert nyul["method"] == "nyul_no_tl"
    landmarks = json.loads((run / "preprocessing.json").read_text())["landmarks"]
    assert len(landmarks) > 3 and landmarks == sorted(landmarks)


@pytest.mark.slow
def test_predict_feeds_the_model_what_it_was_trained_with(source_run):
    """A run with Nyúl standardisation and no atlas: predict.py reads both (and N4) from it."""
    root, paths, source = source_run
    tuned, run = _finetune(
        root, paths, source, "n1", "target.n_images=1", "intensity=nyul", "evaluate_source=false"
    )
    contract = json.loads((run / "preprocessing.json").read_text())
    assert (contract["intensity"], contract["atlas"]["kind"]) == ("nyul", "none")
    assert contract["preprocess"]["kind"] == "n4" and len(contract["landmarks"]) == 11
    assert tuned["fit"]["stopped_by"] in ("max_epochs", "early_stopping")

    _run("evaluate.py", f"run_dir={run}", *paths, "name=n1", "segmentations=true", cwd=root)
    evaluated = root / "out" / "evaluate" / "n1"
    # evaluate.py, from the folder alone, scores the model as the run itself did.
    again = json.loads((evaluated / "summary.json").read_text())
    assert again["avg"] == pytest.approx(tuned["avg"], abs=1e-6)
    subject = json.loads((run / "splits.json").read_text())["test"][0]
    scan = root / "data" / "synth" / "synth_tiny_target" / "images" / f"{subject}.nii.gz"
    out = root / "predicted_n1"
    _run("predict.py", f"run_dir={run}", f"input={scan}", f"out_dir={out}", *paths, cwd=root)
    predicted = np.asarray(nib.load(out / f"{subject}_seg.nii.gz").dataobj)
    expected = np.asarray(nib.load(evaluated / "segmentations" / f"{subject}_seg.nii.gz").dataobj)
    assert predicted.shape == nib.load(scan).shape and expected.any()
    np.testing.assert_array_equal(predicted, expected)

    # Options that contradict the run's record are refused in one line, never applied.
    for option, recorded in (
        ("preprocess=none", "preprocess=n4"),
        ("atlas=harvard_oxford", "atlas=none"),
    ):
        result = subprocess.run(
            [sys.executable, str(REPO / "predict.py"), f"run_dir={run}", f"input={scan}", option],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=300,
            env={"WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin", "HOME": str(root)},
        )
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert last.startswith(f"subseg: error: {run}: the model was trained with {recorded}")


@pytest.mark.slow
def test_finetune_on_the_scans_named_in_a_partly_labelled_folder(source_run, capsys):
    """A user's folder: some scans labelled, some not; fine-tune on exactly the named ones."""
    import shutil

    root, paths, source = source_run
    _finetune(root, paths, source, "k0_for_data", "target.n_images=0")  # the tiny cohort exists
    tiny = root / "data" / "synth" / "synth_tiny_target"
    folder = root / "partly_labelled"
    shutil.copytree(tiny / "images", folder / "images")
    shutil.copytree(tiny / "labels", folder / "labels")
    ids = sorted(p.name.removesuffix(".nii.gz") for p in (folder / "images").glob("*.nii.gz"))
    (folder / "labels" / f"{ids[3]}.nii.gz").unlink()  # not labelled yet
    cohort = ["dataset=folder", f"dataset.root={folder}", "dataset.label_ids=aseg"]
    summary, run = _finetune(
        root, paths, source, "chosen", *cohort, "target.n_images=1", f"target.ids=[{ids[2]}]"
    )
    splits = json.loads((run / "splits.json").read_text())
    assert splits["train"] == [ids[2]] and splits["test"] == [ids[0], ids[1]]
    assert summary["method"] == "tl1" and summary["n_subjects"] == 2
    assert "1 of the 4 scans of folder have no label: they are not used" in capsys.readouterr().out
    with pytest.raises(io.InputError, match=f"target.ids: {ids[3]}: not a labelled scan"):
        _finetune(root, paths, source, "bad", *cohort, f"target.ids=[{ids[3]}]")


def test_finetune_without_a_source_is_one_line(tmp_path):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("finetune", overrides=[*TARGET, f"paths.data_dir={tmp_path}"])
    with pytest.raises(io.InputError, match="name the source model: source_run="):
        finetune.finetune(cfg, tmp_path / "run")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("finetune", overrides=[*TARGET, f"source_run={tmp_path}"])
    with pytest.raises(io.InputError, match="neither a subseg training run folder"):
        finetune.finetune(cfg, tmp_path / "run")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["target.n_images=1.5"], "target.n_images=1.5: give a number of images"),
        (["target.draw=-1"], "target.draw=-1: give a draw number"),
        (["init=random"], "init=random: choose source"),
        (["intensity=minmax"], "intensity=minmax: choose zscore or nyul"),
        (["init=scratch"], "init=scratch trains every layer from random weights: add freeze=none"),
        (["target.pick=best"], "target.pick=best: choose random"),
        (["target.pick=suggested", "target.n_images=0"], "target.pick=suggested takes the top k"),
        (["target.pick=suggested", "target.ids=[t000]"], "target.pick=suggested takes the top k"),
        (["target.loo=2"], "target.loo=2: true or false"),
    ],
)
def test_finetune_options_are_checked_in_one_line(tmp_path, overrides, message):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("finetune", overrides=[*TARGET, f"paths.data_dir={tmp_path}", *overrides])
    with pytest.raises(io.InputError, match=message):
        finetune.finetune(cfg, tmp_path / "run")


@pytest.mark.slow
def test_multirun_gives_one_folder_per_point_and_the_report_gathers_them(source_run):
    root, paths, source = source_run
    sweep_args = [
        "-m",
        *TARGET,
        *paths,
        f"source_run={source}",
        "target.n_images=1,2",
        "evaluate_source=false",
    ]
    _run("finetune.py", *sweep_args, cwd=root)
    sweep = root / "out" / "finetune"
    made = sorted(p.name for p in sweep.glob("synth_tiny_target_k[12]_d0_source_paper_zscore_*"))
    assert len(made) == 2
    first = json.loads((sweep / made[0] / "splits.json").read_text())["train"]
    second = json.loads((sweep / made[1] / "splits.json").read_text())["train"]
    assert set(first) < set(second)  # nested draws: TL-1 ⊂ TL-2

    # The same sweep again: both points are complete with the same config, so both are skipped.
    markers = [RunFolder(sweep / name).marker_file.read_text() for name in made]
    again = _run("finetune.py", *sweep_args, cwd=root)
    assert again.stderr.count("already complete with this configuration and data; skipped") == 2
    assert [RunFolder(sweep / name).marker_file.read_text() for name in made] == markers

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "subseg.report.report",
            *(str(sweep / name) for name in made),
            "--out",
            str(root / "report"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((root / "report" / "summary.json").read_text())
    assert {"tl1", "tl2"} <= set(summary["methods"])
    table = (root / "report" / "report.md").read_text()
    assert "| structure |" in table and "tl2" in table
    assert (root / "report" / "learning_curve.png").stat().st_size > 5_000


def _ids_of(folder):
    return sorted(p.name.removesuffix(".nii.gz") for p in folder.glob("*.nii.gz"))


@pytest.mark.slow
def test_adapt_to_your_scanner_suggest_label_finetune_segment_the_rest(source_run, tmp_path):
    """The user's loop on 6 unlabelled scans: suggest 2 → label them (one by correcting the
    source model's segmentation) → fine-tune on exactly those, no test set → segment the 4 others.
    """
    import shutil

    from subseg.data import synth
    from subseg.preprocessing import transforms

    root, paths, source = source_run
    params = synth.CohortParams(domain="target", n_subjects=6, seed=3, voxel_scale=2.5)
    generated = synth.ensure_cohort(tmp_path / "generated", params, progress=False)
    folder = tmp_path / "my_scanner"
    shutil.copytree(generated / "images", folder / "images")
    scans = _ids_of(folder / "images")
    assert len(scans) == 6

    # 1. Which to label: suggest.py reads the images and the source model only.
    _run(
        "suggest.py",
        f"source_run={source}",
        f"input={folder / 'images'}",
        "n=2",
        f"out_dir={tmp_path / 'suggest'}",
        cwd=root,
    )
    with open(tmp_path / "suggest" / "suggest.csv", newline="") as f:
        ranking = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in ranking] == list(range(1, 7))
    assert sorted(r["scan"] for r in ranking) == scans
    assert (tmp_path / "suggest" / "suggest.png").stat().st_size > 0
    first, second = ranking[0]["scan"], ranking[1]["scan"]

    # 2. Label them: the first by correcting the source model's own segmentation (raw ids, as
    # ITK-SNAP or 3D Slicer would open and save it), the second drawn from scratch.
    draft = tmp_path / "draft"
    _run(
        "predict.py",
        f"ckpt={source / 'checkpoints' / 'best.ckpt'}",
        f"input={folder / 'images' / f'{first}.nii.gz'}",
        "raw_ids=aseg",
        f"out_dir={draft}",
        cwd=root,
    )
    predicted = nib.load(draft / f"{first}_seg.nii.gz")
    image = nib.load(folder / "images" / f"{first}.nii.gz")
    assert predicted.shape == image.shape and np.allclose(predicted.affine, image.affine)
    raw = np.asarray(predicted.dataobj)
    assert set(np.unique(raw).tolist()) <= {0} | {
        i for ids in labels.raw_ids("aseg").values() for i in ids
    }
    corrected = raw.copy()
    thalamus = labels.raw_ids("aseg")["left_thalamus"][0]
    edited = tuple(np.argwhere(raw == thalamus)[:3].T)  # the rater removes three voxels
    corrected[edited] = 0
    (folder / "labels").mkdir()
    nib.save(
        nib.Nifti1Image(corrected, predicted.affine, predicted.header),
        folder / "labels" / f"{first}.nii.gz",
    )
    shutil.copy(generated / "labels" / f"{second}.nii.gz", folder / "labels" / f"{second}.nii.gz")
    read_back = transforms.preprocessing("aseg", normalize=False)(
        {
            "image": str(folder / "images" / f"{first}.nii.gz"),
            "label": str(folder / "labels" / f"{first}.nii.gz"),
        }
    )["label"][0].numpy()
    volumes = {  # what predict.py measured, from the same segmentation
        r["structure"]: float(r["volume_mm3"]) for r in csv.DictReader(open(draft / "volumes.csv"))
    }
    voxel = float(np.prod(image.header.get_zooms()[:3]))
    for cls, name in enumerate(labels.STRUCTURES, 1):
        removed = len(edited[0]) if name == "left_thalamus" else 0
        assert np.isclose(np.sum(read_back == cls) * voxel, volumes[name] - removed * voxel)

    # 3. Fine-tune on exactly those two: no held-out scan, so the run says so and estimates
    # itself by leaving each out in turn.
    cohort = ["dataset=folder", f"dataset.root={folder}", "dataset.label_ids=aseg"]
    summary, run = _finetune(
        root,
        paths,
        source,
        "mine",
        *cohort,
        "target.n_images=2",
        f"target.ids=[{first},{second}]",
        "target.loo=true",
    )
    splits = json.loads((run / "splits.json").read_text())
    assert splits["train"] == sorted([first, second]) and splits["test"] == []
    assert summary["held_out"] == 0 and summary["method"] == "tl2"
    estimate = summary["loo_estimate"]
    assert sorted(estimate["per_fold"]) == sorted([first, second])
    assert 0.0 <= estimate["avg_min"] <= estimate["avg"] <= estimate["avg_max"] <= 1.0
    for left_out in (first, second):
        fold = json.loads((run / "loo" / left_out / "splits.json").read_text())
        assert fold["test"] == [left_out] and left_out not in fold["train"]
    assert (run / "checkpoints" / "best.ckpt").is_file() and RunFolder(run).is_complete()

    # 4. Segment the other four with the adapted model: every output on its input's grid.
    rest = [s for s in scans if s not in (first, second)]
    out = tmp_path / "segmented"
    _run(
        "predict.py",
        f"run_dir={run}",
        f"input=[{','.join(str(folder / 'images' / f'{s}.nii.gz') for s in rest)}]",
        f"out_dir={out}",
        cwd=root,
    )
    for scan in rest:
        seg, img = (
            nib.load(out / f"{scan}_seg.nii.gz"),
            nib.load(folder / "images" / f"{scan}.nii.gz"),
        )
        assert seg.shape == img.shape and np.allclose(seg.affine, img.affine)
        assert (out / f"{scan}_qc.png").is_file()
    volumes = list(csv.DictReader(open(out / "volumes.csv")))
    assert len(volumes) == 4 * 14 and all(0.0 <= float(r["qc"]) <= 1.0 for r in volumes)
    qc = list(csv.DictReader(open(out / "qc.csv")))
    assert sorted(r["subject"] for r in qc) == rest
    order = [float(r["worst_vs_batch"]) for r in qc]
    assert order == sorted(order)  # the likeliest wrong first


@pytest.mark.slow
def test_a_best_ckpt_copied_alone_predicts_as_its_run_folder(tmp_path_factory):
    """best.ckpt is a whole model: its network, N4, Nyúl landmarks and source_labels atlas.

    A fine-tuned Nyúl run from a source whose atlas is built from its own labels: the
    checkpoint, copied out of the run folder alone, segments a scan voxel for voxel as the run
    folder does, and flags the scan against the same training brains.
    """
    import shutil

    root = tmp_path_factory.mktemp("alone")
    paths = [f"paths.data_dir={root / 'data'}", f"paths.output_dir={root / 'out'}"]
    source_labels = ["atlas=source_labels", "atlas.registration.iterations=[4,2,1]"]
    source_options = [o for o in SOURCE if o != "atlas=none"]
    _run("train.py", *source_options, *source_labels, *paths, cwd=root)
    (source,) = (root / "out" / "train").glob("synth_tiny_source_*")
    _, run = _finetune(
        root, paths, source, "n1", "target.n_images=1", "intensity=nyul", "evaluate_source=false"
    )
    contract = json.loads((run / "preprocessing.json").read_text())
    assert (contract["intensity"], contract["atlas"]["kind"]) == ("nyul", "source_labels")

    alone = tmp_path_factory.mktemp("elsewhere") / "model.ckpt"
    shutil.copy(run / "checkpoints" / "best.ckpt", alone)
    subject = json.loads((run / "splits.json").read_text())["test"][0]
    scan = root / "data" / "synth" / "synth_tiny_target" / "images" / f"{subject}.nii.gz"
    outputs = {}
    for name, model in (("by_run", f"run_dir={run}"), ("by_ckpt", f"ckpt={alone}")):
        out = root / name
        said = _run("predict.py", model, f"input={scan}", f"out_dir={out}", *paths, cwd=root)
        outputs[name] = out
    assert "bare checkpoint" not in said.stderr  # nothing was guessed for the copy
    by_run, by_ckpt = (
        np.asarray(nib.load(outputs[n] / f"{subject}_seg.nii.gz").dataobj) for n in outputs
    )
    assert by_run.any()
    np.testing.assert_array_equal(by_ckpt, by_run)
    for table in ("volumes.csv", "qc.csv"):  # the same volumes, scores and flags
        assert (outputs["by_ckpt"] / table).read_text() == (outputs["by_run"] / table).read_text()

    # Fine-tuned further from the copy alone, the model keeps its input: atlas, N4, landmarks.
    _, again = _finetune(root, paths, alone, "from_copy", "target.n_images=0", "intensity=nyul")
    kept = json.loads((again / "preprocessing.json").read_text())
    assert kept == contract
    assert (again / "atlas" / "structures.nii.gz").read_bytes() == (
        run / "atlas" / "structures.nii.gz"
    ).read_bytes()

    def dice(folder):
        with open(folder / "metrics.csv", newline="") as f:
            return {(r["subject"], r["structure"]): float(r["dsc"]) for r in csv.DictReader(f)}

    tuned, copied = dice(run), dice(again)  # No TL tests every scan; TL-1 all but its one
    assert tuned and tuned.keys() <= copied.keys()
    assert all(copied[k] == pytest.approx(v, abs=1e-6) for k, v in tuned.items())
