from pathlib import Path

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import CSVLogger

from subseg.core import io
from subseg.runs.run_folder import RunFolder
from subseg.training import fitting


def _train(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize(
    ("preset", "accelerator", "devices", "strategy", "precision"),
    [
        ("auto", "auto", 1, "auto", "32-true"),
        ("cpu", "cpu", 1, "auto", "32-true"),
        ("gpu", "gpu", 1, "auto", "bf16-mixed"),
        ("ddp", "gpu", 2, "ddp", "bf16-mixed"),
        ("ddp_cpu", "cpu", 2, "ddp", "32-true"),
    ],
)
def test_trainer_presets(preset, accelerator, devices, strategy, precision):
    trainer = _train(f"trainer={preset}").trainer
    assert trainer._target_ == "lightning.pytorch.Trainer"
    assert (trainer.accelerator, trainer.devices, trainer.strategy, trainer.precision) == (
        accelerator,
        devices,
        strategy,
        precision,
    )
    assert trainer.num_nodes == 1


def test_the_trainer_is_built_from_its_config(tmp_path):
    cfg = _train("trainer=cpu", "logger=csv", "trainer.max_epochs=3", "trainer.num_nodes=1")
    run = RunFolder(tmp_path)
    trainer, checkpoint, early = fitting.trainer_for(cfg, run)
    assert trainer.max_epochs == 3 and type(trainer.accelerator).__name__ == "CPUAccelerator"
    assert checkpoint in trainer.callbacks and early in trainer.callbacks
    assert any(isinstance(c, fitting.RandomState) for c in trainer.callbacks)
    assert any(isinstance(c, fitting.InputRecord) for c in trainer.callbacks)


def test_loggers_and_callbacks_are_added_without_code(tmp_path):
    cfg = _train(
        "logger=csv",
        "+logger.extra._target_=lightning.pytorch.loggers.CSVLogger",
        "+logger.extra.name=extra",
        "+callbacks.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging",
        "+callbacks.swa.swa_lrs=0.01",
    )
    run = RunFolder(tmp_path)
    chosen = fitting.loggers(cfg, run)
    assert [type(x) for x in chosen] == [CSVLogger, CSVLogger]
    assert Path(chosen[0].log_dir) == run.logs_dir  # the run folder's own log comes first
    assert chosen[1].save_dir == str(run.path) and chosen[1].name == "extra"
    (swa,) = fitting.callbacks_of(cfg)
    assert type(swa).__name__ == "StochasticWeightAveraging"


def test_the_wandb_config_is_the_run_config_not_objects_built_from_it(tmp_path, monkeypatch):
    """Hydra builds every `_target_` it is handed: the run config given to W&B must not be."""
    import torch

    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = _train("logger=wandb")
    before = torch.get_rng_state()
    chosen = fitting.loggers(cfg, RunFolder(tmp_path))
    assert torch.equal(torch.get_rng_state(), before)  # no network was initialised on the side
    config = chosen[1]._wandb_init["config"]["config"]
    assert config["model"]["_target_"] == "subseg.training.lit_module.SegmentationModule"
    assert config["trainer"]["_target_"] == "lightning.pytorch.Trainer"
    assert config["trainer"]["max_epochs"] == cfg.trainer.max_epochs


def test_a_logger_without_a_target_is_one_line(tmp_path):
    cfg = _train("logger=csv", "+logger.bad.name=x")
    with pytest.raises(io.InputError, match="logger.bad: give a Lightning logger"):
        fitting.loggers(cfg, RunFolder(tmp_path))
    cfg = _train("logger=csv", "+logger.bad._target_=no.such.Logger")
    with pytest.raises(io.InputError, match=r"logger.bad._target_=no.such.Logger"):
        fitting.loggers(cfg, RunFolder(tmp_path))
