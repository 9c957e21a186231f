import logging

import nibabel as nib
import numpy as np
import pytest
from conftest import affine_for

from subseg.core import io, labels, sides

ASEG_MIRRORED = {
    name: labels.raw_ids("aseg")[
        name.replace("right_", "@").replace("left_", "right_").replace("@", "left_")
    ]
    for name in labels.STRUCTURES
}
"""The aseg table with every right structure given its left twin's id (sides exchanged)."""


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Every test starts with no warning reported yet (they are deduplicated per process)."""
    monkeypatch.setattr(sides, "_reported", set())


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "subseg"]


def _canonical_classes(shape=(24, 16, 5)):
    """Classes on a RAS grid: each right structure at larger x (voxel axis 0) than its twin."""
    classes = np.zeros(shape, np.uint8)
    for k, (right, left) in enumerate(labels.LEFT_RIGHT_PAIRS):
        classes[14:19, 2 * k : 2 * k + 2, 1:4] = right
        classes[5:10, 2 * k : 2 * k + 2, 1:4] = left
    return classes


def _raw_with_tissues(classes, protocol="aseg"):
    raw = labels.map_to_raw(classes, protocol)
    tissues = labels.reference_tissue_ids(protocol)
    raw[19:22][raw[19:22] == 0] = tissues["right_cerebral_white_matter"]
    raw[2:5][raw[2:5] == 0] = tissues["left_cerebral_white_matter"]
    if protocol == "aseg":
        raw[:, :, 0] = 3  # left cerebral cortex: a real aseg id that is no structure of ours
    return raw


def _write(path, canonical, axcodes="RAS", zooms=(1.0, 1.2, 1.5)):
    """Write a canonical (RAS) array stored in ``axcodes`` orientation, geometry kept exact."""
    ras = nib.Nifti1Image(canonical.astype(np.int16), affine_for("RAS", zooms, (-12, -9, -3)))
    stored = ras.as_reoriented(
        nib.orientations.ornt_transform(
            nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(axcodes)
        )
    )
    assert nib.aff2axcodes(stored.affine) == tuple(axcodes)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(stored, path)
    return path


def _mirror_stored(path, out):
    """Flip the stored array along the axis that runs left↔right, keeping the header."""
    img = nib.load(path)
    axis = [c in "LR" for c in nib.aff2axcodes(img.affine)].index(True)
    data = np.flip(np.asarray(img.dataobj), axis=axis)
    nib.save(nib.Nifti1Image(data, img.affine, img.header), out)
    return out


ALL_SWAPPED = (
    "right thalamus lies left of left thalamus (and 6 more pairs) — sides exchanged? check the "
    "label mapping or the header's orientation"
)


@pytest.mark.parametrize("axcodes", ["RAS", "LAS", "LIA", "PSR"])
def test_correct_sides_do_not_warn_and_a_mirrored_array_does(tmp_path, caplog, axcodes):
    raw = _raw_with_tissues(_canonical_classes())
    path = _write(tmp_path / "lab.nii.gz", raw, axcodes)
    with caplog.at_level(logging.WARNING, logger="subseg"):
        label = io.load_label(path, protocol="aseg")
    assert _warnings(caplog) == []
    np.testing.assert_array_equal(label.data, raw)  # the fixture is what it claims to be

    mirrored = _mirror_stored(path, tmp_path / "mirrored.nii.gz")
    with caplog.at_level(logging.WARNING, logger="subseg"):
        io.load_label(mirrored, protocol="aseg")
    assert _warnings(caplog) == [f"subseg: warning: {mirrored}: {ALL_SWAPPED}"]


def test_exchanged_mapping_warns_at_load(tmp_path, caplog):
    path = _write(tmp_path / "lab.nii.gz", labels.map_to_raw(_canonical_classes(), "aseg"), "LIA")
    with caplog.at_level(logging.WARNING, logger="subseg"):
        io.load_label(path, protocol=dict(labels.raw_ids("aseg")))
    assert _warnings(caplog) == []
    with caplog.at_level(logging.WARNING, logger="subseg"):
        io.load_label(path, protocol=ASEG_MIRRORED)
    assert _warnings(caplog) == [f"subseg: warning: {path}: {ALL_SWAPPED}"]


def test_warn_sides_on_a_predicted_segmentation(tmp_path, caplog):
    classes = _canonical_classes()
    path = _write(tmp_path / "img.nii.gz", classes, "LAS")
    volume = io.load_label(path)  # a Volume on its canonical grid, as predict has
    with caplog.at_level(logging.WARNING, logger="subseg"):
        assert sides.warn_sides(volume.data, volume.affine, "seg.nii.gz") is None
    assert _warnings(caplog) == []
    # the same data against the stored (LAS) affine is the mirrored world: the affine matters
    assert len(sides.side_problems(volume.data, volume.original_affine)) == 7

    swapped = volume.data.copy()
    for cls in (labels.class_of("right_putamen"), labels.class_of("left_putamen")):
        swapped[volume.data == cls] = labels.mirror_class(cls)
    expected = (
        "right putamen lies left of left putamen — sides exchanged? check the label mapping or "
        "the header's orientation"
    )
    with caplog.at_level(logging.WARNING, logger="subseg"):
        assert sides.warn_sides(swapped, volume.affine, "seg.nii.gz") == expected
        sides.warn_sides(swapped, volume.affine, "seg.nii.gz")  # once per file and message
    assert _warnings(caplog) == [f"subseg: warning: seg.nii.gz: {expected}"]

    four = np.vectorize(labels.mirror_class)(volume.data).astype(np.uint8)
    for right, left in labels.LEFT_RIGHT_PAIRS[4:]:
        four[volume.data == right], four[volume.data == left] = right, left
    assert sides.side_problems(four, volume.affine) == [
        "right thalamus lies left of left thalamus",
        "right caudate lies left of left caudate",
        "right putamen lies left of left putamen",
        "right pallidum lies left of left pallidum",
    ]
    assert sides.side_warning(four, volume.affine).startswith(
        "right thalamus lies left of left thalamus (and 3 more pairs) — sides exchanged?"
    )


def test_absent_pairs_are_skipped():
    classes = _canonical_classes()
    right, left = labels.LEFT_RIGHT_PAIRS[0]
    one_sided = np.where(classes == left, right, classes).astype(np.uint8)
    one_sided[classes == right] = 0  # the right thalamus drawn where the left one is, alone
    assert sides.side_problems(one_sided, np.eye(4)) == []
    assert sides.side_problems(np.zeros((4, 4, 4), np.uint8), np.eye(4)) == []
    flipped = np.flip(one_sided, axis=0)
    flipped[flipped == labels.class_of("right_caudate")] = 0
    assert sides.side_problems(flipped, np.eye(4)) == [
        "right putamen lies left of left putamen",
        "right pallidum lies left of left pallidum",
        "right hippocampus lies left of left hippocampus",
        "right amygdala lies left of left amygdala",
        "right accumbens lies left of left accumbens",
    ]


def test_unknown_ids_are_warned_but_other_tissues_are_not(tmp_path, caplog):
    raw = _raw_with_tissues(_canonical_classes())
    raw[0, 0, 1:3] = [7000, -4]  # not FreeSurfer ids at all
    path = _write(tmp_path / "lab.nii.gz", raw)
    with caplog.at_level(logging.WARNING, logger="subseg"):
        io.load_label(path, protocol="aseg")
    assert _warnings(caplog) == [
        f"subseg: warning: {path}: raw ids -4, 7000 are not ids of the aseg protocol and become "
        "background — is label_ids right for this file?"
    ]
    caplog.clear()
    # An explicit mapping documents no other tissue: every unmapped id is reported.
    with caplog.at_level(logging.WARNING, logger="subseg"):
        io.load_label(path, protocol=dict(labels.raw_ids("aseg")))
    assert _warnings(caplog) == [
        f"subseg: warning: {path}: raw ids -4, 2, 3, 41, 7000 are not in the label mapping and "
        "become background — is label_ids right for this file?"
    ]


def test_missing_structures_are_warned(tmp_path, caplog):
    classes = _canonical_classes()
    classes[
        np.isin(classes, [labels.class_of("right_amygdala"), labels.class_of("left_accumbens")])
    ] = 0
    path = _write(tmp_path / "partial.nii.gz", labels.map_to_raw(classes, "miccai2012"), "LIA")
    with caplog.at_level(logging.WARNING, logger="subseg"):
        io.load_label(path, protocol="miccai2012")
        io.load_label(path, protocol="miccai2012")  # loaded again: no second warning
    assert _warnings(caplog) == [
        f"subseg: warning: {path}: no voxel of right amygdala, left accumbens (2 of the 14 "
        "structures missing) — wrong label_ids or a partial label?"
    ]
    caplog.clear()
    sides._reported.clear()
    with caplog.at_level(logging.WARNING, logger="subseg"):
        io.load_label(path, protocol="miccai2012", warn=False)
        io.load_label(path)  # no protocol: nothing to check against
    assert _warnings(caplog) == []


def test_several_warnings_are_one_line_each(tmp_path, caplog):
    classes = np.flip(_canonical_classes(), axis=0).copy()
    classes[classes == labels.class_of("left_thalamus")] = 0
    raw = labels.map_to_raw(classes, "cerebra")
    raw[0, 0, 0] = 500
    path = _write(tmp_path / "bad.nii.gz", raw, "PSR")
    with caplog.at_level(logging.WARNING, logger="subseg"):
        io.load_label(path, protocol="cerebra")
    found = _warnings(caplog)
    assert len(found) == 3
    assert all("\n" not in m and m.startswith(f"subseg: warning: {path}: ") for m in found)
    assert found[0] == (
        f"subseg: warning: {path}: raw id 500 is not an id of the cerebra protocol and becomes "
        "background — is label_ids right for this file?"
    )
    assert "no voxel of left thalamus (1 of the 14" in found[1]
    assert "right caudate lies left of left caudate (and 5 more pairs)" in found[2]


def test_synthetic_cohorts_load_without_warnings(tiny_cohorts, caplog, tmp_path):
    checked = 0
    for domain, protocol in (("source", "miccai2012"), ("target", "aseg")):
        root = tiny_cohorts[domain]
        for path in sorted((root / "labels").glob("*.nii.gz")):
            image = io.load_image(root / "images" / path.name)
            with caplog.at_level(logging.WARNING, logger="subseg"):
                io.load_label(path, image=image, protocol=protocol)
            assert _warnings(caplog) == [], path
            # positive control: the same label stored mirrored is caught (and nothing else is)
            mirrored = _mirror_stored(path, tmp_path / f"{domain}_{path.name}")
            with caplog.at_level(logging.WARNING, logger="subseg"):
                io.load_label(mirrored, image=image, protocol=protocol)
            assert _warnings(caplog) == [f"subseg: warning: {mirrored}: {ALL_SWAPPED}"]
            caplog.clear()
            checked += 1
    assert checked >= 6
