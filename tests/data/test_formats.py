"""The files people actually have: FreeSurfer .mgz, BIDS datasets and FreeSurfer subject folders.

Each test checks values, not only that files exist: the voxels of an .mgz land where they were,
a BIDS derivative's tables hold the ids and volumes its segmentations hold.
"""

import csv
import json
import shutil
from importlib import metadata

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, affine_for
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from subseg.core import cache, io, labels
from subseg.data import bids, cohort
from subseg.tasks import predict

ASEG = labels.raw_ids("aseg")


def _oblique_lia(zooms=(1.1, 0.9, 1.4)):
    """A LIA affine (FreeSurfer's conformed orientation) turned 12° about each world axis."""
    from scipy.spatial.transform import Rotation

    affine = affine_for("LIA", zooms=zooms, origin=(12.5, -30.25, 7.75))
    turn = np.eye(4)
    turn[:3, :3] = Rotation.from_euler("xyz", [12, -12, 12], degrees=True).as_matrix()
    return turn @ affine


def _scan_and_label(shape=(9, 10, 11), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(10, 100, shape).astype(np.float32)
    image[0] = 0
    label = np.zeros(shape, np.int32)
    label[2:4, 3:6, 4:9] = ASEG["left_thalamus"][0]
    label[5:8, 1:4, 2:5] = ASEG["right_putamen"][0]
    label[1, 1, 1] = 2  # white matter: a tissue outside the 14 structures
    return image, label


def _tsv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


# --- .mgz / .mgh -------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".mgz", ".mgh"])
def test_an_mgz_scan_and_label_load_and_come_back_on_their_own_grid(tmp_path, suffix):
    affine = _oblique_lia()
    image, label = _scan_and_label()
    nib.save(nib.MGHImage(image, affine), tmp_path / f"orig{suffix}")
    nib.save(nib.MGHImage(label, affine), tmp_path / f"aseg{suffix}")
    stored = nib.load(tmp_path / f"orig{suffix}")
    assert isinstance(stored, nib.MGHImage) and nib.aff2axcodes(stored.affine) != ("R", "A", "S")
    # The same voxels as NIfTI, to compare with: what subseg did before for every scan.
    nib.save(nib.Nifti1Image(image, stored.affine), tmp_path / "orig.nii.gz")
    nib.save(nib.Nifti1Image(label, stored.affine), tmp_path / "aseg.nii.gz")

    scan = io.load_image(tmp_path / f"orig{suffix}")
    twin = io.load_image(tmp_path / "orig.nii.gz")
    np.testing.assert_array_equal(scan.data, twin.data)
    np.testing.assert_array_equal(scan.affine, twin.affine)
    seg = io.load_label(tmp_path / f"aseg{suffix}", image=scan, protocol="aseg", warn=False)
    np.testing.assert_array_equal(
        seg.data, io.load_label(tmp_path / "aseg.nii.gz", image=twin, warn=False).data
    )
    classes = labels.map_to_classes(seg.data, "aseg")
    assert set(np.unique(classes)) == {
        0,
        labels.class_of("left_thalamus"),
        labels.class_of("right_putamen"),
    }

    # A map on the canonical grid goes back to the .mgz's own grid, as a NIfTI file.
    for reference, name in ((scan, "from_mgz.nii.gz"), (twin, "from_nii.nii.gz")):
        io.save_like(classes, reference, tmp_path / name)
    out, expected = nib.load(tmp_path / "from_mgz.nii.gz"), nib.load(tmp_path / "from_nii.nii.gz")
    assert isinstance(out, nib.Nifti1Image)
    assert out.shape == stored.shape == label.shape
    np.testing.assert_array_equal(out.affine, stored.affine)
    np.testing.assert_array_equal(out.affine, expected.affine)
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(stored.affine)  # orientation as stored
    written = np.asarray(out.dataobj)
    np.testing.assert_array_equal(written, labels.map_to_classes(label, "aseg"))  # voxel for voxel
    np.testing.assert_array_equal(written, np.asarray(expected.dataobj))
    assert out.header["sform_code"] == 1 and out.header.get_xyzt_units()[0] == "mm"
    assert out.header.get_data_dtype() == np.uint8


def test_a_cut_mgz_is_one_line_and_mgz_names_are_stems(tmp_path):
    image, _ = _scan_and_label()
    nib.save(nib.MGHImage(image, np.eye(4)), tmp_path / "whole.mgz")
    import gzip

    raw = gzip.decompress((tmp_path / "whole.mgz").read_bytes())
    (tmp_path / "cut.mgz").write_bytes(gzip.compress(raw[:400]))
    with pytest.raises(io.InputError, match=r"cut.mgz: cannot be read as MGH \(header claims"):
        io.load_image(tmp_path / "cut.mgz")
    (tmp_path / "junk.mgh").write_bytes(b"not a volume")
    with pytest.raises(io.InputError, match="junk.mgh: cannot be read as MGH"):
        io.load_label(tmp_path / "junk.mgh")
    assert cache.stem("/s/bert/mri/orig.mgz") == "orig" and cache.stem("x/T1.mgh") == "T1"
    assert cache.stem("a.nii.gz") == "a" and cache.stem("a.nii") == "a"
    assert cache.entry_name(tmp_path / "orig.mgz").startswith("orig-")


def test_a_folder_of_scans_takes_mgz_files(tmp_path):
    image, _ = _scan_and_label()
    for name in ("a.mgz", "b.mgh", "c_seg.mgz"):
        nib.save(nib.MGHImage(image, np.eye(4)), tmp_path / name)
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "d.nii.gz")
    found = predict.input_images(tmp_path)
    assert [p.name for p in found] == ["a.mgz", "b.mgh", "d.nii.gz"]  # c_seg: an output's name


