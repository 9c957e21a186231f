"""Runs you can trust: a killed run resumes to the same result, repeated runs agree, and a
finished run is not redone."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

from subseg.runs.run_folder import RunFolder

TINY = [
    "dataset=synth_tiny_source",
    "atlas=none",
    "sampling.samples_per_subject=400",
    "trainer.max_epochs=3",
    "stopping.patience=10",
    "volume_dice_every=1",
    "sampling.batch_size=64",
    "logger=csv",
]

# Runs train.py's own task in a process that SIGKILLs itself at a chosen training batch: a
# kill -9 mid-epoch, at the same place every time.
DRIVER = """
import os, signal, sys
from pathlib import Path

import lightning
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from subseg.tasks import evaluate, finetune, train

conf_dir, task, run_dir, kill_epoch, kill_batch, *overrides = sys.argv[1:] or [""] * 5


class KillHere(Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if (str(trainer.current_epoch), str(batch_idx)) == (kill_epoch, kill_batch):
            os.kill(os.getpid(), signal.SIGKILL)


plain_init = lightning.Trainer.__init__


def with_kill(self, *args, callbacks=(), **kwargs):
    plain_init(self, *args, callbacks=[*callbacks, KillHere()], **kwargs)


def killed_in_testing(*args, **kwargs):  # after the fit, before the results
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":  # worker pools re-import this file
    lightning.Trainer.__init__ = with_kill
    if kill_epoch == "testing":
        evaluate.publish = killed_in_testing
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        cfg = compose(task, overrides=overrides)
    (Path(run_dir) / ".hydra").mkdir(parents=True, exist_ok=True)  # as Hydra records a run
    OmegaConf.save(cfg, Path(run_dir) / ".hydra" / "config.yaml", resolve=True)
    (train.train if task == "train" else finetune.finetune)(cfg, run_dir)
"""


def _drive(tmp_path, task, run, overrides, kill=(-1, -1)):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    return subprocess.run(
        [sys.executable, str(driver), str(REPO / "conf"), task, str(run), *map(str, kill)]
        + overrides,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={"WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )


def _results(run: RunFolder) -> dict:
    summary = json.loads(run.summary_file.read_text())
    return {k: summary[k] for k in ("avg", "wavg", "per_structure", "fit")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny training run done whole, and the same run killed (SIGKILL) in its second epoch."""
    root = tmp_path_factory.mktemp("resume")
    overrides = [*TINY, f"paths.data_dir={root / 'data'}"]
    whole, killed = RunFolder(root / "whole"), RunFolder(root / "killed")
    done = _drive(root, "train", whole.path, overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    cut = _drive(root, "train", killed.path, overrides, kill=(1, 2))
    assert cut.returncode == -9, cut.stderr[-3000:]
    return root, overrides, whole, killed


@pytest.mark.slow
def test_a_killed_run_is_refused_as_a_source_and_skipped_by_the_report(runs, tmp_path):
    root, _, _, killed = runs
    env = {"WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "finetune.py"),
            "dataset=synth_tiny_target",
            f"paths.data_dir={root / 'data'}",
            f"paths.output_dir={tmp_path / 'out'}",
            f"source_run={killed.path}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"subseg: error: {killed.path}: not a complete run (no complete.json: it was killed, "
        "failed or is still running, so its files cannot be trusted); run it again, or "
        "continue it with resume=true"
    )
    assert not list((tmp_path / "out").rglob("summary.json"))

    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "subseg.report.report",
            str(killed.path),
            "--out",
            str(tmp_path / "r"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert report.returncode == 2
    assert f"subseg: skipped {killed.path}: not a complete run" in report.stderr
    assert not (tmp_path / "r" / "report.md").exists()


@pytest.mark.slow
def test_a_killed_training_run_resumes_to_the_uninterrupted_result(runs):
    root, overrides, whole, killed = runs
    assert whole.is_complete() and _results(whole)["fit"]["epochs"] == 3
    assert killed.last_checkpoint.is_file() and not killed.is_complete()
    assert not killed.summary_file.exists()

    resumed = killed  # in place: after the refusal test, which needs it killed
    done = _drive(root, "train", resumed.path, [*overrides, "resume=true"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stderr and resumed.is_complete()
    assert _results(resumed) == _results(whole)


@pytest.mark.slow
def test_the_same_train_and_finetune_twice_give_identical_summaries(runs, tmp_path):
    root, overrides, whole, _ = runs
    again = RunFolder(tmp_path / "again")
    done = _drive(root, "train", again.path, overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    assert again.summary_file.read_text() == whole.summary_file.read_text()

    target = [
        "dataset=synth_tiny_target",
        "target.n_images=1",
        "sampling.samples_per_subject=300",
        "trainer.max_epochs=2",
        "sampling.batch_size=64",
        "logger=csv",
        f"source_run={whole.path}",
        "evaluate_source=false",
        f"paths.data_dir={root / 'data'}",
    ]
    tuned = [RunFolder(tmp_path / f"tl1_{i}") for i in range(2)]
    for run in tuned:
        done = _drive(root, "finetune", run.path, target)
        assert done.returncode == 0, done.stderr[-3000:]
    assert tuned[0].summary_file.read_text() == tuned[1].summary_file.read_text()

    # Killed after its fit ended (while testing): resumed, it is not fitted again.
    killed = RunFolder(tmp_path / "tl1_killed")
    cut = _drive(root, "finetune", killed.path, target, kill=("testing", 0))
    assert cut.returncode == -9 and killed.fit_file.is_file() and not killed.is_complete()
    done = _drive(root, "finetune", killed.path, [*target, "resume=true"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "its fit had ended; continuing after it" in done.stderr
    assert killed.summary_file.read_text() == tuned[0].summary_file.read_text()

    # Run again with the same config: complete already, so nothing is redone or rewritten.
    marker = tuned[0].marker_file.read_text()
    again = _drive(root, "finetune", tuned[0].path, target)
    assert (
        again.returncode == 0
        and "already complete with this configuration and data" in again.stderr
    )
    assert tuned[0].marker_file.read_text() == marker
