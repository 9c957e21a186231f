"""Brain extraction: raw heads get the brain, stripped scans are left as they are."""

import json

import numpy as np
import pytest

from subseg.core import io
from subseg.data import synth
from subseg.preprocessing import bias, brain, contract

TINY_HEADS = {"n_subjects": 2, "seed": 7, "voxel_scale": 2.5}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """Two tiny synthetic target heads (skull, scalp, neck, noise) with their true brain masks."""
    root = tmp_path_factory.mktemp("heads")
    params = synth.CohortParams(domain="target", **TINY_HEADS)
    synth.ensure_cohort(root, params, progress=False)
    return root, params.subject_ids()


def _truth(root, sid):
    return io.load_label(root / "masks" / f"{sid}.nii.gz").data > 0


@pytest.mark.parametrize("method", ["deepbet", "ants"])
def test_extraction_recovers_the_true_mask_of_a_synthetic_head(heads, method):
    root, ids = heads
    for sid in ids:
        image = io.load_image(root / "images" / f"{sid}.nii.gz")
        assert brain.nonzero_litres(image.data, image.voxel_volume_mm3) > 5  # a head, not a brain
        found = brain.extract(image.path, image.data, image.affine, brain.Extraction(method=method))
        assert found.method == method
        assert _dice(found.mask, _truth(root, sid)) >= 0.95
        assert 1.5 < found.litres < 2.6


def test_auto_extracts_a_raw_head_and_leaves_a_stripped_scan_as_it_is(heads):
    root, ids = heads
    image = io.load_image(root / "images" / f"{ids[0]}.nii.gz")
    raw = brain.extract(image.path, image.data, image.affine)
    assert raw.method == "deepbet"
    stripped_data = np.where(_truth(root, ids[0]), image.data, 0)
    stripped = brain.extract(image.path, stripped_data, image.affine)
    assert stripped.method == brain.STRIPPED
    np.testing.assert_array_equal(stripped.mask, stripped_data != 0)
    assert "already stripped" in stripped.describe()


def test_a_stripped_scan_goes_through_preprocessing_unchanged(tiny_cohorts, tmp_path):
    """auto on a stripped scan gives exactly what subseg gave before extraction existed."""
    path = next((tiny_cohorts["source"] / "images").glob("*.nii.gz"))
    image = io.load_image(path)
    cfg = {**contract.default_preset("preprocess"), "cache_dir": str(tmp_path)}
    data, found = brain.masked(path, image.data, image.affine, cfg)
    assert found.method == brain.STRIPPED
    np.testing.assert_array_equal(data, image.data)
    no_n4 = {**cfg, "kind": "none"}
    np.testing.assert_array_equal(bias.corrected(path, image.data, image.affine, no_n4), image.data)


def test_preprocessing_zeroes_everything_outside_the_brain(heads, tmp_path):
    root, ids = heads
    path = root / "images" / f"{ids[1]}.nii.gz"
    image = io.load_image(path)
    cfg = {**contract.default_preset("preprocess"), "cache_dir": str(tmp_path)}
    corrected = bias.corrected(path, image.data, image.affine, cfg)
    mask = brain.brain_mask(path, image.data, image.affine, cfg).mask
    assert not corrected[~mask].any()
    assert np.count_nonzero(corrected) > 0.95 * mask.sum()  # N4 keeps the brain
    assert _dice(corrected != 0, _truth(root, ids[1])) >= 0.95


def test_the_mask_is_cached_by_content(heads, tmp_path, monkeypatch):
    root, ids = heads
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes((root / "images" / f"{ids[0]}.nii.gz").read_bytes())
    cfg = {"brain": {"method": "deepbet"}, "cache_dir": str(tmp_path / "cache")}
    image = io.load_image(scan)
    first = brain.brain_mask(scan, image.data, image.affine, cfg)
    entries = list((tmp_path / "cache").glob("brain-*/*/manifest.json"))
    assert len(entries) == 1 and json.loads(entries[0].read_text())["method"] == "deepbet"

    def refuse(*args, **kwargs):
        raise AssertionError("extracted again although cached")

    monkeypatch.setattr(brain, "_deepbet_mask", refuse)
    again = brain.brain_mask(scan, image.data, image.affine, cfg)
    np.testing.assert_array_equal(again.mask, first.mask)
    # Other voxels in the same file: the cached mask is not reused.
    changed = np.where(first.mask, image.data, 0).astype(np.int16)
    io.save_new(changed, image.affine, scan)
    image = io.load_image(scan)
    with pytest.raises(io.InputError, match="extracted again"):
        brain.brain_mask(scan, image.data, image.affine, cfg)


