import json

import nibabel as nib
import numpy as np
import pytest

from subseg.core import labels
from subseg.data import synth

TINY = dict(n_subjects=3, seed=0, voxel_scale=2.5)


def _class_and_tissue_means(image, raw, protocol):
    classes = labels.map_to_classes(raw, protocol)
    tissues = labels.reference_tissue_ids(protocol)
    ventricles = np.isin(
        raw, [tissues["right_lateral_ventricle"], tissues["left_lateral_ventricle"]]
    )
    white = np.isin(
        raw, [tissues["right_cerebral_white_matter"], tissues["left_cerebral_white_matter"]]
    )
    grey = np.isin(
        classes,
        [
            labels.class_of(f"{s}_{n}")
            for s in ("right", "left")
            for n in ("thalamus", "caudate", "putamen")
        ],
    )
    return image[ventricles].mean(), image[grey].mean(), image[white].mean()


def test_generation_is_deterministic_per_seed():
    params = synth.CohortParams(domain="target", **TINY)
    a, b = synth.generate_subject(params, 1), synth.generate_subject(params, 1)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    other_seed = synth.CohortParams(domain="target", **{**TINY, "seed": 5})
    c = synth.generate_subject(other_seed, 1)
    assert not np.array_equal(a["image"], c["image"])
    d = synth.generate_subject(params, 2)
    assert not np.array_equal(a["labels"], d["labels"])


@pytest.mark.parametrize("domain", ["source", "target"])
def test_labels_stay_aligned_with_the_image(tiny_cohorts, domain):
    protocol = synth.DOMAINS[domain].protocol
    for path in sorted((tiny_cohorts[domain] / "images").glob("*.nii.gz")):
        image = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        raw = np.asarray(nib.load(tiny_cohorts[domain] / "labels" / path.name).dataobj)
        ventricles, grey, white = _class_and_tissue_means(image, raw, protocol)
        assert ventricles < grey < white, (path.name, ventricles, grey, white)
        # Every one of the 14 structures is present in every subject.
        assert set(np.unique(labels.map_to_classes(raw, protocol))) == set(range(15))


def test_mislabelled_image_breaks_the_tissue_order():
    # The alignment check above must be able to fail: shift the labels by 6 voxels.
    subject = synth.generate_subject(synth.CohortParams(domain="source", **TINY), 0)
    shifted = np.roll(subject["labels"], 6, axis=2)
    v, g, w = _class_and_tissue_means(subject["image"].astype(float), shifted, "miccai2012")
    assert not (v < g < w)


def test_domains_differ_as_specified(tiny_cohorts):
    def stats(domain):
        imgs = [nib.load(p) for p in sorted((tiny_cohorts[domain] / "images").glob("*.nii.gz"))]
        zooms = {tuple(round(float(z), 4) for z in i.header.get_zooms()) for i in imgs}
        codes = {nib.aff2axcodes(i.affine) for i in imgs}
        maxima = [float(np.asarray(i.dataobj).max()) for i in imgs]
        return zooms, codes, maxima

    src_zooms, src_codes, src_max = stats("source")
    tgt_zooms, tgt_codes, tgt_max = stats("target")
    assert src_zooms == {(2.5, 2.5, 2.5)}
    assert tgt_zooms == {(2.3438, 2.3438, 3.75)}  # 0.9375 x 0.9375 x 1.5 mm times 2.5
    assert src_codes == {("R", "A", "S")} and tgt_codes == {("L", "I", "A")}
    assert all(1700 <= m <= 2400 for m in src_max), src_max
    assert all(115 <= m <= 170 for m in tgt_max), tgt_max
    groups = (tiny_cohorts["target"] / "subjects.csv").read_text()
    assert "ge" in groups and "siemens" in groups


def test_full_resolution_grids():
    template = synth.load_template()
    for domain, zooms in [("source", (1.0, 1.0, 1.0)), ("target", (0.9375, 0.9375, 1.5))]:
        shape, affine = synth._grid(synth.DOMAINS[domain], 1.0, template)
        np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), zooms)
        low, high = template.brain_box_mm
        extent = np.abs(affine[:3, :3] @ np.asarray(shape))
        assert np.all(extent >= high - low)


