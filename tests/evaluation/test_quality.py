import numpy as np

from subseg.core.labels import NUM_CLASSES, STRUCTURES
from subseg.evaluation import quality
from subseg.preprocessing.atlas import Prior


def _case(shape=(12, 12, 12)):
    """A class map with two cubes (classes 1 and 2), an atlas prior expecting them there, and
    network probabilities certain of them."""
    classes = np.zeros(shape, np.uint8)
    classes[2:5, 2:5, 2:5] = 1
    classes[7:10, 7:10, 7:10] = 2
    structures = np.zeros((len(STRUCTURES), *shape), np.float32)
    structures[0][classes == 1] = 0.9
    structures[1][classes == 2] = 0.9
    box = tuple(slice(0, n) for n in shape)
    prior = Prior(structures, np.full(shape, 2, np.uint8), box, shape)
    probabilities = np.eye(NUM_CLASSES, dtype=np.float32)[classes].transpose(3, 0, 1, 2)
    return classes, probabilities, prior


def test_a_certain_segmentation_where_the_atlas_expects_it_scores_one():
    classes, probabilities, prior = _case()
    scores = quality.structure_scores(classes, probabilities, prior)
    assert [s["structure"] for s in scores] == list(STRUCTURES)
    assert scores[0]["qc"] == scores[1]["qc"] == 1.0
    assert all(s["qc"] == 0.0 for s in scores[2:])  # not segmented: nothing to trust


def test_hesitant_probabilities_and_a_misplaced_structure_score_lower():
    classes, probabilities, prior = _case()
    hesitant = probabilities.copy()
    hesitant[1][classes == 1], hesitant[0][classes == 1] = 0.6, 0.4
    scores = quality.structure_scores(classes, hesitant, prior)
    assert 0.6 < scores[0]["confidence"] < 1.0 and scores[0]["atlas_agreement"] == 1.0
    assert scores[0]["qc"] < 1.0 and scores[1]["qc"] == 1.0
    moved = classes.copy()
    moved[moved == 2] = 0
    moved[7:10, 2:5, 2:5] = 2  # the structure segmented away from where the atlas expects it
    probabilities = np.eye(NUM_CLASSES, dtype=np.float32)[moved].transpose(3, 0, 1, 2)
    scores = quality.structure_scores(moved, probabilities, prior)
    assert scores[1]["confidence"] == 1.0 and scores[1]["atlas_agreement"] == 0.0
    assert scores[1]["qc"] == 0.0
    # atlas=none: no expected place; the confidence alone.
    prior.structures[:] = 0.0
    scores = quality.structure_scores(classes, hesitant, prior)
    assert np.isnan(scores[0]["atlas_agreement"]) and scores[0]["qc"] == scores[0]["confidence"]


def _rows(values):
    return [
        {"subject": subject, "structure": name, "qc": qc}
        for subject, per_structure in values.items()
        for name, qc in per_structure.items()
    ]


def test_scans_are_flagged_against_the_same_structure_on_the_batch():
    typical = {"left_thalamus": 0.8, "left_amygdala": 0.35}  # the amygdala scores low everywhere
    batch = {f"s{i}": dict(typical) for i in range(5)}
    batch["s3"] = {"left_thalamus": 0.45, "left_amygdala": 0.35}  # far below the batch's thalamus
    table = quality.scan_table(_rows(batch))
    assert table[0]["subject"] == "s3" and table[0]["flagged"]
    assert (
        table[0]["worst_structure"] == "left_thalamus" and "left_thalamus 0.45" in table[0]["why"]
    )
    assert not any(r["flagged"] for r in table[1:])  # a low amygdala everywhere is no flag
    assert sorted(r["subject"] for r in table) == sorted(batch)
    # Two scans have no batch to compare with: only a structure near zero is flagged.
    pair = {"a": {"left_thalamus": 0.8}, "b": {"left_thalamus": 0.45}}
    assert not any(r["flagged"] for r in quality.scan_table(_rows(pair)))
    pair["b"]["left_thalamus"] = 0.1
    assert [r["flagged"] for r in quality.scan_table(_rows(pair))] == [True, False]


def test_a_brain_mask_that_cuts_into_the_prior_flags_the_scan():
    _, _, prior = _case()
    whole = np.ones(prior.shape, bool)
    assert quality.mask_cut_warning(prior, whole) is None
    cut = whole.copy()
    cut[:, :, 8:] = False  # the mask stops short of the second structure's expected place
    warning = quality.mask_cut_warning(prior, cut)
    assert warning is not None and "cuts into the sub-cortical structures (33%" in warning


def _brain_rows(subject, litres, qc=0.8):
    return [
        {"subject": subject, "structure": s, "qc": qc, "brain_litres": litres, "extraction": "x"}
        for s in STRUCTURES
    ]


def test_a_brain_volume_far_from_the_reference_flags_the_scan():
    rows = _brain_rows("a", 1.50) + _brain_rows("b", 1.62) + _brain_rows("c", 2.40)
    table = {r["subject"]: r for r in quality.scan_table(rows)}
    assert not table["a"]["flagged"] and not table["b"]["flagged"]
    assert (
        table["c"]["flagged"]
        and "48% larger than the batch median (1.62 L)" in (table["c"]["warnings"])
    )
    assert quality.scan_table(rows)[0]["subject"] == "c"  # a warning is listed first
    # The model's own training scans, when known, are the reference.
    reference = (2.3, "the model's training scans")
    table = {r["subject"]: r for r in quality.scan_table(rows, reference)}
    assert not table["c"]["flagged"] and table["a"]["flagged"]
    assert "smaller than the model's training scans (2.30 L)" in table["a"]["warnings"]
    # Two scans have no batch to compare with, and no reference was given: nothing to say.
    assert not any(
        r["flagged"] for r in quality.scan_table(_brain_rows("a", 1.0) + _brain_rows("c", 2.4))
    )
