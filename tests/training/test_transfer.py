import lightning as L
import numpy as np
import pytest
import torch
from conftest import REPO, new_module
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from subseg.core import io
from subseg.training import transfer
from subseg.training.samples import (
    PatchDataset,
    SubjectSamples,
    collate_batch,
    sample_voxels,
    split_indices,
)


def _preset(name, **changes):
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "freeze" / f"{name}.yaml"))
    cfg.update(changes)
    return transfer.FreezePreset.from_config(cfg)


def _source_module(seed=0):
    """A 'source' network with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    module = new_module()
    for m in module.net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    return module


def _save(module, path):
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {}}, path)
    return path


def test_weights_load_strictly_on_shapes(tmp_path):
    source = _source_module(0)
    target = _source_module(1)
    report = transfer.load_source_weights(target.net, _save(source, tmp_path / "s.ckpt"))
    assert len(report["copied"]) == len(target.net.state_dict()) and not report["missing"]
    for name, tensor in source.net.state_dict().items():
        assert torch.equal(target.net.state_dict()[name], tensor), name

    state = {f"net.{k}": v for k, v in source.net.state_dict().items()}
    state["net.extra.weight"] = torch.zeros(3)
    del state["net.classifier.bias"]
    torch.save({"state_dict": state}, tmp_path / "partial.ckpt")
    report = transfer.load_source_weights(target.net, tmp_path / "partial.ckpt")
    assert report["skipped"] == ["extra.weight"] and report["missing"] == ["classifier.bias"]

    state["net.fc2.weight"] = torch.zeros(10, 10)
    torch.save({"state_dict": state}, tmp_path / "bad.ckpt")
    with pytest.raises(io.InputError, match=r"bad.ckpt: tensor fc2.weight has shape \(10, 10\)"):
        transfer.load_source_weights(target.net, tmp_path / "bad.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(io.InputError, match="junk.ckpt: not a readable subseg checkpoint"):
        transfer.load_source_weights(target.net, tmp_path / "junk.ckpt")


def _trainable(preset):
    module = _source_module()
    transfer.FreezeSchedule(preset).freeze_before_training(module)
    return {n for n, p in module.net.named_parameters() if p.requires_grad}, module


def test_freeze_presets():
    everything = {n for n, _ in _source_module().net.named_parameters()}
    conv_blocks = {n for n in everything if ".conv" in n}

    trainable, module = _trainable(_preset("paper"))
    assert trainable == everything - conv_blocks
    assert transfer.caches_conv_features(module.net, _preset("paper"))
    assert not transfer.caches_conv_features(module.net, _preset("paper", norm_eval=False))

    trainable, module = _trainable(_preset("released_code"))
    kernels = {n for n in conv_blocks if n.endswith(".0.weight")}
    assert len(kernels) == 15 and trainable == everything - kernels
    assert not transfer.caches_conv_features(module.net, _preset("released_code"))

    trainable, _ = _trainable(_preset("bn_only"))
    assert trainable == {n for n in conv_blocks if ".1." in n}
    assert len(trainable) == 30

    trainable, _ = _trainable(_preset("none"))
    assert trainable == everything


def test_reset_reinitialises_only_the_classifier():
    module = _source_module()
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    assert transfer.reset_layers(module.net, _preset("paper")) == ["classifier"]
    after = module.net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"classifier.weight", "classifier.bias"}


def _tiny_samples(seed=0):
    gen = torch.Generator().manual_seed(seed)
    volume = torch.randn((36, 34, 30), generator=gen)
    classes = np.zeros(volume.shape, np.int64)
    classes[10:16, 12:18, 9:13] = 3
    classes[20:25, 14:19, 15:20] = 8
    rng = np.random.default_rng(seed)
    coords, targets = sample_voxels(classes, rng)
    prior = np.full((len(coords), 15), 1 / 15, np.float32)
    return SubjectSamples(
        volume, torch.from_numpy(coords), torch.from_numpy(targets), torch.from_numpy(prior)
    )


def _one_epoch(cached: bool):
    module = _source_module()
    preset = _preset("paper")
    transfer.reset_layers(module.net, preset)
    samples = [_tiny_samples(0), _tiny_samples(1)]
    if cached:
        pooled = transfer.feature_dataset(module.net, samples)
    else:
        pooled = PatchDataset(samples)
    train_idx, val_idx = split_indices(len(pooled), 0.25, np.random.default_rng(0))
    norms_before = {k: v.clone() for k, v in module.net.state_dict().items() if "running" in k}
    L.seed_everything(1)
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[transfer.FreezeSchedule(preset)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )

    def loader(indices, shuffle):
        return DataLoader(
            pooled.subset(indices), batch_size=32, shuffle=shuffle, collate_fn=collate_batch
        )

    trainer.fit(module, loader(train_idx, True), loader(val_idx, False))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return metrics, module.net.state_dict(), norms_before


def test_cached_features_train_exactly_as_patches():
    cached, cached_state, _ = _one_epoch(cached=True)
    patched, patched_state, norms_before = _one_epoch(cached=False)
    assert cached["train_loss_epoch"] == pytest.approx(patched["train_loss_epoch"], rel=1e-4)
    assert cached["val_loss"] == pytest.approx(patched["val_loss"], rel=1e-4)
    for name in ("fc1.weight", "classifier.weight", "paths.axial.dense.weight"):
        # The two paths' features differ by float rounding (~1e-6); where a gradient is near
        # zero, Adam's normalised step can turn that into a difference of up to its lr (1e-4)
        # in a rare weight. On average they agree a thousand times closer.
        difference = (cached_state[name] - patched_state[name]).abs()
        assert difference.max() < 1e-4 and difference.mean() < 1e-7, name
    # The patch path ran the frozen conv stacks: their BatchNorm stayed on the source statistics.
    for name, value in norms_before.items():
        assert torch.equal(patched_state[name], value), name
