import numpy as np
import pytest

from subseg.core import labels

# docs/method.md §1, row by row: class, structure, MICCAI 2012, aseg, CerebrA.
METHOD_TABLE = [
    (1, "right_thalamus", 59, 49, 40),
    (2, "left_thalamus", 60, 10, 91),
    (3, "right_caudate", 36, 50, 49),
    (4, "left_caudate", 37, 11, 100),
    (5, "right_putamen", 57, 51, 21),
    (6, "left_putamen", 58, 12, 72),
    (7, "right_pallidum", 55, 52, 27),
    (8, "left_pallidum", 56, 13, 78),
    (9, "right_hippocampus", 47, 53, 48),
    (10, "left_hippocampus", 48, 17, 99),
    (11, "right_amygdala", 31, 54, 19),
    (12, "left_amygdala", 32, 18, 70),
    (13, "right_accumbens", 23, 58, 4),
    (14, "left_accumbens", 30, 26, 55),
]


def test_structures_in_method_order():
    assert labels.STRUCTURES == tuple(row[1] for row in METHOD_TABLE)
    assert labels.NUM_CLASSES == 15


@pytest.mark.parametrize("column,protocol", [(2, "miccai2012"), (3, "aseg"), (4, "cerebra")])
def test_tables_match_method(column, protocol):
    expected = {row[column]: row[0] for row in METHOD_TABLE}
    assert labels.class_lookup(protocol) == expected


@pytest.mark.parametrize("column,protocol", [(2, "miccai2012"), (3, "aseg"), (4, "cerebra")])
def test_mapping_sends_unlisted_ids_to_background(column, protocol):
    listed = [row[column] for row in METHOD_TABLE]
    unlisted = [
        v for v in [0, 1, 2, 3, 5, 24, 41, 44, 45, 51, 52, 1000, 2035, -7, 65535] if v not in listed
    ]
    raw = np.array(listed + unlisted, dtype=np.int32).reshape(1, 1, -1)
    mapped = labels.map_to_classes(raw, protocol)
    assert mapped.dtype == np.uint8 and mapped.shape == raw.shape
    assert mapped.ravel()[: len(listed)].tolist() == list(range(1, 15))
    assert not mapped.ravel()[len(listed) :].any()


def test_float_labels_are_rounded():
    raw = np.array([48.9999, 49.0001, 10.0], dtype=np.float32)
    assert labels.map_to_classes(raw, "aseg").tolist() == [1, 1, 2]


def test_explicit_mapping_with_split_structures():
    mapping = {name: 100 + c for c, name in enumerate(labels.STRUCTURES, 1)}
    mapping["left_accumbens"] = [114, 214]
    raw = np.array([101, 114, 214, 7, 0])
    assert labels.map_to_classes(raw, mapping).tolist() == [1, 14, 14, 0, 0]


def test_bad_mappings_are_rejected():
    with pytest.raises(labels.LabelSpecError, match="unknown label protocol"):
        labels.raw_ids("freesurfer7")
    partial = {"right_thalamus": 1}
    with pytest.raises(labels.LabelSpecError, match="missing"):
        labels.raw_ids(partial)
    for bad in ("49", None, 2.5, [], 0, [3, 0], True):
        with pytest.raises(labels.LabelSpecError, match="right_thalamus"):
            labels.raw_ids(
                {**{n: i + 1 for i, n in enumerate(labels.STRUCTURES)}, "right_thalamus": bad}
            )
    with pytest.raises(labels.LabelSpecError, match="protocol name or a mapping"):
        labels.raw_ids(49)
    clash = {name: 1 for name in labels.STRUCTURES}
    with pytest.raises(labels.LabelSpecError, match="two structures"):
        labels.raw_ids(clash)


@pytest.mark.parametrize("protocol", labels.PROTOCOLS)
def test_raw_round_trip(protocol):
    classes = np.arange(15, dtype=np.uint8)
    raw = labels.map_to_raw(classes, protocol)
    assert raw[0] == 0
    assert labels.map_to_classes(raw, protocol).tolist() == classes.tolist()


def test_left_right_pairs():
    assert labels.LEFT_RIGHT_PAIRS == ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14))
    assert labels.mirror_class(labels.class_of("left_hippocampus")) == labels.class_of(
        "right_hippocampus"
    )
    assert labels.mirror_class(0) == 0


def test_structure_names_for_people():
    assert labels.structure_name(labels.class_of("left_putamen")) == "left putamen"
    assert labels.structure_name(1) == "right thalamus"
    assert labels.structure_name(0) == "background"


@pytest.mark.parametrize("protocol", labels.PROTOCOLS)
def test_unexpected_ids_spare_the_protocols_own_tissues(protocol):
    own = [i for ids in labels.raw_ids(protocol).values() for i in ids]
    tissues = list(labels.reference_tissue_ids(protocol).values())
    assert tissues and labels.unexpected_ids([0, *own, *tissues], protocol) == []
    assert labels.unexpected_ids([0, *own, -3, 70000, 2**31 - 1], protocol) == [
        -3,
        70000,
        2**31 - 1,
    ]


def test_unexpected_ids_per_numbering():
    # aseg: FreeSurfer ids (cortex 3, ventricle 4, CSF 24, aparc+aseg 1035, a2009s 12175) are
    # other tissues; 256 and 1036 are no FreeSurfer volume id.
    assert labels.unexpected_ids([3, 4, 24, 256, 1035, 1036, 12175], "aseg") == [256, 1036]
    # MICCAI 2012 (Neuromorphometrics) ids end at 207; CerebrA's at 102.
    assert labels.unexpected_ids([4, 100, 207, 208], "miccai2012") == [208]
    assert labels.unexpected_ids([1, 102, 103], "cerebra") == [103]
    # An explicit mapping documents nothing else: every unmapped non-zero id is unexpected.
    mapping = {name: 100 + c for c, name in enumerate(labels.STRUCTURES, 1)}
    assert labels.unexpected_ids(np.array([0, 0, 101, 114, 3, 3, 2]), mapping) == [2, 3]
