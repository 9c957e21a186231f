"""The one loader: any subseg checkpoint, old or new, in or out of its run folder."""

from pathlib import Path

import pytest
import torch

from subseg.core import io
from subseg.model.network import SubcorticalNet
from subseg.runs import trained_model


def test_a_checkpoint_carries_its_network_config(checkpoint):
    stored = torch.load(checkpoint, weights_only=True)
    assert stored[trained_model.NETWORK_KEY] == SubcorticalNet(0.3).config()
    net = trained_model.load_network(checkpoint)
    assert net.config()["dropout"] == 0.3 and not net.training


def test_an_old_checkpoint_rebuilds_its_network_from_its_hyper_parameters(checkpoint, tmp_path):
    """Checkpoints written before the config travelled held the dropout alone."""
    stored = torch.load(checkpoint, weights_only=True)
    del stored[trained_model.NETWORK_KEY]
    stored["hyper_parameters"] = {"dropout": 0.5, "lr": 1e-3}
    old = tmp_path / "old.ckpt"
    torch.save(stored, old)
    net = trained_model.load_network(old)
    assert net.config()["dropout"] == 0.5
    expected = trained_model.load_network(checkpoint).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in net.state_dict().items())


def test_a_checkpoint_naming_another_class_or_other_structures_is_refused(checkpoint, tmp_path):
    stored = torch.load(checkpoint, weights_only=True)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({**stored, trained_model.NETWORK_KEY: {"_target_": "os.system"}}, foreign)
    with pytest.raises(io.InputError, match=r"foreign.ckpt: .*'os.system' is not one of"):
        trained_model.load_network(foreign)
    other = tmp_path / "other.ckpt"
    torch.save({**stored, trained_model.INPUT_KEY: {"structures": ["brainstem"]}}, other)
    with pytest.raises(io.InputError, match="other.ckpt: the model segments 1 structures"):
        trained_model.load_network(other)


def test_a_saved_atlas_travels_inside_the_checkpoint(checkpoint, tmp_path):
    """A source_labels atlas's files come back, unpacked once, for the contract to point at."""
    files = {"manifest.json": b"{}", "structures.nii.gz": b"\x1f\x8b data"}
    record = {
        "contract": {
            "preprocess": {"name": "none", "kind": "none"},
            "atlas": {"name": "source_labels", "kind": "source_labels", "path": None},
            "intensity": "nyul",
            "landmarks": [0.0, 1.0],
        },
        "atlas_files": files,
    }
    contract = trained_model.checkpoint_contract({trained_model.INPUT_KEY: record}, "m.ckpt")
    folder = contract.atlas["path"]
    assert {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())} == files
    assert (contract.intensity, contract.landmarks) == ("nyul", [0.0, 1.0])
    again = trained_model.checkpoint_contract({trained_model.INPUT_KEY: record}, "m.ckpt")
    assert again.atlas["path"] == folder  # once per process
    record["atlas_files"] = None
    with pytest.raises(io.InputError, match="m.ckpt: its source_labels atlas is missing"):
        trained_model.checkpoint_contract({trained_model.INPUT_KEY: record}, "m.ckpt")
    assert trained_model.checkpoint_contract({}, "m.ckpt") is None  # made before they travelled