# --- BIDS --------------------------------------------------------------------------------------


def _bids_dataset(root, scans, description=True):
    """A BIDS dataset holding ``scans`` (relative path → source NIfTI) and decoys around them."""
    if description:
        root.mkdir(parents=True, exist_ok=True)
        (root / "dataset_description.json").write_text(
            json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0", "DatasetDOI": "10.1/tiny"})
        )
    for relative, source in scans.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        img = nib.load(source)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header), root / relative)
    # Not scans: another modality, a derivative, a hidden copy, a sidecar.
    first = next(iter(scans.values()))
    for decoy in (
        "sub-01/anat/sub-01_T2w.nii.gz",
        "derivatives/other/sub-01/anat/sub-01_T1w.nii.gz",
        "sub-01/anat/._sub-01_T1w.nii.gz",
    ):
        (root / decoy).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(first, root / decoy)
    (root / "sub-01" / "anat" / "sub-01_T1w.json").write_text("{}")
    return root


def test_bids_t1w_scans_are_found_and_named_as_derivatives(tmp_path):
    source = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(_scan_and_label()[0], np.eye(4)), source)
    root = _bids_dataset(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_T1w.nii.gz": source,
            "sub-02/ses-1/anat/sub-02_ses-1_acq-fast_run-1_T1w.nii": source,
        },
        description=False,  # recognised by its sub-* folders alone
    )
    assert bids.is_dataset(root) and not bids.is_dataset(root / "sub-01")
    found = bids.find_t1w(root)
    assert [p.relative_to(root).as_posix() for p in found] == [
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-02/ses-1/anat/sub-02_ses-1_acq-fast_run-1_T1w.nii",
    ]
    assert predict.input_images(root) == found
    named = bids.derivative_names(root, found[1], tmp_path / "out")
    assert named.scan == "sub-02_ses-1_acq-fast_run-1_T1w"
    assert named.dseg == (
        tmp_path / "out/sub-02/ses-1/anat/sub-02_ses-1_acq-fast_run-1_desc-subseg_dseg.nii.gz"
    )
    assert named.probseg.name == "sub-02_ses-1_acq-fast_run-1_desc-subseg_probseg.nii.gz"
    assert named.volumes.name == "sub-02_ses-1_acq-fast_run-1_desc-subseg_volumes.tsv"
    assert named.qc == tmp_path / "out/sub-02/figures" / named.dseg.name.replace(".nii.gz", ".png")

    # A scan filed under another subject's folder would write into that folder: refused.
    shutil.copy(source, root / "sub-01" / "anat" / "sub-03_T1w.nii.gz")
    with pytest.raises(io.InputError, match=r"sub-03_T1w.nii.gz: its name does not hold sub-01"):
        bids.find_t1w(root)
    (root / "sub-01" / "anat" / "sub-03_T1w.nii.gz").unlink()
    shutil.rmtree(root / "sub-01")
    shutil.rmtree(root / "sub-02")
    (root / "sub-01").mkdir()
    with pytest.raises(io.InputError, match=r"ds: a BIDS dataset with no T1w scan"):
        predict.input_images(root)


