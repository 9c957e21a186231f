import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir

from subseg.core import labels
from subseg.model.network import count_trainable
from subseg.runs import trained_model
from subseg.tasks import train
from subseg.tasks.evaluate import COLUMNS

TINY = [
    "dataset=synth_tiny_source",
    "atlas=none",
    "sampling.samples_per_subject=400",
    "trainer.max_epochs=2",
    "volume_dice_every=1",
    "sampling.batch_size=64",
]


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "train", overrides=[*TINY, f"paths.data_dir={tmp_path / 'data'}", *overrides]
        )


@pytest.mark.slow
def test_training_writes_the_run_folder_contract(tmp_path):
    run = tmp_path / "run"
    summary = train.train(_cfg(tmp_path, "logger=csv"), run)

    assert {"avg", "wavg", "per_structure", "checkpoint"} <= set(summary)
    assert json.loads((run / "summary.json").read_text())["avg"] == summary["avg"]
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS
    assert [r["structure"] for r in rows] == list(labels.STRUCTURES)  # one test subject
    assert {r["subject"] for r in rows} == {"s003"}

    with open(run / "logs" / "metrics.csv", newline="") as f:
        log = list(csv.DictReader(f))
    dice_rows = [r for r in log if r.get("val_dice_mean")]
    assert len(dice_rows) == 2  # one whole-volume validation per epoch
    for name in labels.STRUCTURES:
        assert all(0.0 <= float(r[f"val_dice/{name}"]) <= 1.0 for r in dice_rows)
    assert any(r.get("train_loss_epoch") for r in log) and any(r.get("val_loss") for r in log)

    net = trained_model.load_network(run / "checkpoints" / "best.ckpt")
    assert count_trainable(net) == 882_375 and net.config()["dropout"] == 0.3
    assert (run / "learning_curve.png").stat().st_size > 5_000
    assert (run / "qc" / "s003_seg.png").is_file()
    assert not (run / "wandb").exists()


@pytest.mark.slow
def test_default_logger_leaves_an_offline_wandb_run(tmp_path):
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
    }
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            *TINY,
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.output_dir={tmp_path / 'out'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "out" / "train").glob("synth_tiny_source_*")  # name_<config id>
    (history,) = run.glob("wandb/offline-run-*/run-*.wandb")
    recorded = history.read_bytes()
    for name in labels.STRUCTURES:  # per-structure validation Dice is in the run's history
        assert f"val_dice/{name}".encode() in recorded
    assert b"test/segmentations" in recorded  # overlay images went to the dashboard
    assert "wandb sync" in result.stdout + result.stderr

    # The CSV log (what logger=csv keeps) holds the very numbers the W&B history holds.
    inspect = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(history)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert inspect.returncode == 0, inspect.stderr[-2000:]
    records = [json.loads(line) for line in inspect.stdout.splitlines() if line.startswith("{")]

    # The dashboard's slicing: the run's config, group and tags; its test results in the summary.
    config, summary, header = {}, {}, {}
    for record in records:
        if record.get("type") == "run":
            header = record["run"]
            config.update(header.get("config", {}).get("update", {}))
        elif record.get("type") == "config":
            config.update(record["config"].get("update", {}))
        elif record.get("type") == "summary":
            summary.update(record["summary"].get("update", {}))
    assert config["task"] == "train" and config["method"] == "source"
    assert config["dataset"] == "synth_tiny_source" and config["preprocessing"] == "n4"
    assert config["config"]["trainer"]["max_epochs"] == 2  # the whole resolved config
    assert header["run_group"] == "train-synth_tiny_source"
    assert {"train", "source", "n4"} <= set(header["tags"])
    results = json.loads((run / "summary.json").read_text())
    assert summary["test/avg"] == pytest.approx(results["avg"])
    assert summary["test/wavg"] == pytest.approx(results["wavg"])
    for name in labels.STRUCTURES:
        expected = results["per_structure"][name]["mean"]
        assert summary[f"test/dice/{name}"] == pytest.approx(expected, nan_ok=True), name

    from_wandb = {}
    for record in records:
        item = record.get("history", {}).get("item", {})
        for key, value in item.items():
            if key.startswith(("val_", "train_loss_epoch", "train_acc_epoch")):
                from_wandb[(item["trainer/global_step"], key)] = value
    with open(run / "logs" / "metrics.csv", newline="") as f:
        from_csv = {
            (int(row["step"]), key): float(value)
            for row in csv.DictReader(f)
            for key, value in row.items()
            if value and key.startswith(("val_", "train_loss_epoch", "train_acc_epoch"))
        }
    assert len(from_csv) >= 2 * (len(labels.STRUCTURES) + 5)  # two epochs of every number
    assert from_wandb.keys() == from_csv.keys()
    for key, value in from_csv.items():
        # NaN (a structure absent from the samples) is the string 'NaN' in W&B's history.
        assert float(from_wandb[key]) == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key
