import os

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, write_nifti
from omegaconf import OmegaConf

from subseg.core import cache, io
from subseg.preprocessing import atlas, bias


def _scan(path):
    rng = np.random.default_rng(0)
    data = np.zeros((24, 26, 22), np.float32)
    data[4:20, 5:21, 4:18] = 100 + rng.normal(0, 5, (16, 16, 14))
    return write_nifti(path, data, np.diag([2.0, 2.0, 2.0, 1.0]))


def _change_one_voxel(path):
    img = nib.load(path)
    data = np.asarray(img.dataobj).copy()
    data[12, 12, 10] += 7
    stat = path.stat()
    nib.save(nib.Nifti1Image(data, img.affine), path)
    # Same size and modification time: only the content says it changed.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _touch(path):
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def _counting(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_n4_cache_is_keyed_on_content(tmp_path, monkeypatch):
    path = _scan(tmp_path / "s.nii")  # uncompressed: a changed voxel keeps the size
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "preprocess" / "n4.yaml"))
    cfg.update(cache_dir=str(tmp_path / "cache"), iterations=[5, 5])
    calls = _counting(monkeypatch, bias, "correct")

    def corrected():
        image = io.load_image(path)
        return bias.corrected(path, image.data, image.affine, cfg)

    first = corrected()
    assert len(calls) == 1
    _touch(path)
    np.testing.assert_array_equal(corrected(), first)
    assert len(calls) == 1  # a touched file reuses its entry
    _change_one_voxel(path)
    corrected()
    assert len(calls) == 2  # a changed voxel rebuilds it
    corrected()
    assert len(calls) == 2
    assert bias.ensure_corrected([path], cfg, workers=1) == 0
    corrected_elsewhere = dict(cfg, iterations=[5, 6])  # other settings: another entry
    bias.corrected(path, io.load_image(path).data, io.load_image(path).affine, corrected_elsewhere)
    assert len(calls) == 3


def test_prior_cache_is_keyed_on_content(tmp_path, monkeypatch):
    path = _scan(tmp_path / "s.nii")  # uncompressed: a changed voxel keeps the size
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "atlas" / "harvard_oxford.yaml"))
    cfg["cache_dir"] = str(tmp_path / "cache")
    source = atlas.AtlasSource("fake", np.zeros((2, 2, 2)), np.eye(4), None, np.eye(4), "fake:1")
    calls, seen = [], []

    def fake_registration(image, *args, **kwargs):  # the cache, not ANTs, is under test
        calls.append(1)
        seen.append(image.data.copy())
        prior = atlas.brain_prior(image)
        prior.structures[0, 4:8, 4:8, 4:8] = np.float32(128) / atlas.QUANTUM  # as stored
        return prior

    monkeypatch.setattr(atlas, "register_prior", fake_registration)
    first = atlas.subject_prior(io.load_image(path), cfg, source)
    assert len(calls) == 1
    _touch(path)
    again = atlas.subject_prior(io.load_image(path), cfg, source)
    assert len(calls) == 1
    np.testing.assert_array_equal(again.structures, first.structures)
    _change_one_voxel(path)
    atlas.subject_prior(io.load_image(path), cfg, source)
    assert len(calls) == 2
    # With N4 the registration sees the bias-corrected scan, under another entry.
    n4 = {"name": "n4", "kind": "n4", "iterations": [5], "cache_dir": str(tmp_path / "c")}
    assert atlas.ensure_priors([path], cfg, source, workers=1, progress=False, preprocess=n4) == 1
    assert len(calls) == 3
    image = io.load_image(path)
    np.testing.assert_array_equal(seen[-1], bias.corrected(path, image.data, image.affine, n4))
    assert not np.array_equal(seen[-1], image.data)
    atlas.subject_prior(io.load_image(path), cfg, source, n4)  # what ensure_priors cached
    assert len(calls) == 3


def test_file_digest_follows_bytes_not_names(tmp_path):
    a = _scan(tmp_path / "a.nii")
    b = tmp_path / "b.nii"
    b.write_bytes(a.read_bytes())
    assert cache.file_digest(a) == cache.file_digest(b)
    _change_one_voxel(b)
    assert cache.file_digest(a) != cache.file_digest(b)


@pytest.mark.parametrize("kind", ["n4", "none"])
def test_preset_configs_parse(kind):
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "preprocess" / f"{kind}.yaml"))
    settings = bias.N4.from_config(cfg)
    assert (settings is None) == (kind == "none")


def test_same_named_scans_in_one_cache_folder_keep_their_own_entries(tmp_path, monkeypatch):
    first, second = _scan(tmp_path / "a" / "T1.nii"), _scan(tmp_path / "b" / "T1.nii")
    _change_one_voxel(second)
    cfg = {"name": "n4", "kind": "n4", "iterations": [5], "cache_dir": str(tmp_path / "cache")}
    calls = _counting(monkeypatch, bias, "correct")
    for path in (first, second, first, second):
        image = io.load_image(path)
        bias.corrected(path, image.data, image.affine, cfg)
    assert len(calls) == 2