def test_one_subject_of_a_bids_dataset_is_named_as_the_dataset_names_it(tmp_path):
    """input=<bids>/sub-02: its scans only, outputs in the same derivative tree as the whole
    dataset's, and the dataset as the derivative's source."""
    source = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(_scan_and_label()[0], np.eye(4)), source)
    root = _bids_dataset(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_T1w.nii.gz": source,
            "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz": source,
            "sub-02/ses-2/anat/sub-02_ses-2_T1w.nii.gz": source,
        },
    )
    shutil.copy(source, root / "sub-01" / "anat" / "sub-03_T1w.nii.gz")  # misfiled, not ours
    subject = root / "sub-02"
    files = predict.input_images(str(subject))
    assert [f.relative_to(root).as_posix() for f in files] == [
        "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
        "sub-02/ses-2/anat/sub-02_ses-2_T1w.nii.gz",
    ]
    out = tmp_path / "out"
    named = predict.scan_outputs(str(subject), out, files[0])
    assert named.seg == out / "sub-02/ses-1/anat/sub-02_ses-1_desc-subseg_dseg.nii.gz"
    assert named.seg == predict.scan_outputs(str(root), out, files[0]).seg
    assert predict.bids_roots([str(subject), str(root / "sub-01")]) == [root]
    (root / "sub-04").mkdir()
    with pytest.raises(io.InputError, match=r"sub-04: a BIDS subject with no T1w scan"):
        predict.input_images(str(root / "sub-04"))


def test_the_output_manifest_keys_nested_files_by_their_path_in_the_folder(tmp_path):
    from subseg.core.output_manifest import OutputManifest

    out = tmp_path / "out"
    nested = out / "sub-01" / "anat" / "sub-01_desc-subseg_dseg.nii.gz"
    twin = out / "sub-02" / "anat" / nested.name.replace("01", "02")
    manifest = OutputManifest(out)
    for path in (nested, twin):
        with io.atomic_path(path) as tmp:
            tmp.write_bytes(b"ours")
    manifest.claim(nested)
    files = json.loads((out / ".subseg-outputs.json").read_text())["files"]
    assert files == {"sub-01/anat/sub-01_desc-subseg_dseg.nii.gz": cache.file_digest(nested)}
    assert manifest.owns(nested) and not manifest.owns(twin)  # same content, never claimed
    # The same name in another folder is another file: not ours because its name is listed.
    elsewhere = out / nested.name
    elsewhere.write_bytes(b"ours")
    assert not OutputManifest(out).owns(elsewhere)
    # A folder linked from outside is not the folder's: its files are never ours.
    outside = tmp_path / "outside"
    outside.mkdir()
    (out / "linked").symlink_to(outside)
    with pytest.raises(ValueError, match="outside"):
        manifest.claim(out / "linked" / "x.png")
    (outside / "x.png").write_bytes(b"theirs")
    assert not manifest.owns(out / "linked" / "x.png")
    nested.write_bytes(b"corrected by hand")
    with pytest.raises(io.InputError, match="sub-01_desc-subseg_dseg.nii.gz: .* was edited since"):
        OutputManifest(out).check_writable([nested])
    manifest.remove(twin)
    assert twin.exists()  # not ours: stays
    nested.write_bytes(b"ours")
    OutputManifest(out).remove(nested)
    assert not nested.exists() and OutputManifest(out).files == {}


