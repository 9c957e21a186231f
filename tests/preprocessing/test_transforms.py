import numpy as np
import pytest
import torch
from conftest import affine_for, write_nifti
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd
from scipy import ndimage

from subseg.core import io, labels
from subseg.preprocessing import transforms


def _subject(tiny_cohorts, domain="target"):
    root = tiny_cohorts[domain]
    return {
        "image": str(root / "images" / "t000.nii.gz"),
        "label": str(root / "labels" / "t000.nii.gz"),
    }


def test_loader_matches_monai_orientation(tiny_cohorts):
    item = _subject(tiny_cohorts)
    ours = transforms.LoadSubjectd(protocol="aseg")(item)
    monai = Compose(
        [
            LoadImaged(["image", "label"], image_only=True),
            EnsureChannelFirstd(["image", "label"]),
            Orientationd(["image", "label"], axcodes="RAS"),
        ]
    )(item)
    for key in ("image", "label"):
        assert ours[key].shape == monai[key].shape
        np.testing.assert_array_equal(ours[key].numpy(), monai[key].numpy())
        np.testing.assert_allclose(ours[key].affine.numpy(), monai[key].affine.numpy(), atol=1e-5)
    assert ours["image"].meta["filename_or_obj"] == item["image"]
    np.testing.assert_allclose(
        np.abs(np.diag(ours["image"].affine.numpy())[:3]), [2.34375, 3.75, 2.34375]
    )


def test_preprocessing_pipeline(tiny_cohorts):
    out = transforms.preprocessing("aseg")(_subject(tiny_cohorts))
    image, label = out["image"], out["label"]
    assert image.shape == label.shape and image.shape[0] == 1
    assert label.dtype == torch.uint8 and set(torch.unique(label).tolist()) == set(range(15))
    brain = image[image != 0]
    assert abs(float(brain.mean())) < 1e-3 and abs(float(brain.std()) - 1) < 1e-2
    # Structures lie inside the brain, not in the zero background.
    assert bool((image[label > 0] != 0).all())


def test_pipeline_error_names_the_file(tmp_path, tiny_cohorts):
    item = _subject(tiny_cohorts)
    item["label"] = str(write_nifti(tmp_path / "small.nii.gz", np.zeros((3, 3, 3), np.int16)))
    with pytest.raises(io.InputError, match="small.nii.gz: label grid"):
        transforms.LoadSubjectd(protocol="aseg")(item)


def test_map_labels_on_tensors_and_arrays():
    raw = np.array([[[49, 10, 2, 4, 58]]])
    expected = [[[1, 2, 0, 0, 13]]]
    assert transforms.MapLabels("aseg")(raw).tolist() == expected
    assert transforms.MapLabels("aseg")(torch.as_tensor(raw)).tolist() == expected
    out = transforms.MapLabelsd("label", "aseg")({"label": raw, "image": 1})
    assert out["label"].tolist() == expected and out["image"] == 1


def _scanner(values, curve):
    image = np.zeros(values.size + 500, dtype=np.float32)
    image[: values.size] = curve(values)
    return image


def test_nyul_standardisation_aligns_histograms():
    rng = np.random.default_rng(0)
    tissue = rng.gamma(4.0, 1.0, 20000) + 0.5
    reference = [_scanner(tissue * s, lambda v: v) for s in (10.0, 11.0, 12.0)]
    standard = transforms.learn_standard_scale(reference)
    other = _scanner(tissue, lambda v: 3.0 * v**1.7 + 2.0)  # another scanner's contrast curve

    before = transforms.nyul_landmarks(other)
    out = transforms.HistogramStandardize(standard)(other)
    after = transforms.nyul_landmarks(out)
    np.testing.assert_allclose(after, standard, rtol=2e-3)
    assert np.abs(before - standard).max() > 10 * np.abs(after - standard).max()
    assert not out[tissue.size :].any()  # background stays zero
    # Monotone: the order of voxel intensities is kept.
    order = np.argsort(other[: tissue.size])
    assert np.all(np.diff(out[: tissue.size][order]) >= -1e-4)


def test_nyul_survives_tied_landmarks():
    # An integer, narrow-range image: most voxels share a few values, landmarks tie.
    rng = np.random.default_rng(0)
    image = rng.choice([20, 21, 22], size=20000, p=[0.5, 0.3, 0.2]).astype(np.float32)
    image[:100] = 5
    image[-100:] = 0
    standard = np.linspace(-2.0, 3.0, len(transforms.NYUL_PERCENTILES))
    out = transforms.HistogramStandardize(standard)(image)
    assert np.all(np.isfinite(out)) and np.abs(out).max() < 100
    assert np.all(np.diff(out[np.argsort(image[:-100])]) >= -1e-6)
    with pytest.raises(ValueError, match="same intensity"):
        transforms.learn_standard_scale([np.full(50, 7.0)])
    with pytest.raises(ValueError, match="finite"):
        transforms.HistogramStandardize([0.0, np.nan, 2.0], percentiles=(1, 50, 99))


