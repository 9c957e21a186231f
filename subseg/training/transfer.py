"""Transfer learning in two visible steps: load a source model's weights, then freeze by preset.

1. :func:`load_source_weights` copies every tensor of a source checkpoint whose name and shape
   match the network (strict on shapes: a mismatch is an error, never a silent skip) and reports
   what was copied, skipped and left at initialisation.
2. :class:`FreezeSchedule` (a Lightning ``BaseFinetuning`` callback) applies a ``conf/freeze``
   preset: which modules stay fixed, whether frozen BatchNorm layers keep the source's running
   statistics (eval mode), which layers are re-initialised, and optionally which modules thaw at
   a later epoch with their own learning rate.

When a preset freezes every convolution block with its BatchNorm in eval mode, the conv stacks
are a fixed function of the input: :func:`caches_conv_features` says so, and fine-tuning then
trains the fully-connected layers on conv features computed once (:mod:`subseg.model.dense`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn

from subseg.core import io
from subseg.model import dense
from subseg.model.network import SubcorticalNet
from subseg.runs.trained_model import read_checkpoint
from subseg.training.samples import SubjectSamples


@dataclass(frozen=True)
class FreezePreset:
    """A ``conf/freeze`` entry.

    Attributes:
        name: preset name.
        lr: learning rate of the trainable parameters.
        freeze: module-name patterns (``fnmatch``, on ``named_modules`` names) kept fixed.
        train_only: when non-empty, every module *not* matching these patterns is frozen.
        norm_eval: frozen BatchNorm layers run in eval mode (the source's statistics).
        reset: module-name patterns re-initialised after loading (e.g. the classifier).
        unfreeze: ``[{epoch, modules, lr}]``: modules thawed at that epoch with their own
            learning rate (Lightning adds them to the optimiser as a new parameter group).
        cache_features: train on cached conv features when the preset allows it.
    """

    name: str
    lr: float
    freeze: tuple[str, ...] = ()
    train_only: tuple[str, ...] = ()
    norm_eval: bool = True
    reset: tuple[str, ...] = ()
    unfreeze: tuple[Mapping, ...] = field(default_factory=tuple)
    cache_features: bool = True

    @classmethod
    def from_config(cls, cfg: Mapping) -> FreezePreset:
        """Build a preset from a ``conf/freeze`` mapping."""
        cfg = dict(cfg)
        for key in ("freeze", "train_only", "reset"):
            cfg[key] = tuple(cfg.get(key) or ())
        cfg["unfreeze"] = tuple(dict(step) for step in cfg.get("unfreeze") or ())
        return cls(**cfg)


def select_modules(net: nn.Module, patterns) -> list[nn.Module]:
    """Modules of ``net`` whose qualified names match any of the ``fnmatch`` patterns."""
    return [
        module
        for name, module in net.named_modules()
        if name and any(fnmatch.fnmatchcase(name, p) for p in patterns)
    ]


def frozen_modules(net: nn.Module, preset: FreezePreset) -> list[nn.Module]:
    """The leaf modules a preset keeps fixed from the first epoch."""
    if preset.train_only:
        trainable = {
            id(m) for m in BaseFinetuning.flatten_modules(select_modules(net, preset.train_only))
        }
        return [m for m in BaseFinetuning.flatten_modules(net) if id(m) not in trainable]
    return list(BaseFinetuning.flatten_modules(select_modules(net, preset.freeze)))


def load_source_weights(net: nn.Module, checkpoint: str | Path) -> dict[str, list[str]]:
    """Copy a source checkpoint's weights into ``net``, strictly on shapes.

    Args:
        net: the network to initialise.
        checkpoint: a Lightning checkpoint of :class:`subseg.training.lit_module.SegmentationModule`
            (tensors under ``net.``) or a plain ``state_dict`` of the network.

    Returns:
        ``{"copied": [...], "skipped": [...], "missing": [...]}``: tensor names copied, found in
        the checkpoint but not in the network, and in the network but not the checkpoint.

    Raises:
        io.InputError: unreadable file, or a tensor whose shape differs from the network's.
    """
    checkpoint = Path(checkpoint)
    state = read_checkpoint(checkpoint)["state_dict"]
    state = {k.removeprefix("net."): v for k, v in state.items() if torch.is_tensor(v)}
    own = net.state_dict()
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape:
            raise io.InputError(
                f"{checkpoint}: tensor {name} has shape {tuple(tensor.shape)}, the network "
                f"expects {tuple(own[name].shape)}"
            )
    copied = sorted(k for k in state if k in own)
    if not copied:
        raise io.InputError(f"{checkpoint}: no tensor matches the network's (not a subseg model)")
    net.load_state_dict({k: state[k] for k in copied}, strict=False)
    return {
        "copied": copied,
        "skipped": sorted(k for k in state if k not in own),
        "missing": sorted(k for k in own if k not in state),
    }


def reset_layers(net: nn.Module, preset: FreezePreset) -> list[str]:
    """Re-initialise the modules a preset names in ``reset`` (PyTorch's default init).

    Returns:
        The names of the modules reset.
    """
    names = []
    for name, module in net.named_modules():
        if name and any(fnmatch.fnmatchcase(name, p) for p in preset.reset):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
                names.append(name)
    return names


def caches_conv_features(net: SubcorticalNet, preset: FreezePreset) -> bool:
    """Whether the preset leaves every conv block a fixed function (so its output can be cached).

    True when every parameter of every path's conv blocks is frozen from the start and never
    thawed, and frozen BatchNorm layers run in eval mode.
    """
    if not preset.cache_features or preset.unfreeze or not preset.norm_eval:
        return False
    frozen = {id(p) for m in frozen_modules(net, preset) for p in m.parameters(recurse=False)}
    blocks = [block for path in net.paths.values() for block in path.conv_blocks()]
    return all(id(p) in frozen for block in blocks for p in block.parameters())


class FreezeSchedule(BaseFinetuning):
    """Apply a freeze preset to ``module.net`` and thaw modules on schedule.

    Args:
        preset: the ``conf/freeze`` preset.
    """

    def __init__(self, preset: FreezePreset):
        super().__init__()
        self.preset = preset
        self._frozen_norms: list[nn.Module] = []

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        """Freeze the preset's modules before the optimiser is built."""
        frozen = frozen_modules(pl_module.net, self.preset)
        norms = [m for m in frozen if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if norms and not self.preset.norm_eval:
            # Frozen BatchNorm in train mode would normalise with batch statistics while training
            # and with the source's at test time: a model that is not the one trained.
            raise io.InputError(
                f"freeze={self.preset.name}: freezes BatchNorm layers, which needs norm_eval: true"
            )
        self.freeze(frozen, train_bn=False)
        self._frozen_norms = norms  # kept in eval mode (norm_eval, checked above)

    def finetune_function(
        self, pl_module: L.LightningModule, epoch: int, optimizer: torch.optim.Optimizer
    ) -> None:
        """Thaw the modules scheduled for this epoch, with their own learning rate."""
        for step in self.preset.unfreeze:
            if int(step["epoch"]) == epoch:
                modules = select_modules(pl_module.net, step["modules"])
                self.unfreeze_and_add_param_group(
                    modules, optimizer, lr=float(step["lr"]), train_bn=True
                )
                thawed = {id(m) for m in BaseFinetuning.flatten_modules(modules)}
                for module in BaseFinetuning.flatten_modules(modules):
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.track_running_stats = True  # freeze_module turned it off
                self._frozen_norms = [m for m in self._frozen_norms if id(m) not in thawed]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Keep frozen BatchNorm layers on the source's statistics (Lightning sets train mode)."""
        for module in self._frozen_norms:
            module.eval()


@torch.no_grad()
def conv_features_of(net: SubcorticalNet, samples: SubjectSamples) -> torch.Tensor:
    """The frozen conv features (N×1620) of one subject's sampled voxels, in sample order.

    Computed densely (:func:`subseg.model.dense.dense_conv_features`) over the sampled voxels only.

    Args:
        net: the network (its conv blocks are what is evaluated; put in eval mode here).
        samples: the subject's volume and sampled voxels.
    """
    was_training = net.training
    net.eval()
    roi = torch.zeros(samples.volume.shape, dtype=torch.bool)
    coords = samples.coords.long()
    roi[tuple(coords.T)] = True
    features = dense.dense_conv_features(net, samples.volume, roi)
    net.train(was_training)
    # dense_conv_features returns rows in torch.nonzero(roi) order; map each sample to its row.
    rows = torch.full(roi.shape, -1, dtype=torch.long)
    rows[roi] = torch.arange(int(roi.sum()))
    return features[rows[tuple(coords.T)]]


def feature_dataset(net, samples):
    """The samples as frozen conv features (computed once) for training the layers after them.

    Args:
        net: the network whose frozen conv stacks compute the features.
        samples: :class:`subseg.training.samples.SubjectSamples` of every subject.

    Returns:
        A :class:`subseg.training.samples.FeatureDataset`.
    """
    from subseg.training.samples import FeatureDataset

    return FeatureDataset(
        torch.cat([conv_features_of(net, s) for s in samples]),
        torch.cat([s.prior for s in samples]),
        torch.cat([s.targets for s in samples]),
    )