def _predict(out_dir, checkpoint, spec, *more):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        options = [f"ckpt={checkpoint}", f"input={spec}", f"out_dir={out_dir}", *more]
        return compose("predict", overrides=["atlas=none", *options])


@pytest.mark.slow
def test_a_bids_dataset_gives_a_bids_derivatives_dataset(tiny_cohorts, checkpoint, tmp_path):
    images = tiny_cohorts["source"] / "images"  # skull-stripped: no extraction to wait for
    root = _bids_dataset(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_T1w.nii.gz": images / "s000.nii.gz",
            "sub-02/ses-1/anat/sub-02_ses-1_acq-fast_T1w.nii": images / "s001.nii.gz",
        },
    )
    out = root / "derivatives" / "subseg"  # where BIDS keeps derivatives: inside the dataset
    rows = predict.predict(_predict(out, checkpoint, root, "raw_ids=aseg", "probabilities=true"))
    scans = {  # the scan's name in volumes.csv: where its outputs are
        "sub-01_T1w": "sub-01/anat/sub-01",
        "sub-02_ses-1_acq-fast_T1w": "sub-02/ses-1/anat/sub-02_ses-1_acq-fast",
    }
    assert {r["subject"] for r in rows} == set(scans)
    made = {
        p.relative_to(out).as_posix()
        for p in out.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }
    per_scan = ("dseg.nii.gz", "probseg.nii.gz", "volumes.tsv")
    assert made == {
        "dataset_description.json",
        "dseg.tsv",
        "volumes.csv",
        "qc.csv",
        *(f"{prefix}_desc-subseg_{kind}" for prefix in scans.values() for kind in per_scan),
        "sub-01/figures/sub-01_desc-subseg_dseg.png",
        "sub-02/figures/sub-02_ses-1_acq-fast_desc-subseg_dseg.png",
    }

    description = json.loads((out / "dataset_description.json").read_text())
    assert {"Name", "BIDSVersion", "DatasetType", "GeneratedBy"} <= set(description)
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "subseg"
    assert description["GeneratedBy"][0]["Version"] == metadata.version("subseg")
    assert description["SourceDatasets"] == [{"URL": root.resolve().as_uri(), "DOI": "10.1/tiny"}]

    lookup = _tsv(out / "dseg.tsv")
    assert [r["name"] for r in lookup] == ["background", *labels.STRUCTURES]
    assert [int(r["index"]) for r in lookup] == [0, *(ids[0] for ids in ASEG.values())]
    assert "\r" not in (out / "dseg.tsv").read_text()
    index = {int(r["index"]): r["name"] for r in lookup}

    with open(out / "volumes.csv", newline="") as f:
        table = list(csv.DictReader(f))
    for name, prefix in scans.items():
        scan = next(root.rglob(f"{name}.nii*"))
        seg = nib.load(out / f"{prefix}_desc-subseg_dseg.nii.gz")
        assert seg.shape == nib.load(scan).shape
        np.testing.assert_array_equal(seg.affine, nib.load(scan).affine)
        values = np.asarray(seg.dataobj)
        assert set(np.unique(values).tolist()) <= set(index)  # every id is in dseg.tsv
        prob = nib.load(out / f"{prefix}_desc-subseg_probseg.nii.gz")
        assert prob.shape == (*seg.shape, len(lookup))  # one volume per row of dseg.tsv
        voxel = abs(np.linalg.det(seg.affine[:3, :3]))
        own = _tsv(out / f"{prefix}_desc-subseg_volumes.tsv")
        assert [r["name"] for r in own] == list(labels.STRUCTURES)
        whole = {r["structure"]: r for r in table if r["subject"] == name}
        for row in own:
            assert index[int(row["index"])] == row["name"]
            expected = np.count_nonzero(values == int(row["index"])) * voxel
            assert float(row["volume_mm3"]) == pytest.approx(expected)
            assert float(whole[row["name"]]["volume_mm3"]) == pytest.approx(expected)
            assert float(whole[row["name"]]["qc"]) == pytest.approx(float(row["qc"]))

    # The manifest lists the nested files by their path in out_dir, as written.
    manifest = json.loads((out / ".subseg-outputs.json").read_text())["files"]
    assert made == set(manifest)
    assert all(cache.file_digest(out / k) == digest for k, digest in manifest.items())

    # Its own files are replaced by a rerun; a segmentation corrected in the tree is not.
    dseg = out / "sub-01/anat/sub-01_desc-subseg_dseg.nii.gz"
    predict.predict(_predict(out, checkpoint, root, "raw_ids=aseg"))
    assert not (out / "sub-01/anat/sub-01_desc-subseg_probseg.nii.gz").exists()  # not asked
    img = nib.load(dseg)
    edited = np.asarray(img.dataobj).copy()
    edited[0, 0, 0] = ASEG["left_thalamus"][0]
    nib.save(nib.Nifti1Image(edited, img.affine, img.header), dseg)
    kept = dseg.read_bytes()
    edited_line = "sub-01_desc-subseg_dseg.nii.gz: already exists and was edited since subseg"
    with pytest.raises(io.InputError, match=edited_line):
        predict.predict(_predict(out, checkpoint, root))
    assert dseg.read_bytes() == kept

    # dseg.tsv is never rewritten with other ids while segmentations holding the old ones stay.
    dseg.unlink()
    other = _bids_dataset(
        tmp_path / "other", {"sub-01/anat/sub-01_T1w.nii.gz": images / "s000.nii.gz"}
    )
    before = (out / "dseg.tsv").read_bytes()
    refused = (
        r"dseg.tsv: lists other label ids than this batch writes \(raw_ids=null\), and 1 "
        r"segmentation\(s\) here hold them \(first: sub-02/ses-1/anat/sub-02_ses-1_acq-fast_desc"
    )
    with pytest.raises(io.InputError, match=refused):
        predict.predict(_predict(out, checkpoint, other))
    assert (out / "dseg.tsv").read_bytes() == before


