import lightning as L
import numpy as np
import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from subseg import data, io, model, transfer
from subseg.lit_module import SegmentationModule
from subseg.model import CONV_FEATURES, VIEWS


def _preset(name, **changes):
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "freeze" / f"{name}.yaml"))
    cfg.update(changes)
    return transfer.FreezePreset.from_config(cfg)


def _source_module(seed=0):
    """A 'source' network with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    module = SegmentationModule(dropout=0.3, lr=1e-3)
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
    with pytest.raises(io.InputError, match="junk.ckpt: not a readable checkpoint"):
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
    coords, targets = data.sample_voxels(classes, rng)
    prior = np.full((len(coords), 15), 1 / 15, np.float32)
    return data.SubjectSamples(
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
        pooled = data.PatchDataset(samples)
    train_idx, val_idx = data.split_indices(len(pooled), 0.25, np.random.default_rng(0))
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
            pooled.subset(indices), batch_size=32, shuffle=shuffle, collate_fn=data.collate_batch
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
        assert torch.allclose(cached_state[name], patched_state[name], atol=1e-5), name
    # The patch path ran the frozen conv stacks: their BatchNorm stayed on the source statistics.
    for name, value in norms_before.items():
        assert torch.equal(patched_state[name], value), name


def _layer_by_layer(net, conv_features, atlas):
    """from_conv_features through the network's own nn.Dropout layers (torch's dropout)."""
    blocks = conv_features.split(CONV_FEATURES, dim=1)
    paths = [net.paths[view].fully_connected(x) for view, x in zip(VIEWS, blocks, strict=True)]
    return net.head(torch.cat(paths, dim=1), atlas)


def _train_steps(net, forward, batches, between=None):
    """Logits, gradients and the generator's state after a forward/backward per batch."""
    torch.manual_seed(3)
    out = []
    for i, (x, atlas) in enumerate(batches):
        net.zero_grad()
        logits = forward(net, x, atlas)
        logits.square().sum().backward()
        grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
        out.append((logits.detach(), grads))
        if between is not None:
            between(i)
    return out, torch.get_rng_state()


@pytest.mark.parametrize("ahead", [False, True])
def test_cached_dropout_draws_what_torch_dropout_draws(monkeypatch, ahead):
    """Drawn in place or a step ahead, the noise is nn.Dropout's, bit for bit, as is the RNG."""
    monkeypatch.setattr(model.DROPOUT_NOISE, "ahead", ahead)
    torch.manual_seed(0)
    net = model.SubcorticalNet(dropout=0.3).train()
    sizes = [16, 16, 16, 7, 16, 16]  # a short batch, then full ones again
    batches = [(torch.randn(n, 3 * CONV_FEATURES), torch.rand(n, 15)) for n in sizes]

    def other_draws(i):  # something else uses the generator between two steps
        if i == 1:
            torch.rand(5)

    expected, expected_state = _train_steps(net, _layer_by_layer, batches, other_draws)
    cached = type(net).from_conv_features
    got, state = _train_steps(net, cached, batches, other_draws)
    assert torch.equal(state, expected_state)
    for (logits, grads), (want_logits, want_grads) in zip(got, expected, strict=True):
        assert torch.equal(logits, want_logits)
        assert all(torch.equal(g, w) for g, w in zip(grads, want_grads, strict=True))
    # Not a constant: the next draw differs.
    assert not torch.equal(got[0][0], got[1][0])


def test_cached_dropout_in_eval_mode_draws_nothing():
    net = model.SubcorticalNet(dropout=0.3).eval()
    x, atlas = torch.randn(8, 3 * CONV_FEATURES), torch.rand(8, 15)
    state = torch.get_rng_state()
    assert torch.equal(net.from_conv_features(x, atlas), _layer_by_layer(net, x, atlas))
    assert torch.equal(torch.get_rng_state(), state)


def _forked_draws(net, queue):
    torch.set_num_threads(1)  # as loader workers do: OpenMP's pool does not survive a fork
    sums = [
        float(net.from_conv_features(torch.ones(4, 3 * CONV_FEATURES), torch.ones(4, 15)).sum())
        for _ in range(3)
    ]
    queue.put(sums)


def test_dropout_drawn_ahead_survives_a_fork(monkeypatch):
    """A forked process (ddp_fork, loader workers) inherits the helper pool but not its thread."""
    import multiprocessing

    monkeypatch.setattr(model.DROPOUT_NOISE, "ahead", True)
    net = model.SubcorticalNet(dropout=0.3).train()
    torch.manual_seed(1)
    net.from_conv_features(torch.ones(4, 3 * CONV_FEATURES), torch.ones(4, 15))  # one pending
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_forked_draws, args=(net, queue))
    child.start()
    try:
        value = queue.get(timeout=60)
    except Exception:
        value = None
    child.join(timeout=10)
    if child.is_alive():
        child.kill()
    assert value is not None, "the forked process hung waiting for a helper it does not have"
    assert child.exitcode == 0 and np.isfinite(value).all() and len(set(value)) == 3


def test_cached_dropout_under_autocast_is_the_layers_own(monkeypatch):
    """Under autocast the layers' inputs change dtype: the network's own dropout applies."""
    monkeypatch.setattr(model.DROPOUT_NOISE, "ahead", True)
    net = model.SubcorticalNet(dropout=0.3).train()
    x, atlas = torch.randn(8, 3 * CONV_FEATURES), torch.rand(8, 15)
    out = []
    for forward in (type(net).from_conv_features, _layer_by_layer):
        torch.manual_seed(2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out.append(forward(net, x, atlas))
    assert out[0].dtype == torch.bfloat16 and torch.equal(out[0], out[1])
