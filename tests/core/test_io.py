import gzip
import os
import stat

import nibabel as nib
import numpy as np
import pytest
from conftest import affine_for, write_nifti

from subseg.core import io


def _brain(shape=(9, 10, 11), seed=0):
    rng = np.random.default_rng(seed)
    data = rng.uniform(10, 100, shape).astype(np.float32)
    data[0] = 0
    return data


@pytest.mark.parametrize("axcodes", ["LAS", "LIA", "PSR", "RAS"])
def test_orientation_round_trip_is_exact(tmp_path, axcodes):
    affine = affine_for(axcodes, zooms=(0.9375, 1.5, 0.9375))
    data = _brain()
    src = write_nifti(tmp_path / "in.nii.gz", data, affine)
    vol = io.load_image(src)

    canonical = nib.as_closest_canonical(nib.load(src))
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(vol.data, canonical.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(vol.affine, canonical.affine)

    out = io.save_like(vol.data, vol, tmp_path / "out.nii.gz")
    back = nib.load(out)
    assert back.shape == data.shape
    np.testing.assert_array_equal(back.affine, affine)
    assert back.header.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(back.dataobj), data)
    assert nib.aff2axcodes(back.affine) == tuple(axcodes)


def test_label_output_keeps_integer_type_and_geometry(tmp_path):
    affine = affine_for("LIA", zooms=(0.9375, 0.9375, 1.5))
    image = io.load_image(write_nifti(tmp_path / "img.nii.gz", _brain(), affine))
    seg = (image.data > 50).astype(np.uint8) * 3
    out = nib.load(io.save_like(seg, image, tmp_path / "seg.nii.gz"))
    assert out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(out.affine, affine)
    np.testing.assert_array_equal(np.asarray(out.dataobj), image.to_original(seg))


def test_four_d_with_one_volume_is_accepted(tmp_path):
    data = _brain()[..., None]
    vol = io.load_image(write_nifti(tmp_path / "four.nii.gz", data))
    assert vol.data.shape == data.shape[:3]


def _one_line_naming(exc_info, path):
    message = str(exc_info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_missing_and_unreadable_files(tmp_path):
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(io.InputError) as err:
        io.load_image(missing)
    assert "no such file" in _one_line_naming(err, missing)

    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(gzip.compress(b"not a nifti at all" * 10))
    with pytest.raises(io.InputError) as err:
        io.load_image(broken)
    assert "cannot be read" in _one_line_naming(err, broken)


@pytest.mark.parametrize(
    "shape, message",
    [((10, 10), "expected a 3-D volume"), ((5, 5, 5, 2), "a 4-D file with 2 volumes")],
)
def test_wrong_dimensions(tmp_path, shape, message):
    path = write_nifti(tmp_path / "bad.nii.gz", np.ones(shape, dtype=np.float32))
    with pytest.raises(io.InputError) as err:
        io.load_image(path)
    assert message in _one_line_naming(err, path)


def test_nan_and_inf(tmp_path):
    data = _brain()
    data[3, 3, 3] = np.nan
    data[4, 4, 4] = np.inf
    path = write_nifti(tmp_path / "nan.nii.gz", data)
    with pytest.raises(io.InputError) as err:
        io.load_image(path)
    assert "2 voxels are NaN or infinite" in _one_line_naming(err, path)


@pytest.mark.parametrize("value", [0.0, 7.0])
def test_empty_brain(tmp_path, value):
    path = write_nifti(tmp_path / "empty.nii.gz", np.full((6, 6, 6), value, dtype=np.float32))
    with pytest.raises(io.InputError) as err:
        io.load_image(path)
    assert "empty brain" in _one_line_naming(err, path)


def test_label_grid_mismatch(tmp_path):
    image = io.load_image(write_nifti(tmp_path / "img.nii.gz", _brain((8, 8, 8))))
    shape_path = write_nifti(tmp_path / "shape.nii.gz", np.zeros((8, 8, 9), np.int16))
    with pytest.raises(io.InputError) as err:
        io.load_label(shape_path, image=image)
    assert "does not match image img.nii.gz grid" in _one_line_naming(err, shape_path)

    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    affine_path = write_nifti(tmp_path / "moved.nii.gz", np.zeros((8, 8, 8), np.int16), shifted)
    with pytest.raises(io.InputError) as err:
        io.load_label(affine_path, image=image)
    assert "affine differs" in _one_line_naming(err, affine_path)


def test_label_without_expected_ids(tmp_path):
    data = np.zeros((8, 8, 8), np.int16)
    data[2:4, 2:4, 2:4] = 59  # a MICCAI thalamus id, not an aseg structure id
    path = write_nifti(tmp_path / "lab.nii.gz", data)
    with pytest.raises(io.InputError) as err:
        io.load_label(path, protocol="aseg")
    message = _one_line_naming(err, path)
    assert "none of the 14 structure ids of aseg" in message and "59" in message
    assert io.load_label(path, protocol="miccai2012").data.max() == 59


def test_non_integer_labels(tmp_path):
    path = write_nifti(tmp_path / "frac.nii.gz", np.full((4, 4, 4), 10.4, np.float32))
    with pytest.raises(io.InputError) as err:
        io.load_label(path)
    assert "integers" in _one_line_naming(err, path)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "seg.nii.gz"
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
    with io.atomic_path(target) as tmp:
        assert tmp.name.endswith(".nii.gz")
        tmp.write_text("whole")
    assert target.read_text() == "whole"


def test_rgb_and_out_of_range_labels_are_refused(tmp_path):
    rgb_type = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb = np.zeros((4, 4, 4), dtype=rgb_type)
    path = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), path)
    with pytest.raises(io.InputError) as err:
        io.load_image(path)
    assert "not a real scalar" in _one_line_naming(err, path)

    huge = write_nifti(tmp_path / "huge.nii.gz", np.full((3, 3, 3), 2.0**40))
    with pytest.raises(io.InputError) as err:
        io.load_label(huge)
    assert "32-bit" in _one_line_naming(err, huge)


def test_outputs_follow_the_umask_and_drop_the_t1_window(tmp_path):
    image_path = write_nifti(tmp_path / "img.nii.gz", _brain())
    img = nib.load(image_path)
    img.header["cal_min"], img.header["cal_max"] = 10, 90
    nib.save(img, image_path)
    image = io.load_image(image_path)
    old = os.umask(0o027)
    try:
        out = io.save_like(np.ones(image.data.shape, np.int64), image, tmp_path / "seg.nii.gz")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    back = nib.load(out)
    assert back.get_data_dtype() == np.int32
    assert back.header["cal_min"] == 0 and back.header["cal_max"] == 0


def test_tsv_tables_are_tab_separated_with_bare_line_feeds(tmp_path):
    path = io.write_tsv([{"index": 0, "name": "background"}], ["index", "name"], tmp_path / "t.tsv")
    assert path.read_bytes() == b"index\tname\n0\tbackground\n"
    assert [p.name for p in tmp_path.iterdir()] == ["t.tsv"]  # no temporary file left