def test_someone_elses_file_in_the_derivative_tree_is_never_replaced(
    tiny_cohorts, checkpoint, tmp_path
):
    images = tiny_cohorts["target"] / "images"
    root = _bids_dataset(tmp_path / "ds", {"sub-01/anat/sub-01_T1w.nii.gz": images / "t000.nii.gz"})
    out = tmp_path / "derivatives"
    theirs = out / "sub-01" / "figures" / "sub-01_desc-subseg_dseg.png"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"the user's own figure")
    foreign = "sub-01_desc-subseg_dseg.png: already exists and was not written by subseg"
    with pytest.raises(io.InputError, match=foreign):
        predict.predict(_predict(out, checkpoint, root))
    assert theirs.read_bytes() == b"the user's own figure"
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["sub-01_desc-subseg_dseg.png"]


# --- FreeSurfer --------------------------------------------------------------------------------


def _subjects_dir(folder, tiny_cohorts, ids):
    """FreeSurfer subjects made of the tiny source cohort's (skull-stripped) scans and labels:
    <id>/mri/orig.mgz and aseg.mgz, stored LIA as recon-all stores them, with aseg ids."""
    from nibabel import orientations

    source = tiny_cohorts["source"]
    for sid in ids:
        (folder / sid / "mri").mkdir(parents=True)
        for name, kind in (("orig", "images"), ("aseg", "labels")):
            img = nib.load(source / kind / f"{sid}.nii.gz")
            to_lia = orientations.ornt_transform(
                orientations.io_orientation(img.affine), orientations.axcodes2ornt("LIA")
            )
            img = img.as_reoriented(to_lia)
            data = np.asarray(img.dataobj)
            if kind == "labels":  # the source's Neuromorphometrics ids as FreeSurfer's
                data = labels.map_to_raw(labels.map_to_classes(data, "miccai2012"), "aseg")
            data = data.astype(np.float32 if kind == "images" else np.int32)
            nib.save(nib.MGHImage(data, img.affine), folder / sid / "mri" / f"{name}.mgz")
    return folder


