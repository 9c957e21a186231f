import numpy as np
import pytest

from subseg import labels

# METHOD.md §1, row by row: class, structure, MICCAI 2012, aseg, CerebrA.
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
