import dataclasses
import os
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, affine_for, write_nifti
from omegaconf import OmegaConf
from scipy import ndimage

from subseg.core import antspy, cache, io, labels
from subseg.data import cohort
from subseg.preprocessing import atlas


def _atlas_cfg(name, cache_dir):
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "atlas" / f"{name}.yaml"))
    cfg["cache_dir"] = str(cache_dir)
    return cfg


def _subject(root, sid, protocol):
    image = io.load_image(root / "images" / f"{sid}.nii.gz")
    label = io.load_label(root / "labels" / f"{sid}.nii.gz", image=image, protocol=protocol)
    return image, labels.map_to_classes(label.data, protocol)


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def ho_run(tiny_cohorts, tmp_path_factory):
    """A Harvard-Oxford prior of a small synthetic source subject, computed once (cached)."""
    cfg = _atlas_cfg("harvard_oxford", tmp_path_factory.mktemp("cache"))
    image, truth = _subject(tiny_cohorts["source"], "s000", "miccai2012")
    source = atlas.load_source(cfg)
    return cfg, source, image, truth, atlas.subject_prior(image, cfg, source)


def test_ants_images_match_the_files(tmp_path):
    ants = antspy.load(0)
    affine = affine_for("LIA", zooms=(0.9375, 0.9375, 1.5), origin=(80.0, 90.0, -100.0))
    data = np.random.default_rng(0).uniform(1, 2, (6, 7, 8)).astype(np.float32)
    path = write_nifti(tmp_path / "lia.nii.gz", data, affine)
    from_file = ants.image_read(str(path))
    ours = antspy.image(ants, data, affine)
    np.testing.assert_allclose(ours.origin, from_file.origin, atol=1e-5)
    np.testing.assert_allclose(ours.spacing, from_file.spacing, atol=1e-6)
    np.testing.assert_allclose(ours.direction, from_file.direction, atol=1e-6)
    np.testing.assert_array_equal(ours.numpy(), from_file.numpy())
    # The canonical (RAS) copy covers the same physical space.
    vol = io.load_image(path)
    canon = antspy.image(ants, vol.data, vol.affine)
    corner = ants.transform_index_to_physical_point(canon, (0, 0, 0))
    ras = vol.affine @ np.array([0, 0, 0, 1.0])
    np.testing.assert_allclose(corner, [-ras[0], -ras[1], ras[2]], atol=1e-5)


def test_roi_is_the_iterated_six_connected_dilation():
    rng = np.random.default_rng(1)
    support = np.zeros((40, 40, 40), bool)
    support[tuple(rng.integers(12, 28, (3, 6)))] = True
    regions = atlas._regions(support, 15, 5)
    cross = ndimage.generate_binary_structure(3, 1)
    np.testing.assert_array_equal(regions > 0, ndimage.binary_dilation(support, cross, 15))
    np.testing.assert_array_equal(regions > 1, ndimage.binary_dilation(support, cross, 5))


def test_empty_prior_is_an_error(tmp_path):
    image = io.load_image(write_nifti(tmp_path / "b.nii.gz", np.ones((5, 5, 5)) * np.arange(5)))
    with pytest.raises(io.InputError, match="b.nii.gz: the registered atlas prior is empty"):
        atlas._prior_from_structures(np.zeros((14, 5, 5, 5)), image, 15, 5)


@pytest.mark.slow
def test_harvard_oxford_prior_matches_the_true_labels(ho_run):
    _, _, image, truth, prior = ho_run
    argmax = prior.argmax()
    assert argmax.shape == image.data.shape == prior.roi.shape
    dice = [_dice(argmax == c, truth == c) for c in range(1, labels.NUM_CLASSES)]
    assert np.mean(dice) >= 0.70, dice
    for c in range(1, labels.NUM_CLASSES):
        assert prior.roi[truth == c].mean() >= 0.995, labels.STRUCTURES[c - 1]
    probs = prior.probabilities()
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert probs.shape[0] == 15 and probs.min() >= 0