def test_target_rater_draws_boundaries_differently():
    template = synth.load_template()
    cerebra = labels.raw_ids("cerebra")
    rater = synth.rater_labels(template, synth.DOMAINS["target"].rater)

    def volume(lab, name):
        return int((lab == cerebra[name][0]).sum())

    for side in ("right", "left"):
        assert volume(rater, f"{side}_thalamus") > volume(template.labels, f"{side}_thalamus")
        assert volume(rater, f"{side}_putamen") < volume(template.labels, f"{side}_putamen")
        assert volume(rater, f"{side}_amygdala") > volume(template.labels, f"{side}_amygdala")
        assert volume(rater, f"{side}_hippocampus") < volume(template.labels, f"{side}_hippocampus")
        assert volume(rater, f"{side}_caudate") > volume(template.labels, f"{side}_caudate")
    source = synth.rater_labels(template, synth.DOMAINS["source"].rater)
    np.testing.assert_array_equal(source, template.labels)


def test_cohort_cache_reuse_resume_and_invalidation(tmp_path):
    params = synth.CohortParams(domain="source", n_subjects=2, seed=3, voxel_scale=3.0)
    root = synth.ensure_cohort(tmp_path / "c", params, progress=False)
    first = root / "images" / "s000.nii.gz"
    stamp = first.stat().st_mtime_ns
    manifest = json.loads((root / "synth.json").read_text())
    assert manifest["complete"] and manifest["cache_key"] == params.cache_key()

    synth.ensure_cohort(root, params, progress=False)
    assert first.stat().st_mtime_ns == stamp  # reused, not regenerated

    (root / "labels" / "s001.nii.gz").unlink()  # an interrupted generation
    synth.ensure_cohort(root, params, progress=False)
    assert (root / "labels" / "s001.nii.gz").is_file()
    assert first.stat().st_mtime_ns == stamp  # only the missing subject was made

    changed = synth.CohortParams(domain="source", n_subjects=2, seed=4, voxel_scale=3.0)
    synth.ensure_cohort(root, changed, progress=False)
    assert json.loads((root / "synth.json").read_text())["cache_key"] == changed.cache_key()
    assert first.stat().st_mtime_ns != stamp


def test_a_scanner_configured_in_yaml_is_a_domain_spec():
    """conf/dataset/synth_scanner_*.yaml give groups, raters and voxel sizes as lists and
    mappings: they become the generator's own frozen types (hashable, cached per rule set)."""
    from hydra import compose, initialize_config_dir

    import subseg

    with initialize_config_dir(str(subseg.CONF_DIR), version_base=None):
        for scanner in "abcd":
            block = compose("finetune", overrides=[f"dataset=synth_scanner_{scanner}"]).dataset
            spec = block.synth
            params = synth.CohortParams(
                **{k: v for k, v in spec.items() if k != "extra"}, extra=dict(spec.extra)
            )
            domain = params.spec
            assert all(isinstance(g, synth.ScannerGroup) for g in domain.groups)
            assert all(isinstance(r, synth.BoundaryRule) for r in domain.rater)
            assert isinstance(domain.voxel_mm, tuple) and hash(domain.rater)
            assert params.subject_ids()[0] == f"{scanner}000"
            assert set(block.test_ids) < set(params.subject_ids())
    keys = set()
    for scanner in "abcd":  # four different scanners, four different caches
        with initialize_config_dir(str(subseg.CONF_DIR), version_base=None):
            spec = compose("finetune", overrides=[f"dataset=synth_scanner_{scanner}"]).dataset.synth
        keys.add(
            synth.CohortParams(
                **{k: v for k, v in spec.items() if k != "extra"}, extra=dict(spec.extra)
            ).cache_key()
        )
    assert len(keys) == 4