def test_nyul_in_the_pipeline(tiny_cohorts):
    source = tiny_cohorts["source"]
    zscored = [
        transforms.preprocessing(None)({"image": str(p)})["image"]
        for p in sorted((source / "images").glob("*.nii.gz"))
    ]
    standard = transforms.learn_standard_scale(zscored)
    out = transforms.preprocessing("aseg", standard)(_subject(tiny_cohorts))
    np.testing.assert_allclose(transforms.nyul_landmarks(out["image"]), standard, atol=1e-2)


def test_rejects_bad_landmarks():
    with pytest.raises(ValueError, match="increase"):
        transforms.HistogramStandardize([3.0, 2.0, 1.0], percentiles=(1, 50, 99))


def test_label_protocol_is_checked_on_load(tmp_path):
    affine = affine_for("LAS")
    img = write_nifti(
        tmp_path / "i.nii.gz", np.random.default_rng(0).uniform(1, 2, (6, 6, 6)), affine
    )
    lab = write_nifti(tmp_path / "l.nii.gz", np.full((6, 6, 6), 59, np.int16), affine)
    item = {"image": str(img), "label": str(lab)}
    with pytest.raises(io.InputError, match="none of the 14 structure ids of aseg"):
        transforms.preprocessing("aseg")(item)
    out = transforms.preprocessing("miccai2012")(item)
    assert set(torch.unique(out["label"]).tolist()) == {labels.class_of("right_thalamus")}


def _brain_with_rim(tmp_path, rim_voxels: int, name: str):
    """A uniform noisy 'brain' (a 1 x 1 x 1.5 mm ellipsoid) inside a dark CSF rim of some width.

    The same brain voxels every time (same seed); only how much rim the mask kept differs, as
    between two extractors.
    """
    from scipy import ndimage

    rng = np.random.default_rng(0)
    shape = (64, 64, 44)
    index = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape) - 1) / 2
    radius = np.sqrt(sum(((index[i] - centre[i]) / (24, 24, 16)[i]) ** 2 for i in range(3)))
    tissue = radius <= 1.0
    image = np.where(tissue, 100 + rng.normal(0, 5, shape), 0).astype(np.float32)
    rim = ndimage.binary_dilation(tissue, iterations=rim_voxels) & ~tissue
    image[rim] = 20 + rng.normal(0, 2, int(rim.sum()))
    path = write_nifti(tmp_path / f"{name}.nii.gz", image, affine_for("RAS", (1.0, 1.0, 1.5)))
    return path, tissue


def _zscored(path, **preprocess):
    cfg = {"name": "none", "kind": "none", "brain": {"method": "none"}, **preprocess}
    return transforms.preprocessing(None, preprocess=cfg)({"image": str(path)})["image"][0].numpy()


def test_an_interior_zscore_does_not_move_with_the_mask_edge(tmp_path):
    """One more voxel of CSF kept at the mask's edge moves a whole-mask z-score of every brain
    voxel; statistics from the brain's interior (zscore_interior_mm) barely move."""
    thin, tissue = _brain_with_rim(tmp_path, 1, "thin")
    thick, _ = _brain_with_rim(tmp_path, 2, "thick")
    whole = np.abs(_zscored(thin) - _zscored(thick))[tissue].mean()
    inner = [_zscored(p, zscore_interior_mm=5) for p in (thin, thick)]
    interior = np.abs(inner[0] - inner[1])[tissue].mean()
    assert whole > 0.1 and interior < whole / 20
    # The whole brain is normalised (rim included), by its interior's mean and s.d.
    brain = inner[0][tissue]
    assert abs(float(brain.mean())) < 0.05 and abs(float(brain.std()) - 1) < 0.05
    assert (inner[0] != 0).sum() == (_zscored(thin) != 0).sum()


def test_a_record_without_the_interior_setting_is_the_whole_mask_zscore(tmp_path):
    """Models trained before zscore_interior_mm existed get the input they were trained on."""
    path, _ = _brain_with_rim(tmp_path, 1, "scan")
    before = transforms.Pipeline(
        [transforms.LoadSubjectd(), transforms.NormalizeIntensityd("image", nonzero=True)]
    )({"image": str(path)})["image"][0].numpy()
    np.testing.assert_array_equal(_zscored(path), before)
    np.testing.assert_array_equal(_zscored(path, zscore_interior_mm=0), before)
    assert not np.array_equal(_zscored(path, zscore_interior_mm=5), before)
    with pytest.raises(io.InputError, match="zscore_interior_mm=-1"):
        transforms.zscore_interior_mm({"zscore_interior_mm": -1})


def test_interior_statistics_on_the_brains_box_equal_the_whole_grids():
    """The distance transform is cropped to the brain's box for speed; the result must not move,
    also where the brain touches the grid's edge."""
    rng = np.random.default_rng(3)
    volume = np.zeros((40, 36, 30))
    volume[5:33, 0:30, 8:30] = rng.uniform(10, 100, (28, 30, 22))  # touches two faces
    volume[14:18, 12:16, 12:16] = 0  # a hole inside
    spacing = (1.0, 0.9, 1.5)
    brain = volume != 0
    depth = ndimage.distance_transform_edt(brain, sampling=spacing)
    for interior_mm in (1.0, 3.0, 5.0):
        inner = volume[depth > interior_mm]
        expected = (float(inner.mean()), float(inner.std()))
        assert transforms.interior_statistics(volume, spacing, interior_mm) == pytest.approx(
            expected, rel=1e-12
        )
