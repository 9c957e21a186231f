import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, new_module
from torch.utils.data import DataLoader

from subseg.model.network import CONV_FEATURES, VIEWS
from subseg.training import samples


class _StepLosses(L.Callback):
    def __init__(self):
        self.losses, self.sizes = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.sizes.append(len(batch["target"]))


def test_epoch_means_weigh_every_sample_once():
    """train_loss_epoch is the sample-weighted mean of the step losses; val_loss and val_acc
    are those of the held-out samples under the final weights (the last batch is short)."""
    torch.manual_seed(0)
    n = 300
    features = torch.randn(n, CONV_FEATURES * len(VIEWS)).half()
    prior = torch.softmax(torch.randn(n, 15), dim=1)
    targets = torch.randint(0, 15, (n,))
    pooled = samples.FeatureDataset(features, prior, targets)
    train_idx, val_idx = np.arange(0, 230), np.arange(230, n)  # 230 = 3 × 64 + 38

    def loader(indices):
        return DataLoader(pooled.subset(indices), batch_size=64, collate_fn=samples.collate_batch)

    module = new_module()
    recorder = _StepLosses()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recorder],
    )
    trainer.fit(module, loader(train_idx), loader(val_idx))
    metrics = trainer.callback_metrics
    assert recorder.sizes == [64, 64, 64, 38]
    expected = np.average(recorder.losses, weights=recorder.sizes)
    assert float(metrics["train_loss_epoch"]) == pytest.approx(expected, rel=1e-6)
    assert 0.0 <= float(metrics["train_acc_epoch"]) <= 1.0

    module.eval()
    with torch.no_grad():
        logits = torch.cat([module(b) for b in loader(val_idx)])
    truth = targets[val_idx]
    assert float(metrics["val_loss"]) == pytest.approx(float(F.cross_entropy(logits, truth)))
    accuracy = float((logits.argmax(dim=1) == truth).float().mean())
    assert float(metrics["val_acc"]) == pytest.approx(accuracy)


def _compose(name, *overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def test_conf_model_builds_the_module_its_network_optimiser_and_scheduler():
    from hydra.utils import instantiate

    scheduler = "torch.optim.lr_scheduler.StepLR"
    cfg = _compose(
        "train",
        "model=paper",
        f"model.scheduler={{_target_: {scheduler}, _partial_: true, step_size: 2}}",
    )
    module = instantiate(cfg.model)
    assert module.net.config()["dropout"] == 0.5
    chosen = module.configure_optimizers()
    optimizer = chosen["optimizer"]
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 1e-2
    assert optimizer.defaults["fused"]  # on the CPU, unless the config says otherwise
    assert isinstance(chosen["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    plain = instantiate(_compose("train").model).configure_optimizers()
    assert isinstance(plain, torch.optim.Adam) and plain.defaults["lr"] == 1e-3


def test_fine_tuning_takes_its_learning_rate_from_the_freeze_preset_alone():
    for preset, lr in (("paper", 1e-4), ("released_code", 1e-3)):
        cfg = _compose("finetune", f"freeze={preset}")
        assert cfg.model.optimizer.lr == cfg.freeze.lr == lr
    assert _compose("train", "recipe=paper").model.optimizer.lr == 1e-2  # training: the model's
