import pytest
import torch

from subseg.model import dense, network, patches
from subseg.model.network import NUM_CLASSES, VIEWS, SubcorticalNet, count_trainable


def _randomised_eval_model(seed=0, dropout=0.5):
    """A randomly initialised network with non-trivial BatchNorm statistics and PReLU slopes."""
    torch.manual_seed(seed)
    model = SubcorticalNet(dropout)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
        if isinstance(module, torch.nn.PReLU):
            module.weight.data.uniform_(0.05, 0.5)
    return model.eval()


def _volume_and_roi(shape=(30, 27, 24), seed=1):
    gen = torch.Generator().manual_seed(seed)
    volume = torch.randn(shape, generator=gen)
    volume[volume.abs() < 0.2] = 0  # some background zeros, as in a skull-stripped image
    roi = torch.zeros(shape, dtype=torch.bool)
    x, y, z = shape
    roi[: x // 3, 3 : y // 2, 5 : z // 2] = True  # touches the low border of axis 0
    roi[2 * x // 3 :, 2 * y // 3 :, 2 * z // 3 :] = True  # touches every high border
    roi[x // 2, 0, z - 1] = True  # a lone voxel on two borders
    return volume, roi


def test_parameter_count_matches_the_paper():
    model = SubcorticalNet()
    assert count_trainable(model) == 882_375
    running = sum(b.numel() for n, b in model.named_buffers() if "running" in n)
    assert running == 1_080


def test_patches_are_centred_and_zero_padded():
    volume = torch.arange(5 * 6 * 7, dtype=torch.float32).reshape(5, 6, 7) + 1
    padded = patches.pad_volume(volume)
    assert padded.shape == (5 + 31, 6 + 31, 7 + 31)
    coords = torch.tensor([[2, 3, 4], [0, 0, 0], [4, 5, 6]])
    out = patches.extract_patches(padded, coords)
    for n, (x, y, z) in enumerate(coords.tolist()):
        assert out["axial"][n, 0, 16, 16] == volume[x, y, z]
        assert out["axial"][n, 0, 17, 16] == (volume[x + 1, y, z] if x + 1 < 5 else 0)
        assert out["axial"][n, 0, 16, 17] == (volume[x, y + 1, z] if y + 1 < 6 else 0)
        assert out["coronal"][n, 0, 16, 15] == (volume[x, y, z - 1] if z > 0 else 0)
        assert out["sagittal"][n, 0, 15, 16] == (volume[x, y - 1, z] if y > 0 else 0)
        # Everything outside the volume is zero; the volume itself has no zeros.
        assert int((out["axial"][n] != 0).sum()) == 5 * 6
        assert int((out["sagittal"][n] != 0).sum()) == 6 * 7


def test_dense_equals_patches_over_a_border_touching_roi():
    model = _randomised_eval_model()
    volume, roi = _volume_and_roi()
    coords = torch.nonzero(roi)
    atlas = torch.softmax(torch.randn(len(coords), NUM_CLASSES), dim=1)
    with torch.no_grad():
        batch = patches.extract_patches(patches.pad_volume(volume), coords)
        reference_features = model.path_features(batch)
        reference = torch.softmax(model(*(batch[v] for v in VIEWS), atlas), dim=1)
    features = dense.dense_path_features(model, volume, roi)
    assert features.shape == (len(coords), 540)
    assert (features - reference_features).abs().max() < 1e-4
    probabilities = dense.dense_probabilities(model, volume, roi, atlas, voxels_per_batch=100)
    assert (probabilities - reference).abs().max() < 1e-4
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(len(coords)))


def test_dense_conv_features_equal_patches_and_give_the_same_logits():
    model = _randomised_eval_model(seed=3)
    volume, roi = _volume_and_roi(seed=4)
    coords = torch.nonzero(roi)
    atlas = torch.softmax(torch.randn(len(coords), NUM_CLASSES), dim=1)
    with torch.no_grad():
        batch = patches.extract_patches(patches.pad_volume(volume), coords)
        reference = torch.cat([model.paths[v].conv_features(batch[v]) for v in VIEWS], dim=1)
        logits = model(*(batch[v] for v in VIEWS), atlas)
    features = dense.dense_conv_features(model, volume, roi)
    assert features.shape == (len(coords), 3 * 540)
    assert (features - reference).abs().max() < 1e-4
    with torch.no_grad():
        assert (model.from_conv_features(features, atlas) - logits).abs().max() < 1e-4


def test_dense_follows_the_weights_it_is_given():
    # No stale copies: changing the model's weights changes the dense output identically.
    model = _randomised_eval_model()
    volume, roi = _volume_and_roi(shape=(20, 20, 20))
    before = dense.dense_path_features(model, volume, roi)
    with torch.no_grad():
        model.paths["coronal"].conv3[1].running_mean.add_(0.7)
        coords = torch.nonzero(roi)
        reference = model.path_features(patches.extract_patches(patches.pad_volume(volume), coords))
    after = dense.dense_path_features(model, volume, roi)
    assert (after[:, :180] == before[:, :180]).all()  # axial path untouched
    assert (after[:, 180:360] - before[:, 180:360]).abs().max() > 1e-3
    assert (after - reference).abs().max() < 1e-4


def test_dense_refuses_training_mode():
    model = SubcorticalNet().train()
    volume, roi = _volume_and_roi(shape=(12, 12, 12))
    with pytest.raises(RuntimeError, match="eval mode"):
        dense.dense_path_features(model, volume, roi)


def test_dropout_keeps_each_element_with_probability_one_minus_p_and_rescales():
    layer = network.Dropout(0.3).train()
    x = torch.ones(400, 500, requires_grad=True)
    torch.manual_seed(0)
    out = layer(x)
    kept = out != 0
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.005)
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.7))
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # the gradient passes where kept, scaled alike
    torch.manual_seed(0)
    assert torch.equal(layer(x), out)  # the seed decides the mask
    assert not torch.equal(layer(x), out)  # and the next call draws another
    assert torch.equal(layer.eval()(x), x)