def test_a_freesurfer_subject_folder_is_segmented_and_named_after_it(
    tiny_cohorts, checkpoint, tmp_path
):
    subjects = _subjects_dir(tmp_path / "subjects", tiny_cohorts, ["s000", "s001"])
    out = tmp_path / "out"
    spec = f"[{subjects / 's000'},{subjects / 's001'}]"  # two orig.mgz, two names
    rows = predict.predict(_predict(out, checkpoint, spec))
    assert {r["subject"] for r in rows} == {"s000", "s001"}
    for sid in ("s000", "s001"):
        orig = nib.load(subjects / sid / "mri" / "orig.mgz")
        seg = nib.load(out / f"{sid}_seg.nii.gz")
        assert seg.shape == orig.shape and nib.aff2axcodes(seg.affine) == ("L", "I", "A")
        np.testing.assert_array_equal(seg.affine, orig.affine)
        assert (out / f"{sid}_qc.png").is_file()
    # The same subject name from two SUBJECTS_DIRs: their outputs would overwrite each other.
    twin = _subjects_dir(tmp_path / "elsewhere", tiny_cohorts, ["s000"])
    with pytest.raises(io.InputError, match=r"orig.mgz: has the same name as .*s000/mri/orig.mgz"):
        predict.predict(_predict(out, checkpoint, f"[{subjects / 's000'},{twin / 's000'}]"))


def test_a_subjects_dir_is_its_subjects(tiny_cohorts, tmp_path):
    """input=$SUBJECTS_DIR: each subject's orig.mgz, named after its folder; not fsaverage."""
    subjects = _subjects_dir(tmp_path / "subjects", tiny_cohorts, ["s001", "s000"])
    shutil.copytree(subjects / "s000", subjects / "fsaverage")  # recon-all links it in
    (subjects / "notes").mkdir()  # a folder that is not a subject
    files = predict.input_images(str(subjects))
    assert files == [subjects / sid / "mri" / "orig.mgz" for sid in ("s000", "s001")]
    outputs = [predict.scan_outputs(str(subjects), tmp_path / "out", f) for f in files]
    assert [o.name for o in outputs] == ["s000", "s001"]
    assert outputs[0].seg == tmp_path / "out" / "s000_seg.nii.gz"
    # fMRIPrep's freesurfer/ names its subjects sub-X: a SUBJECTS_DIR still, not a BIDS dataset.
    fmriprep = _subjects_dir(tmp_path / "freesurfer", tiny_cohorts, ["s000"])
    (fmriprep / "s000").rename(fmriprep / "sub-01")
    files = predict.input_images(str(fmriprep))
    assert files == [fmriprep / "sub-01" / "mri" / "orig.mgz"]
    assert predict.bids_roots([str(fmriprep)]) == []
    assert predict.scan_outputs(str(fmriprep), tmp_path, files[0]).name == "sub-01"
    with pytest.raises(io.InputError, match=r"empty: no \.nii.*nor FreeSurfer subject folders"):
        (tmp_path / "empty").mkdir()
        predict.input_images(str(tmp_path / "empty"))


