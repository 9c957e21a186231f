import json

import numpy as np
import pytest
from conftest import REPO, write_nifti
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from subseg.core import io
from subseg.data import cohort
from subseg.runs.run_folder import RunFolder


def _folder_cohort(root, ids, with_labels=True):
    for sid in ids:
        write_nifti(
            root / "images" / f"{sid}.nii.gz", np.random.default_rng(0).uniform(1, 2, (4, 4, 4))
        )
        if with_labels:
            write_nifti(root / "labels" / f"{sid}.nii.gz", np.full((4, 4, 4), 10, np.int16))
    return root


def _dataset(name, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"dataset={name}", *overrides])
    return OmegaConf.to_container(cfg.dataset, resolve=True)


def test_folder_layout_is_discovered(tmp_path):
    root = _folder_cohort(tmp_path / "cohort", ["b02", "a01", "c03"])
    (root / "images" / "notes.txt").write_text("ignored")
    subjects = cohort.list_subjects(_dataset("folder", f"dataset.root={root}"))
    assert [s.id for s in subjects] == ["a01", "b02", "c03"]
    assert subjects[0].image == root / "images" / "a01.nii.gz"
    assert subjects[0].label == root / "labels" / "a01.nii.gz"


def test_missing_label_and_empty_root_are_named(tmp_path):
    root = _folder_cohort(tmp_path / "cohort", ["a01"])
    write_nifti(root / "images" / "b02.nii.gz", np.ones((4, 4, 4)))
    with pytest.raises(io.InputError, match="b02.nii.gz: label of subject 'b02' not found"):
        cohort.list_subjects(_dataset("folder", f"dataset.root={root}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(io.InputError, match="has no images matching images/{id}.nii.gz"):
        cohort.list_subjects(_dataset("folder", f"dataset.root={tmp_path / 'empty'}"))
    with pytest.raises(io.InputError, match="has no root folder: add dataset.root="):
        cohort.list_subjects(_dataset("folder"))
    with pytest.raises(io.InputError, match="does not exist"):
        cohort.list_subjects(_dataset("folder", f"dataset.root={tmp_path / 'absent'}"))


def test_a_partly_labelled_folder_lists_its_unlabelled_scans_when_asked(tmp_path):
    root = _folder_cohort(tmp_path / "cohort", ["a01", "c03"])
    write_nifti(root / "images" / "b02.nii.gz", np.ones((4, 4, 4)))
    dataset = _dataset("folder", f"dataset.root={root}")
    subjects = cohort.list_subjects(dataset, require_labels=False)
    assert [(s.id, s.label is None) for s in subjects] == [
        ("a01", False),
        ("b02", True),
        ("c03", False),
    ]
    with pytest.raises(io.InputError, match="label of subject 'b02' not found"):
        cohort.list_subjects(dataset)  # training and evaluation still need every label


def test_miccai_layout_with_published_split(tmp_path):
    ds = _dataset("miccai2012", f"dataset.root={tmp_path}")
    assert len(ds["ids"]) == 35 and len(ds["test_ids"]) == 20
    train_ids = sorted(set(ds["ids"]) - set(ds["test_ids"]))
    assert train_ids == [
        "1000",
        "1001",
        "1002",
        "1006",
        "1007",
        "1008",
        "1009",
        "1010",
        "1011",
        "1012",
        "1013",
        "1014",
        "1015",
        "1017",
        "1036",
    ]
    for sid in ds["ids"]:
        part = "testing" if sid in ds["test_ids"] else "training"
        write_nifti(tmp_path / f"{part}-images" / f"{sid}_3.nii.gz", np.ones((2, 2, 2)))
        write_nifti(tmp_path / f"{part}-labels" / f"{sid}_3_glm.nii.gz", np.ones((2, 2, 2)))
    subjects = {s.id: s for s in cohort.list_subjects(ds)}
    assert subjects["1003"].image == tmp_path / "testing-images" / "1003_3.nii.gz"
    assert subjects["1000"].label == tmp_path / "training-labels" / "1000_3_glm.nii.gz"
    splits = cohort.make_splits(list(subjects), ds["test_ids"], val_fraction=0.2, seed=0)
    assert splits["test"] == sorted(ds["test_ids"])
    assert sorted(splits["train"] + splits["val"]) == train_ids and len(splits["val"]) == 3


def test_ibsr_layout(tmp_path):
    ds = _dataset("ibsr", f"dataset.root={tmp_path}")
    for sid in ds["ids"]:
        write_nifti(tmp_path / f"IBSR_{sid}" / f"IBSR_{sid}_ana_strip.nii.gz", np.ones((2, 2, 2)))
        write_nifti(tmp_path / f"IBSR_{sid}" / f"IBSR_{sid}_seg_ana.nii.gz", np.ones((2, 2, 2)))
    subjects = cohort.list_subjects(ds)
    assert len(subjects) == 18 and subjects[-1].id == "18"
    assert ds["label_ids"] == "aseg"


def test_splits_are_seeded_disjoint_and_complete():
    ids = [f"x{i:02d}" for i in range(20)]
    a = cohort.make_splits(ids, test_fraction=0.25, val_fraction=0.2, seed=1)
    assert a == cohort.make_splits(ids, test_fraction=0.25, val_fraction=0.2, seed=1)
    assert a != cohort.make_splits(ids, test_fraction=0.25, val_fraction=0.2, seed=2)
    assert sorted(a["train"] + a["val"] + a["test"]) == ids
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (12, 3, 5)
    with pytest.raises(ValueError, match="not in the cohort"):
        cohort.make_splits(ids, test_ids=["y99"])


def test_splits_are_written_once(tmp_path):
    root = _folder_cohort(tmp_path / "cohort", [f"s{i}" for i in range(6)])
    run = RunFolder(tmp_path / "run").splits_file
    run.parent.mkdir()
    first = cohort.ensure_splits(run, _dataset("folder", f"dataset.root={root}"))
    written = json.loads(run.read_text())
    assert {k: written[k] for k in ("train", "val", "test")} == first
    again = cohort.ensure_splits(
        run, _dataset("folder", f"dataset.root={root}", "dataset.split.seed=7")
    )
    assert again == first


def test_synthetic_datasets_compose_and_generate(tmp_path):
    ds = _dataset("synth_tiny_target", f"paths.data_dir={tmp_path}")
    assert ds["root"] == str(tmp_path / "synth" / "synth_tiny_target")
    assert ds["synth"]["domain"] == "target" and ds["label_ids"] == "aseg"
    subjects = cohort.list_subjects(ds)
    assert [s.id for s in subjects] == ["t000", "t001", "t002", "t003"]
    assert {s.group for s in subjects} == {"ge", "siemens"}
    full = _dataset("synth_source")
    assert (
        full["synth"]["n_subjects"] >= 15 and _dataset("synth_target")["synth"]["n_subjects"] >= 18
    )


def test_hidden_files_and_repeated_id_patterns(tmp_path):
    root = _folder_cohort(tmp_path / "cohort", ["a01"])
    (root / "images" / "._a02.nii.gz").write_bytes(b"AppleDouble")
    (root / "images" / ".a03.nii.gz.x1y2").write_bytes(b"interrupted write")
    assert [s.id for s in cohort.list_subjects(_dataset("folder", f"dataset.root={root}"))] == [
        "a01"
    ]
    ibsr = tmp_path / "ibsr"
    for sid in ("01", "02"):
        write_nifti(ibsr / f"IBSR_{sid}" / f"IBSR_{sid}_ana_strip.nii.gz", np.ones((2, 2, 2)))
        write_nifti(ibsr / f"IBSR_{sid}" / f"IBSR_{sid}_seg_ana.nii.gz", np.ones((2, 2, 2)))
    write_nifti(ibsr / "IBSR_03" / "IBSR_04_ana_strip.nii.gz", np.ones((2, 2, 2)))  # mismatch
    ds = _dataset("ibsr", f"dataset.root={ibsr}", "dataset.ids=null")
    assert [s.id for s in cohort.list_subjects(ds)] == ["01", "02"]


def test_subjects_csv_written_by_excel(tmp_path):
    root = _folder_cohort(tmp_path / "cohort", ["a01", "b02"])
    (root / "subjects.csv").write_bytes("id,group\r\na01,ge\r\nb02,siemens\r\n".encode("utf-8-sig"))
    subjects = cohort.list_subjects(_dataset("folder", f"dataset.root={root}"))
    assert [s.group for s in subjects] == ["ge", "siemens"]
    (root / "subjects.csv").write_text("subject,group\na01,ge\n")
    with pytest.raises(io.InputError, match="subjects.csv: needs an 'id' column"):
        cohort.list_subjects(_dataset("folder", f"dataset.root={root}"))


def test_a_run_folder_keeps_its_own_cohort(tmp_path):
    first = _folder_cohort(tmp_path / "first", ["a01", "a02", "a03"])
    second = _folder_cohort(tmp_path / "second", ["b01", "b02", "b03"])
    run = RunFolder(tmp_path / "run").splits_file
    run.parent.mkdir()
    cohort.ensure_splits(run, _dataset("folder", f"dataset.root={first}"))
    with pytest.raises(io.InputError, match="belongs to another cohort"):
        cohort.ensure_splits(run, _dataset("folder", f"dataset.root={second}"))
    with pytest.raises(io.InputError, match="test_ids not in the cohort"):
        cohort.ensure_splits(
            tmp_path / "splits.json",
            _dataset("folder", f"dataset.root={first}", "dataset.test_ids=[zz]"),
        )


def test_target_draws_are_nested_seeded_and_test_the_rest():
    ids = [f"t{i:02d}" for i in range(10)]
    draws = [cohort.draw_target(ids, k, draw=1) for k in range(8)]
    for smaller, larger in zip(draws, draws[1:], strict=False):
        assert set(smaller["train"]) < set(larger["train"])  # TL-k ⊂ TL-(k+1)
    for split in draws:
        assert sorted(split["train"] + split["test"]) == ids and not split["val"]
    assert cohort.draw_target(ids, 3, draw=1) == draws[3]  # seeded
    assert cohort.draw_target(ids, 3, draw=0)["train"] != draws[3]["train"]
    published = cohort.draw_target(ids, 2, draw=0, test_ids=["t00", "t01"])
    assert published["test"] == ["t00", "t01"] and not set(published["train"]) & {"t00", "t01"}
    with pytest.raises(io.InputError, match="target.n_images=9: the cohort has 8 subjects"):
        cohort.draw_target(ids, 9, test_ids=["t00", "t01"])


def test_full_training_and_leave_one_out_folds():
    ids = [f"t{i:02d}" for i in range(6)]
    full = cohort.draw_target(ids, "all", test_ids=["t00"])
    assert full == {"train": ids[1:], "val": [], "test": ["t00"]}
    folds = [cohort.draw_target(ids, "all", fold=i) for i in range(len(ids))]
    assert [f["test"] for f in folds] == [[i] for i in ids]  # each subject tested once
    for fold in folds:
        assert sorted(fold["train"] + fold["test"]) == ids
    assert cohort.draw_target(ids, "all", test_ids=["t03"]) == folds[3]  # the same, by id
    with pytest.raises(io.InputError, match="fold=6: the cohort has 6 subjects"):
        cohort.draw_target(ids, "all", fold=6)
    with pytest.raises(io.InputError, match="fold=t03: the cohort has 6 subjects"):
        cohort.draw_target(ids, "all", fold="t03")
    everything = cohort.draw_target(ids, "all")  # a user's every labelled scan: none held out
    assert everything == {"train": sorted(ids), "val": [], "test": []}
    with pytest.raises(io.InputError, match="target.n_images=some"):
        cohort.draw_target(ids, "some")


def test_target_images_named_by_id_and_the_labelled_rest_tested():
    ids = [f"t{i:02d}" for i in range(6)]
    chosen = cohort.draw_target(ids, 2, draw=3, chosen=["t04", "t01"])
    assert chosen == {"train": ["t01", "t04"], "val": [], "test": ["t00", "t02", "t03", "t05"]}
    published = cohort.draw_target(ids, 1, test_ids=["t00"], chosen=["t02"])
    assert published["train"] == ["t02"] and published["test"] == ["t00"]
    with pytest.raises(io.InputError, match="target.ids: t09: not a labelled scan"):
        cohort.draw_target(ids, 1, chosen=["t09"])
    with pytest.raises(io.InputError, match="target.ids: t00: not a labelled scan"):
        cohort.draw_target(ids, 1, test_ids=["t00"], chosen=["t00"])
    with pytest.raises(io.InputError, match="names 2 scans but target.n_images=1"):
        cohort.draw_target(ids, 1, chosen=["t01", "t02"])


def test_a_star_in_a_pattern_is_any_part_of_one_name_and_two_matches_are_refused(tmp_path):
    root = tmp_path / "cohort"
    for relative in ("a01/visit-1/scan.nii.gz", "b02/visit-3/scan.nii.gz"):
        write_nifti(root / relative, np.ones((2, 2, 2)))
    dataset = {"name": "visits", "root": str(root), "image": "{id}/visit-*/scan.nii.gz"}
    subjects = cohort.list_subjects(dataset)
    assert [(s.id, s.image.relative_to(root).as_posix()) for s in subjects] == [
        ("a01", "a01/visit-1/scan.nii.gz"),
        ("b02", "b02/visit-3/scan.nii.gz"),
    ]
    write_nifti(root / "a01" / "visit-2" / "scan.nii.gz", np.ones((2, 2, 2)))
    with pytest.raises(io.InputError, match=r"2 files of subject 'a01' match \(a01/visit-1/"):
        cohort.list_subjects(dataset)