@pytest.mark.slow
def test_channels_resampled_in_the_box_equal_the_whole_grid(ho_run, monkeypatch, tmp_path):
    # register_prior resamples the 14 channels only inside the warped union's box; the prior
    # must equal resampling every channel onto the whole grid with the same transforms.
    cfg, source, image, _, _ = ho_run
    settings = dataclasses.replace(atlas.registration_of(cfg), resolution_mm=6.0)
    ants = antspy.load(settings.threads)
    fixed = antspy.image(ants, image.data, image.affine)
    moving = antspy.image(ants, source.template, source.template_affine)
    transforms = atlas._register(ants, fixed, moving, settings, tmp_path)
    monkeypatch.setattr(atlas, "_register", lambda *args: transforms)
    boxed = atlas.register_prior(image, source, settings)
    # The atlas file's whole grid, not the structures' support the loaded atlas keeps.
    volumes = [cfg["volumes"][name] for name in labels.STRUCTURES]
    probabilities = nib.load(atlas.package_file(cfg["probabilities"]))
    whole = np.stack(
        [
            ants.apply_transforms(
                fixed,
                antspy.image(ants, probabilities.dataobj[..., v] / 100.0, probabilities.affine),
                transforms,
                interpolator="linear",
            ).numpy()
            for v in volumes
        ]
    )
    reference = atlas._prior_from_structures(whole, image, 15, 5)
    assert boxed.box == reference.box
    np.testing.assert_array_equal(boxed.regions, reference.regions)
    np.testing.assert_allclose(boxed.structures, reference.structures, atol=1.5 / atlas.QUANTUM)


def test_a_map_warped_on_its_support_equals_the_whole_grid_warped(tmp_path):
    ants = antspy.load(0)
    affine = affine_for("RAS", zooms=(1.0, 1.0, 1.0), origin=(-20.0, -24.0, -16.0))
    grid = np.zeros((40, 48, 32), np.float32)
    rng = np.random.default_rng(0)
    grid[12:19, 20:31, 9:15] = rng.uniform(0.0, 1.0, (7, 11, 6)).astype(np.float32)
    grid[14, 25, 11] = 0.0  # a zero inside the support stays read
    transform = ants.create_ants_transform(
        transform_type="AffineTransform",
        matrix=np.array([[0.97, 0.05, 0.0], [-0.04, 1.02, 0.03], [0.0, -0.02, 0.99]]),
        translation=(1.3, -0.7, 0.4),
    )
    path = str(tmp_path / "affine.mat")
    ants.write_transform(transform, path)
    target = antspy.image(ants, np.zeros((50, 45, 40), np.float32), affine_for("LIA"))
    whole = ants.apply_transforms(
        target, antspy.image(ants, grid, affine), [path], interpolator="linear"
    ).numpy()
    assert whole.max() > 0.5
    np.testing.assert_array_equal(atlas.warp_support(ants, grid, affine, target, [path]), whole)
    empty = atlas.warp_support(ants, np.zeros_like(grid), affine, target, [path])
    assert empty.shape == whole.shape and not empty.any()


def test_loaded_atlas_keeps_every_nonzero_voxel_of_the_file(ho_run):
    cfg, source, _, _, _ = ho_run
    probabilities = nib.load(atlas.package_file(cfg["probabilities"]))
    # The loaded structures sit on the file's own voxels, shifted by a whole number of them.
    shift = np.linalg.solve(probabilities.affine, source.structures_affine)[:3, 3]
    np.testing.assert_allclose(shift, np.round(shift), atol=1e-6)
    start = np.round(shift).astype(int)
    box = tuple(slice(s, s + n) for s, n in zip(start, source.structures.shape[1:], strict=True))
    for name, channel in zip(labels.STRUCTURES, source.structures, strict=True):
        whole = np.asarray(probabilities.dataobj[..., cfg["volumes"][name]]) / 100.0
        np.testing.assert_allclose(channel, whole[box], atol=1e-6, err_msg=name)
        assert whole.sum() == pytest.approx(float(channel.sum()), rel=1e-5), name


@pytest.mark.slow
def test_cache_is_reused_and_a_damaged_file_is_rebuilt(ho_run, monkeypatch):
    cfg, source, image, _, prior = ho_run
    calls = []
    original = atlas.register_prior

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(atlas, "register_prior", counting)
    start = time.perf_counter()
    again = atlas.subject_prior(image, cfg, source)
    assert time.perf_counter() - start < 1.0 and not calls  # read from the cache
    np.testing.assert_array_equal(again.structures, prior.structures)
    np.testing.assert_array_equal(again.regions, prior.regions)
    assert again.box == prior.box

    folder, _ = atlas.cache_folder(image.path, cfg, source)
    damaged = folder / "structures.nii.gz"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    rebuilt = atlas.subject_prior(image, cfg, source)
    assert calls == [1]
    # Multi-threaded ANTs is reproducible up to a few voxels' interpolation weights.
    assert rebuilt.structures.shape == prior.structures.shape
    assert np.abs(rebuilt.structures - prior.structures).mean() < 1e-3
    assert atlas.subject_prior(image, cfg, source).box == rebuilt.box and calls == [1]

    other = dict(cfg, roi_distance=10)  # other settings: another cache entry
    assert atlas.cache_folder(image.path, other, source)[0] != folder