def _dataset(name, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("finetune", overrides=[f"dataset={name}", *overrides])
    return OmegaConf.to_container(cfg.dataset, resolve=True)


def test_freesurfer_and_bids_cohorts_are_listed(tiny_cohorts, tmp_path):
    target = tiny_cohorts["target"]
    subjects = _subjects_dir(tmp_path / "subjects", tiny_cohorts, ["s000", "s001"])
    (subjects / "fsaverage" / "surf").mkdir(parents=True)  # no mri/orig.mgz: not a subject
    listed = cohort.list_subjects(_dataset("freesurfer", f"dataset.root={subjects}"))
    assert [(s.id, s.image.name, s.label.name) for s in listed] == [
        ("s000", "orig.mgz", "aseg.mgz"),
        ("s001", "orig.mgz", "aseg.mgz"),
    ]

    root = _bids_dataset(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_T1w.nii.gz": target / "images" / "t000.nii.gz",
            "sub-02/ses-1/anat/sub-02_ses-1_acq-fast_T1w.nii": target / "images" / "t001.nii.gz",
            "sub-03/anat/sub-03_T1w.nii.gz": target / "images" / "t002.nii.gz",  # unlabelled
            "derivatives/manual/sub-01/anat/sub-01_dseg.nii.gz": target / "labels" / "t000.nii.gz",
            "derivatives/manual/sub-02/ses-1/anat/sub-02_ses-1_dseg.nii.gz": (
                target / "labels" / "t001.nii.gz"
            ),
        },
    )
    dataset = _dataset("bids", f"dataset.root={root}")
    listed = cohort.list_subjects(dataset, require_labels=False)
    assert [(s.id, s.image.relative_to(root).as_posix()) for s in listed] == [
        ("01", "sub-01/anat/sub-01_T1w.nii.gz"),
        ("02", "sub-02/ses-1/anat/sub-02_ses-1_acq-fast_T1w.nii"),
        ("03", "sub-03/anat/sub-03_T1w.nii.gz"),
    ]
    assert [s.label and s.label.relative_to(root).as_posix() for s in listed] == [
        "derivatives/manual/sub-01/anat/sub-01_dseg.nii.gz",
        "derivatives/manual/sub-02/ses-1/anat/sub-02_ses-1_dseg.nii.gz",
        None,
    ]
    with pytest.raises(io.InputError, match="label of subject '03' not found"):
        cohort.list_subjects(dataset)
    # A second session of subject 02: which one is meant is the user's to say.
    shutil.copytree(root / "sub-02" / "ses-1", root / "sub-02" / "ses-2")
    (root / "sub-02/ses-2/anat/sub-02_ses-1_acq-fast_T1w.nii").rename(
        root / "sub-02/ses-2/anat/sub-02_ses-2_acq-fast_T1w.nii"
    )
    with pytest.raises(io.InputError, match=r"2 files of subject '02' match .*dataset.session="):
        cohort.list_subjects(dataset, require_labels=False)
    chosen = cohort.list_subjects(
        _dataset("bids", f"dataset.root={root}", "dataset.session=1"), require_labels=False
    )
    assert chosen[1].image.name == "sub-02_ses-1_acq-fast_T1w.nii"


@pytest.mark.slow
def test_a_freesurfer_subjects_dir_fine_tunes(tiny_cohorts, checkpoint, tmp_path):
    from subseg.tasks import finetune

    source = tiny_cohorts["source"]
    subjects = _subjects_dir(tmp_path / "subjects", tiny_cohorts, ["s000", "s001", "s002"])
    overrides = [
        "dataset=freesurfer",
        f"dataset.root={subjects}",
        f"source_run={checkpoint}",
        "atlas=none",
        "preprocess=none",
        "target.n_images=1",
        "sampling.samples_per_subject=300",
        "trainer.max_epochs=1",
        "sampling.batch_size=64",
        "logger=csv",
        f"paths.output_dir={tmp_path / 'out'}",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("finetune", overrides=overrides)
    run = tmp_path / "out" / "finetune" / "fs"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    summary = finetune.finetune(cfg, run)
    splits = json.loads((run / "splits.json").read_text())
    assert summary["method"] == "tl1" and summary["n_subjects"] == 2
    assert len(splits["train"]) == 1 and sorted(splits["train"] + splits["test"]) == [
        "s000",
        "s001",
        "s002",
    ]
    # The reference volumes come from aseg.mgz read with aseg ids, on orig.mgz's grid: those of
    # the cohort's own NIfTI labels (Neuromorphometrics ids).
    with open(run / "metrics.csv", newline="") as f:
        scored = list(csv.DictReader(f))
    assert {r["subject"] for r in scored} == set(splits["test"])
    for row in scored:
        img = nib.load(source / "labels" / f"{row['subject']}.nii.gz")
        classes = labels.map_to_classes(np.asarray(img.dataobj), "miccai2012")
        voxel = abs(np.linalg.det(img.affine[:3, :3]))
        expected = np.count_nonzero(classes == labels.class_of(row["structure"])) * voxel
        assert float(row["vol_ref_mm3"]) == pytest.approx(expected, rel=1e-5)
