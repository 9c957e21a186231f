import nibabel as nib
import numpy as np
import pytest
from conftest import REPO
from omegaconf import OmegaConf

from subseg.core import io, labels
from subseg.data import synth
from subseg.preprocessing import transforms


def _n4_cfg(cache_dir, **changes):
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "preprocess" / "n4.yaml"))
    return {**cfg, "cache_dir": str(cache_dir), **changes}


@pytest.fixture(scope="module")
def biased_scan(tmp_path_factory):
    """The (left-right symmetric) ICBM template at 2 mm under a known smooth field.

    The field is multiplicative, 0.8 at the brain's right edge to 1.2 at its left, with a gentle
    anterior-posterior bend: a receive-coil field of the strength the issue measured.
    """
    template = synth.load_template()
    t1, cerebra = template.t1[::2, ::2, ::2], template.labels[::2, ::2, ::2]
    affine = template.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    brain = np.argwhere(t1 > 0)
    low, high = brain.min(axis=0), brain.max(axis=0)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in t1.shape], indexing="ij")
    x = (np.arange(t1.shape[0])[:, None, None] - (low[0] + high[0]) / 2) / ((high[0] - low[0]) / 2)
    field = 1.0 - 0.2 * x + 0.05 * grid[1] ** 2  # RAS: x grows to the right, so left is brighter
    root = tmp_path_factory.mktemp("bias")
    clean, biased = root / "clean.nii.gz", root / "biased.nii.gz"
    nib.save(nib.Nifti1Image((t1 * 1000).astype(np.float32), affine), clean)
    nib.save(nib.Nifti1Image((t1 * field * 1000).astype(np.float32), affine), biased)
    classes = labels.map_to_classes(cerebra, "cerebra")
    return root, clean, biased, classes


def _putamen_ratio(volume, classes):
    right, left = labels.class_of("right_putamen"), labels.class_of("left_putamen")
    return volume[classes == left].mean() / volume[classes == right].mean()


def test_n4_removes_a_smooth_multiplicative_field(biased_scan):
    root, clean, biased, classes = biased_scan
    load_only = transforms.preprocessing(None, normalize=False)
    corrected = transforms.preprocessing(None, normalize=False, preprocess=_n4_cfg(root / "c"))
    assert (
        abs(_putamen_ratio(load_only({"image": str(clean)})["image"][0].numpy(), classes) - 1)
        < 0.01
    )
    before = _putamen_ratio(load_only({"image": str(biased)})["image"][0].numpy(), classes)
    after = _putamen_ratio(corrected({"image": str(biased)})["image"][0].numpy(), classes)
    assert abs(before - 1) > 0.03, before  # the field is there without N4 ...
    assert abs(after - 1) < 0.03, after  # ... and gone with it
    out = corrected({"image": str(biased)})["image"][0].numpy()
    assert np.array_equal(out == 0, load_only({"image": str(biased)})["image"][0].numpy() == 0)


def test_preprocess_none_leaves_the_scan_alone(biased_scan):
    root, _, biased, _ = biased_scan
    plain = transforms.preprocessing(None)({"image": str(biased)})["image"]
    none = transforms.preprocessing(None, preprocess={"name": "none", "kind": "none"})
    np.testing.assert_array_equal(none({"image": str(biased)})["image"], plain)
    with pytest.raises(io.InputError, match="choose n4 or none"):
        transforms.preprocessing(None, preprocess={"name": "x", "kind": "n3"})
