import numpy as np
import torch

from subseg.model import inference
from subseg.model.network import SubcorticalNet
from subseg.preprocessing import atlas


def test_postprocessing_keeps_the_atlas_supported_component():
    classes = np.zeros((20, 20, 20), np.uint8)
    classes[2:8, 2:8, 2:8] = 3  # large, outside the mask
    classes[12:14, 12:14, 12:14] = 3  # small, inside the mask
    classes[15:17, 2:4, 2:4] = 5  # only component of class 5, outside the mask
    classes[10:12, 2:4, 10:12] = 9
    classes[10:12, 5:7, 10:12] = 9  # two components of class 9, both inside; bigger one wins
    classes[10:12, 7, 10:12] = 9
    mask = np.zeros_like(classes, bool)
    mask[10:, :, 10:] = True
    out = inference.postprocess(classes, mask)
    assert (out == 3).sum() == 8 and out[12, 12, 12] == 3 and out[4, 4, 4] == 0
    assert not (out == 5).any()  # nothing supported by the atlas: dropped, not spread
    assert (out == 9).sum() == 12 and out[10, 2, 10] == 0
    assert set(np.unique(out)) == {0, 3, 9}  # absent classes stay absent


def test_segment_fills_the_roi_only():
    torch.manual_seed(0)
    model = SubcorticalNet().eval()
    shape = (24, 26, 22)
    volume = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    structures = np.zeros((14, 10, 10, 10), np.float32)
    structures[4, 3:7, 3:7, 3:7] = 0.9
    regions = np.ones((10, 10, 10), np.uint8)
    regions[:2] = 0
    regions[4:6, 4:6, 4:6] = 2
    prior = atlas.Prior(structures, regions, (slice(5, 15), slice(6, 16), slice(4, 14)), shape)
    raw, probs = inference.segment(model, volume, prior, postprocessing=False)
    assert raw.shape == shape and raw.dtype == np.uint8
    assert not raw[~prior.roi].any()
    np.testing.assert_allclose(probs[:, regions > 0].sum(axis=0), 1.0, atol=1e-5)
    assert not probs[:, regions == 0].any()
    np.testing.assert_array_equal(raw[prior.box], np.where(regions > 0, probs.argmax(0), 0))
    kept, _ = inference.segment(model, volume, prior)
    np.testing.assert_array_equal(
        kept[prior.box], inference.postprocess(raw[prior.box], regions > 1)
    )
