"""DDP as users run it: ``train.py trainer=ddp_cpu``, Lightning relaunching the script per rank."""

import csv
import json
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir

from subseg.core import labels, sharding
from subseg.evaluation.metrics import dice_per_structure
from subseg.model import inference
from subseg.runs import trained_model
from subseg.runs.run_folder import RunFolder
from subseg.tasks import train

# 7 subjects: 2 tested, 2 validated on whole volumes, 3 trained on; the atlas is registered.
OVERRIDES = [
    "dataset=synth_tiny_source",
    "dataset.synth.n_subjects=7",
    "dataset.test_ids=[s005,s006]",
    "dataset.split.val_fraction=0.4",
    "sampling.samples_per_subject=301",  # an odd number of samples: shards of unequal size
    "trainer.max_epochs=1",
    "volume_dice_every=1",
    "sampling.batch_size=64",
    "logger=csv",
]


def test_epoch_shards_deal_every_sample_once():
    for n, world, batch in [(10, 1, 4), (11, 2, 4), (9, 2, 4), (17, 3, 4), (8, 3, 2), (5, 2, 8)]:
        shards = [sharding.EpochShard(n, rank, world, seed=3) for rank in range(world)]
        for epoch in (0, 1):
            for s in shards:
                s.set_epoch(epoch)
            dealt = [list(sharding.EvenBatches(s, batch)) for s in shards]
            seen = [i for batches in dealt for b in batches for i in b]
            assert sorted(seen) == list(range(n)), (n, world)  # none twice, none dropped
            assert len({len(batches) for batches in dealt}) == 1  # the same steps on every rank
            assert all(b for batches in dealt for b in batches)  # no empty batch
        assert shards[0].order().tolist() != list(range(n)) or n < 3  # shuffled
    with pytest.raises(ValueError, match="3 samples cannot be shared by 4"):
        sharding.EpochShard(3, 0, 4)


def test_gathered_shards_come_back_in_order():
    items = list(range(7))
    parts = [sharding.shard(items, r, 3) for r in range(3)]
    # what all_gather_object hands every rank, reassembled as gather_shards does
    out = []
    for i in range(max(map(len, parts))):
        out += [p[i] for p in parts if i < len(p)]
    assert out == items
    assert sharding.gather_shards(parts[0], 1) == parts[0]


@pytest.mark.slow
def test_ddp_through_train_py(tmp_path):
    if not torch.distributed.is_gloo_available():
        pytest.skip("gloo backend not available")
    probe = tmp_path / "probe"
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "WANDB_MODE": "disabled"}
    paths = [f"paths.data_dir={tmp_path / 'data'}", f"paths.output_dir={tmp_path / 'out'}"]
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            *OVERRIDES,
            *paths,
            "trainer=ddp_cpu",
            "+callbacks.probe._target_=ddp_probe.RecordSamples",
            f"+callbacks.probe.out={probe}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    (folder,) = (tmp_path / "out" / "train").glob("synth_tiny_source_*")  # name_<config id>
    run = RunFolder(folder)
    assert run.is_complete()
    splits = json.loads(run.splits_file.read_text())
    assert len(splits["val"]) == 2 and len(splits["test"]) == 2

    # Every subject the run uses was bias-corrected and registered once, by one process.
    for step in ("bias-field correction (N4)", "atlas registration (harvard_oxford)"):
        done = Counter(re.findall(rf"{re.escape(step)}: \S*/(s\d+)\.nii", log))
        used = [i for key in ("train", "val", "test") for i in splits[key]]
        assert done == Counter(used), (step, done)

    # Both ranks trained; together they saw the epoch's samples, each exactly once.
    records = [json.loads(p.read_text()) for p in sorted(probe.glob("rank*_epoch0.json"))]
    assert [r["rank"] for r in records] == [0, 1] and {r["world"] for r in records} == {2}
    n_train = records[0]["n_train"]
    assert n_train % 2 == 1  # shards of unequal size
    seen = [i for r in records for i in r["positions"]]
    assert sorted(seen) == list(range(n_train))
    for r in records:  # what the loop received is what the sampler dealt
        assert r["fetched"] == r["dealt"]
    assert len(records[0]["fetched"]) == len(records[1]["fetched"])

    # The gathered whole-volume validation Dice is what one process gets with the same weights.
    with open(run.log_file, newline="") as f:
        logged = next(row for row in csv.DictReader(f) if row.get("val_dice_mean"))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*OVERRIDES, *paths])
    from subseg.data import cohort

    subjects = cohort.list_subjects(dict(cfg.dataset))
    cached = train.run_subjects(cfg, run, subjects)
    net = trained_model.load_network(run.last_checkpoint)
    net.eval()
    scores = np.stack(
        [
            dice_per_structure(
                inference.segment(net, np.asarray(item["image"][0]), item["prior"])[0],
                np.asarray(item["label"][0]),
            )
            for item in cached(splits["val"])
        ]
    )
    per_structure = np.nanmean(scores, axis=0)
    for name, value in zip(labels.STRUCTURES, per_structure, strict=True):
        assert float(logged[f"val_dice/{name}"]) == pytest.approx(value, abs=1e-6), name
    assert float(logged["val_dice_mean"]) == pytest.approx(np.nanmean(per_structure), abs=1e-6)

    # Test subjects were split across the ranks and gathered: the first rank wrote them all.
    with open(run.metrics_file, newline="") as f:
        tested = {row["subject"] for row in csv.DictReader(f)}
    assert tested == set(splits["test"])
    assert (run.checkpoints_dir / "best.ckpt").is_file()
    assert list(run.path.glob("*.ckpt")) == []  # checkpoints written once, where they belong
