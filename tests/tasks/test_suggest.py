import csv
import shutil

import numpy as np
import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir

from subseg.core import io
from subseg.data import cohort
from subseg.tasks import finetune, suggest


def test_the_medoid_comes_first_and_each_next_pick_covers_what_the_others_miss():
    rng = np.random.default_rng(0)
    big = rng.normal(0.0, 0.1, (6, 8))  # one scanner sub-group of six scans
    small = rng.normal(5.0, 0.1, (3, 8))  # another of three, far away
    points = np.concatenate([big, small])
    ids = [f"b{i}" for i in range(6)] + [f"s{i}" for i in range(3)]
    d = np.linalg.norm(points[:, None] - points[None], axis=2)
    rows = suggest.coverage_ranking(ids, d)
    assert [r["rank"] for r in rows] == list(range(1, 10)) and sorted(
        r["scan"] for r in rows
    ) == ids
    medoid = ids[int(np.argmin(d.sum(axis=1)))]
    assert rows[0]["scan"] == medoid and medoid.startswith("b")
    assert rows[1]["scan"].startswith("s")  # the second pick goes to the uncovered group
    assert "medoid" in rows[0]["why"] and "covers" in rows[1]["why"]
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True) and scores[-1] == 0.0
    # Standardised features: one dimension on a scale 1000 times larger (noise within the
    # big group, where the small group sits in the middle) does not decide the distances;
    # unstandardised, it would make a small-group scan the medoid.
    ramp = 1000.0 * np.array([0, 3, 0, 3, 0, 3, 1.5, 1.5, 1.5])
    features = {i: np.append(p, r) for i, p, r in zip(ids, points, ramp, strict=True)}
    ordered, distances = suggest.distances(features)
    assert ordered == sorted(ids) and np.allclose(distances, distances.T)
    assert np.allclose(np.diag(distances), 0.0)
    scaled = suggest.coverage_ranking(ordered, distances)
    assert scaled[0]["scan"].startswith("b") and scaled[1]["scan"].startswith("s")


def _suggest(folder, checkpoint, out):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "suggest",
            overrides=[
                f"source_run={checkpoint}",
                f"input={folder / 'images'}",
                "n=2",
                f"out_dir={out}",
                "preprocess=none",
            ],
        )
    suggest.suggest(cfg)
    return (out / "suggest.csv").read_text()


def test_suggest_is_deterministic_and_reads_no_labels(tiny_cohorts, checkpoint, tmp_path):
    folder = tmp_path / "cohort"
    shutil.copytree(tiny_cohorts["target"], folder)
    first = _suggest(folder, checkpoint, tmp_path / "a")
    assert _suggest(folder, checkpoint, tmp_path / "b") == first  # byte for byte
    ranking = list(csv.DictReader(first.splitlines()))
    assert [r["scan"] for r in ranking] != [] and (tmp_path / "a" / "suggest.png").is_file()

    # The fine-tuning route (target.pick=suggested) ranks the same scans the same way.
    dataset = {
        "name": "mine",
        "root": str(folder),
        "image": "images/{id}.nii.gz",
        "label": "labels/{id}.nii.gz",
        "label_ids": "aseg",
    }
    from subseg.preprocessing.contract import contract_from_options

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        options = compose("finetune", overrides=["preprocess=none"])
    contract = contract_from_options(options, "")
    subjects = cohort.list_subjects(dataset, require_labels=False)
    rows, _, _ = finetune._suggest(dataset, subjects, checkpoint, contract)
    assert [r["scan"] for r in rows] == [r["scan"] for r in ranking]

    shutil.rmtree(folder / "labels")  # the candidates' labels gone: nothing changes
    assert _suggest(folder, checkpoint, tmp_path / "c") == first


def test_suggest_refuses_what_it_cannot_rank_in_one_line(tiny_cohorts, checkpoint, tmp_path):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("suggest", overrides=[f"input={tiny_cohorts['target'] / 'images'}"])
        with pytest.raises(io.InputError, match="name the source model: source_run="):
            suggest.suggest(cfg)
        cfg = compose(
            "suggest",
            overrides=[
                f"source_run={checkpoint}",
                f"input={tiny_cohorts['target'] / 'images'}",
                "n=9",
            ],
        )
        with pytest.raises(io.InputError, match="n=9: give how many scans you will label, 1 to 3"):
            suggest.suggest(cfg)
