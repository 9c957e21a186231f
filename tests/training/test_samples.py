import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader

from subseg.model import patches
from subseg.preprocessing import atlas
from subseg.training import samples


def _classes():
    classes = np.zeros((30, 32, 28), np.uint8)
    classes[8:14, 10:16, 9:13] = 1
    classes[18:21, 20:24, 15:19] = 7
    return classes


def test_samples_are_all_structures_and_an_equal_shell():
    classes = _classes()
    coords, targets = samples.sample_voxels(classes, np.random.default_rng(0))
    n_struct = int((classes > 0).sum())
    assert len(coords) == 2 * n_struct
    assert (targets[:n_struct] > 0).all() and (targets[n_struct:] == 0).all()
    cross = ndimage.generate_binary_structure(3, 1)
    shell = ndimage.binary_dilation(classes > 0, cross, 5) & (classes == 0)
    assert shell[tuple(coords[n_struct:].T)].all()
    assert len({tuple(c) for c in coords[n_struct:]}) == n_struct  # no repeats
    again, _ = samples.sample_voxels(classes, np.random.default_rng(0))
    np.testing.assert_array_equal(coords, again)


def test_voxel_and_subject_level_splits():
    rng = np.random.default_rng(0)
    train, val = samples.split_indices(1000, 0.25, rng)
    assert len(val) == 250 and len(np.intersect1d(train, val)) == 0 and len(train) == 750
    groups = np.repeat(np.arange(4), 10)
    train, val = samples.split_indices(40, 0.25, rng, groups)
    assert len(np.unique(groups[val])) == 1 and not set(groups[val]) & set(groups[train])


def test_prior_at_voxels():
    shape = (10, 10, 10)
    structures = np.zeros((14, 4, 4, 4), np.float32)
    structures[2, 1, 2, 3] = 0.6
    prior = atlas.Prior(structures, np.ones((4, 4, 4), np.uint8), (slice(3, 7),) * 3, shape)
    out = samples.prior_at(prior, np.array([[4, 5, 6], [0, 0, 0], [3, 3, 3]]))
    np.testing.assert_allclose(out[0, [0, 3]], [0.4, 0.6])
    np.testing.assert_allclose(out[1], np.eye(15)[0])  # outside the box: background
    np.testing.assert_allclose(out[2], np.eye(15)[0])


def test_batches_gather_the_right_patches():
    gen = torch.Generator().manual_seed(0)
    subjects = []
    for i in range(2):
        volume = torch.randn((20, 22, 18), generator=gen)
        coords = torch.tensor([[1, 2, 3], [10, 11, 12], [19, 21, 17]]) - i
        subjects.append(
            samples.SubjectSamples(
                volume, coords, torch.tensor([0, 5, 14]), torch.full((3, 15), float(i))
            )
        )
    dataset = samples.PatchDataset(subjects, indices=np.array([0, 4, 5, 2]))
    loader = DataLoader(dataset, batch_size=3, shuffle=False, collate_fn=samples.collate_batch)
    first = next(iter(loader))
    assert first["axial"].shape == (3, 1, 32, 32)
    assert first["target"].tolist() == [0, 5, 14]
    assert first["prior"][:, 0].tolist() == [0.0, 1.0, 1.0]
    expected = patches.extract_patches(
        patches.pad_volume(subjects[1].volume), subjects[1].coords[1:]
    )
    for view in ("axial", "coronal", "sagittal"):
        assert torch.equal(first[view][1:], expected[view])
    assert len(dataset) == 4 and dataset[3]["target"] == 14