@pytest.mark.slow
def test_every_atlas_kind_through_one_interface(ho_run, tiny_cohorts, tmp_path):
    image, truth = _subject(tiny_cohorts["target"], "t000", "aseg")
    # The target scans are raw heads: this test is about the atlases, so strip it with its truth.
    mask = io.load_label(tiny_cohorts["target"] / "masks" / "t000.nii.gz", image=image).data > 0
    image = dataclasses.replace(image, data=np.where(mask, image.data, 0).astype(np.float32))
    training = cohort.list_subjects(
        {
            "name": "tiny",
            "root": str(tiny_cohorts["source"]),
            "image": "images/{id}.nii.gz",
            "label": "labels/{id}.nii.gz",
        }
    )[:2]
    priors = {}
    for name in ("none", "source_labels", "harvard_oxford"):
        cfg = _atlas_cfg(name, tmp_path / "cache")
        if "registration" in cfg:  # coarser than the default: this test is about the interface
            cfg["registration"]["iterations"] = [40, 20, 0]
        source = atlas.load_source(
            cfg,
            source_subjects=training,
            protocol="miccai2012",
            build_dir=tmp_path / "source_atlas",
        )
        priors[name] = atlas.subject_prior(image, cfg, source)
    for name, prior in priors.items():
        assert prior.shape == image.data.shape, name
        assert prior.probabilities().shape == (15, *prior.regions.shape), name
        assert prior.roi[truth > 0].mean() >= 0.995, name

    none = priors["none"]
    np.testing.assert_array_equal(none.roi, image.data != 0)
    assert not none.argmax().any() and np.all(none.probabilities()[0] == 1)
    learned = priors["source_labels"]
    mean_dice = np.mean([_dice(learned.argmax() == c, truth == c) for c in range(1, 15)])
    assert mean_dice > 0.6, mean_dice

    saved = tmp_path / "source_atlas"
    assert {p.name for p in saved.iterdir()} >= {
        "structures.nii.gz",
        "template.nii.gz",
        "manifest.json",
    }
    reloaded = atlas.load_source({**_atlas_cfg("source_labels", tmp_path), "path": str(saved)})
    assert reloaded.structures.shape[0] == 14 and reloaded.identity.startswith("source_labels:")
    (saved / "template.nii.gz").write_bytes(b"broken")
    with pytest.raises(io.InputError, match="not a complete source_labels atlas"):
        atlas.load_saved_atlas(saved)


@pytest.mark.slow
def test_quality_check_png(ho_run, tmp_path):
    _, _, image, _, prior = ho_run
    out = atlas.save_prior_qc(image, prior, tmp_path / "qc.png")
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"


def test_itk_threads_follow_the_setting():
    code = (
        "import os, sys; from subseg.core import antspy; "
        "assert 'ants' not in sys.modules; antspy.load(1); "
        "print(os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS'], 'ants' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["1", "True"], out.stderr


def test_unwritable_cache_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(io.InputError, match="cannot write the cache here.*atlas.cache_dir"):
        cache.publish(blocker / "entry", "k", {}, {})


@pytest.mark.slow
def test_priors_registered_in_parallel_land_in_the_cache(tiny_cohorts, tmp_path, monkeypatch):
    cfg = _atlas_cfg("harvard_oxford", tmp_path / "cache")
    source = atlas.load_source(cfg)
    root = tiny_cohorts["target"]
    paths = [root / "images" / f"t00{i}.nii.gz" for i in range(2)]
    # Raw heads: brain extraction (no N4) before registration, in the workers as here.
    preprocess = {"kind": "none", "cache_dir": str(tmp_path / "cache")}
    assert atlas.ensure_priors(paths, cfg, source, 2, False, preprocess) == 2
    assert atlas.ensure_priors(paths, cfg, source, 2, False, preprocess) == 0

    def no_registration(*args, **kwargs):
        raise AssertionError("the prior should come from the cache")

    monkeypatch.setattr(atlas, "register_prior", no_registration)
    for index in range(len(paths)):
        image, truth = _subject(root, f"t00{index}", "aseg")
        prior = atlas.subject_prior(image, cfg, source, preprocess)
        dice = [_dice(prior.argmax() == c, truth == c) for c in range(1, labels.NUM_CLASSES)]
        assert np.mean(dice) >= 0.5, dice
