import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_cohorts(tmp_path_factory):
    """The tiny synthetic source and target cohorts, generated once per test session."""
    from subseg.data import synth

    root = tmp_path_factory.mktemp("synth")
    out = {}
    for domain in ("source", "target"):
        params = synth.CohortParams(domain=domain, n_subjects=3, seed=0, voxel_scale=2.5)
        out[domain] = synth.ensure_cohort(root / domain, params, progress=False)
    return out


def new_module(dropout: float = 0.3, lr: float = 1e-3):
    """A freshly initialised training module: the network and Adam, as ``conf/model`` builds it."""
    from functools import partial

    import torch

    from subseg.model.network import SubcorticalNet
    from subseg.training.lit_module import SegmentationModule

    return SegmentationModule(SubcorticalNet(dropout), partial(torch.optim.Adam, lr=lr))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """An untrained network saved as a Lightning checkpoint, as training would (its outputs and
    conv features still differ from scan to scan, which is all some tests need)."""
    import lightning as L

    L.seed_everything(0)
    module = new_module()
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(module)
    path = tmp_path_factory.mktemp("ckpt") / "best.ckpt"
    trainer.save_checkpoint(path)
    return path


def write_nifti(path, data, affine=None, dtype=None):
    """Write a NIfTI with an explicit affine (identity by default)."""
    data = np.asarray(data) if dtype is None else np.asarray(data, dtype=dtype)
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def affine_for(axcodes, zooms=(1.0, 1.0, 1.0), origin=(10.0, -20.0, 5.0)):
    """An affine whose axes point along ``axcodes`` with the given voxel sizes."""
    from nibabel import orientations

    ornt = orientations.axcodes2ornt(axcodes)
    affine = np.zeros((4, 4))
    affine[3, 3] = 1
    for axis, (world_axis, flip) in enumerate(ornt.astype(int)):
        affine[world_axis, axis] = flip * zooms[axis]
    affine[:3, 3] = origin
    return affine
