import numpy as np
import torch
from torch import nn

from subseg.model.network import SubcorticalNet
from subseg.training.adabn import adapt_batchnorm, conv_norms

STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _scans(shift: float, scale: float, n: int = 2):
    rng = np.random.default_rng(1)
    shape = (24, 26, 22)
    roi = np.zeros(shape, bool)
    roi[6:18, 8:20, 5:16] = True
    return [
        (torch.from_numpy((rng.normal(shift, scale, shape)).astype(np.float32)), roi)
        for _ in range(n)
    ]


def test_adabn_changes_only_batchnorm_running_statistics():
    torch.manual_seed(0)
    net = SubcorticalNet(0.3).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    momenta = [m.momentum for m in conv_norms(net)]
    record = adapt_batchnorm(net, _scans(2.0, 3.0), np.random.default_rng(0), 500, 256)
    after = net.state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "AdaBN changed nothing"
    assert all(k.rsplit(".", 1)[1] in STATISTICS for k in changed), sorted(changed)
    # Every conv block's statistics moved (a shifted, wider input), and nothing after them.
    assert all(
        f"{n}.running_mean" in changed for n, m in net.named_modules() if m in conv_norms(net)
    )
    assert record["layers"] == 15 and record["scans"] == 2 and record["voxels"] == 1000
    assert record["shift"] > 0
    # The layers are left as they were found: eval mode, their momentum restored.
    assert not net.training and not any(m.training for m in net.modules())
    assert [m.momentum for m in conv_norms(net)] == momenta


def test_adabn_statistics_are_those_of_the_scans():
    """After AdaBN the first BatchNorm's running mean is the mean of its input on the patches."""
    from subseg.model import patches

    torch.manual_seed(0)
    net = SubcorticalNet(0.3).eval()
    scans = _scans(-1.0, 0.5, n=1)
    adapt_batchnorm(net, scans, np.random.default_rng(0), 10_000, 100_000)  # one batch: exact
    volume, roi = scans[0]
    coords = torch.from_numpy(np.argwhere(roi))
    views = patches.extract_patches(patches.pad_volume(volume), coords)
    path = net.paths["axial"]
    with torch.no_grad():
        conv_out = path.conv1[0](views["axial"])
    expected = conv_out.mean(dim=(0, 2, 3))
    assert torch.allclose(path.conv1[1].running_mean, expected, atol=1e-4)
    # Evaluated on the same patches, the first block's normalised output is now centred.
    with torch.no_grad():
        normalised = path.conv1[1](conv_out)
    assert normalised.mean(dim=(0, 2, 3)).abs().max() < 1e-3


def test_adabn_leaves_statistics_that_already_fit_nearly_unchanged():
    """Estimated twice on the same kind of scans, the statistics agree (it is an estimate of
    the scans' distribution, not of the draw)."""
    torch.manual_seed(0)
    first, second = SubcorticalNet(0.3).eval(), SubcorticalNet(0.3).eval()
    second.load_state_dict(first.state_dict())
    adapt_batchnorm(first, _scans(0.5, 1.0), np.random.default_rng(0), 2000)
    adapt_batchnorm(second, _scans(0.5, 1.0), np.random.default_rng(7), 2000)
    for a, b in zip(conv_norms(first), conv_norms(second), strict=True):
        scale = a.running_var.sqrt()
        assert ((a.running_mean - b.running_mean).abs() / scale).max() < 0.1
    assert isinstance(conv_norms(first)[0], nn.BatchNorm2d)