def test_an_extraction_that_finds_no_brain_is_one_line_naming_the_file(tmp_path, monkeypatch):
    data = np.random.default_rng(0).uniform(1, 100, (40, 40, 40)).astype(np.float32)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])  # 4 L of noise: not stripped
    monkeypatch.setattr(brain, "_deepbet_mask", lambda data, threshold: np.zeros(data.shape, bool))
    with pytest.raises(io.InputError, match=r"^/x/scan\.nii\.gz: brain extraction \(deepbet\)"):
        brain.extract("/x/scan.nii.gz", data, affine)

    def broken(data, threshold):
        raise RuntimeError("Traceback ...\n  deep inside torch\nRuntimeError: shape mismatch")

    monkeypatch.setattr(brain, "_deepbet_mask", broken)
    with pytest.raises(io.InputError, match="failed: RuntimeError: shape mismatch") as raised:
        brain.extract("/x/scan.nii.gz", data, affine)
    assert "\n" not in str(raised.value)


def test_settings_are_checked_and_recorded():
    assert brain.Extraction.from_config(None).method == "auto"
    assert brain.Extraction.from_config({"brain": "none"}).method == "none"
    with pytest.raises(io.InputError, match="preprocess.brain.method='bet'"):
        brain.Extraction.from_config({"brain": {"method": "bet"}})
    with pytest.raises(io.InputError, match="extractor"):
        brain.Extraction.from_config({"brain": {"extractor": "auto"}})
    preset = contract.default_preset("preprocess")
    assert brain.Extraction.from_config(preset) == brain.Extraction()
    recorded = contract.InputContract(preset, contract.default_preset("atlas")).record()
    assert recorded["preprocess"]["brain"]["method"] == "auto"
    # Another extractor than the model's may be chosen at use time (brain=...).
    chosen = contract.with_brain(preset, {"brain": "ants"})
    assert brain.Extraction.from_config(chosen).method == "ants"
    assert contract.with_brain(preset, {"brain": None}) == preset
    with pytest.raises(io.InputError):
        contract.with_brain(preset, {"brain": "robex"})


@pytest.mark.slow
def test_the_icbm_head_and_its_stripped_twin_get_the_same_input_and_prior(tmp_path):
    """The raw ICBM 2009c head T1 and its skull-stripped twin: the same network input.

    The README's "Your scans" command checks the same pair through predict.py with a trained
    model; here the two things a model's output depends on are compared directly: the
    registered atlas prior and the standardised image.
    """
    from subseg.preprocessing import atlas, transforms

    head, mask, affine = synth.load_head_template()
    head_file = io.save_new(head, affine, tmp_path / "icbm_head.nii.gz")
    stripped_file = io.save_new(np.where(mask, head, 0), affine, tmp_path / "icbm_brain.nii.gz")
    preprocess = {**contract.default_preset("preprocess"), "cache_dir": str(tmp_path / "c")}
    atlas_cfg = {**contract.default_preset("atlas"), "cache_dir": str(tmp_path / "c")}
    source = atlas.load_source(atlas_cfg)
    standardise = transforms.preprocessing(None, preprocess=preprocess)
    priors, inputs = [], []
    for path in (head_file, stripped_file):
        image = io.load_image(path)
        priors.append(atlas.subject_prior(image, atlas_cfg, source, preprocess).argmax())
        inputs.append(standardise({"image": str(path)})["image"][0].numpy())
    assert brain.brain_mask(head_file, head, affine, preprocess).method == "deepbet"
    dice = [_dice(priors[0] == c, priors[1] == c) for c in range(1, 15)]
    assert np.mean(dice) >= 0.95, dice
    both = (inputs[0] != 0) & (inputs[1] != 0)
    assert _dice(inputs[0] != 0, inputs[1] != 0) >= 0.95
    assert np.corrcoef(inputs[0][both], inputs[1][both])[0, 1] > 0.98


def test_predict_extracts_a_raw_head_and_says_what_it_did(tiny_cohorts, checkpoint, tmp_path):
    import csv

    import nibabel as nib
    from conftest import REPO
    from hydra import compose, initialize_config_dir

    from subseg.tasks import predict

    root = tiny_cohorts["target"]
    scan = root / "images" / "t001.nii.gz"
    image = io.load_image(scan)
    assert brain.nonzero_litres(image.data, image.voxel_volume_mm3) > 5  # a raw head
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "predict",
            overrides=[
                f"ckpt={checkpoint}",
                f"input={scan}",
                f"out_dir={tmp_path / 'pred'}",
                "atlas=none",
                "probabilities=true",
                f"++preprocess.cache_dir={tmp_path / 'cache'}",
            ],
        )
    predict.predict(cfg)
    with open(tmp_path / "pred" / "qc.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["extraction"] == "deepbet" and 1.5 < float(row["brain_litres"]) < 2.6
    # The network looked only inside the brain: outside it, the background is certain.
    stored = nib.load(tmp_path / "pred" / "t001_prob.nii.gz")
    looked = np.asarray(stored.dataobj)[..., 0] < 1 - 1e-6
    truth = np.asarray(nib.load(root / "masks" / "t001.nii.gz").dataobj) > 0
    # (deepbet's masks run about 5 % larger than the template's: docs/engineering.md)
    assert looked.any() and (looked & ~truth).sum() <= 0.10 * looked.sum()
    assert (tmp_path / "pred" / "t001_qc.png").is_file()
