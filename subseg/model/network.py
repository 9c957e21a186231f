"""The 2.5-D three-path patch network of Kushibar et al. (docs/method.md §2), a plain ``nn.Module``.

Three identical paths see 32×32 patches centred on a voxel in the axial, coronal and sagittal
planes; their 180-d outputs are concatenated, pass a fully-connected layer, meet the voxel's 15
atlas probabilities and end in 15 class scores. BatchNorm and PReLU are per channel (the 2019
Keras release normalised per image column and gave PReLU one slope per element, which makes the
network position-dependent; we do not copy that), so the same weights can be evaluated densely
over whole slices (:mod:`subseg.model.dense`). Trainable parameters: 882,375.

No Lightning or Hydra here: the module is usable from a notebook.
"""

from __future__ import annotations

import torch
from torch import nn

from subseg.core.labels import NUM_CLASSES  # background + the 14 structures

PATCH = 32
"""Patch side; the voxel sits at index ``PATCH // 2`` (16) — the patch spans c−16 … c+15."""

VIEWS = ("axial", "coronal", "sagittal")
"""The three paths, in input order."""

CONV_CHANNELS = (20, 20, 40, 40, 60)
PATH_FEATURES = 180
CONV_FEATURES = 540
"""Per path: conv5's 60 channels × 3 × 3, the input of the path's dense layer."""


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU masks come from ``torch.rand`` instead of ``bernoulli_``.

    Written by hand because torch's CPU dropout draws its Bernoulli masks element by element
    from the Mersenne Twister on one core (MKL's generator is used on Intel CPUs only): on an AMD
    CPU that was half of a fine-tuning step on cached features. ``torch.rand`` fills the same
    masks 3.6× faster (docs/engineering.md#fine-tuning-step-on-cached-features). A voxel is kept
    with probability ``1 - p`` and scaled by ``1 / (1 - p)``, exactly as ``nn.Dropout`` does;
    only which random numbers decide it differ. Elsewhere (GPU, eval mode) it is ``nn.Dropout``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)``."""
        if not self.training or not 0 < self.p < 1 or x.device.type != "cpu":
            return super().forward(x)
        keep = 1.0 - self.p
        noise = (torch.rand(x.shape, dtype=x.dtype) < keep).to(x.dtype).div_(keep)
        return x * noise


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3×3 valid convolution without bias, per-channel BatchNorm and PReLU (α₀ = 0.25)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, bias=False),
        nn.BatchNorm2d(c_out),
        nn.PReLU(c_out, init=0.25),
    )


class PathNet(nn.Module):
    """One view's path: 1×32×32 patch → 180 features.

    Layers: conv 20, conv 20, maxpool 2, conv 40, conv 40, maxpool 2, conv 60 (each 3×3 valid
    with BN and PReLU), dropout, dense 540 → 180, PReLU.

    Args:
        dropout: dropout probability before the dense layer.
    """

    def __init__(self, dropout: float = 0.5):
        super().__init__()
        c1, c2, c3, c4, c5 = CONV_CHANNELS
        self.conv1 = _conv_block(1, c1)
        self.conv2 = _conv_block(c1, c2)
        self.pool1 = nn.MaxPool2d(2)
        self.conv3 = _conv_block(c2, c3)
        self.conv4 = _conv_block(c3, c4)
        self.pool2 = nn.MaxPool2d(2)
        self.conv5 = _conv_block(c4, c5)
        self.dropout = Dropout(dropout)
        self.dense = nn.Linear(CONV_FEATURES, PATH_FEATURES)
        self.dense_act = nn.PReLU(PATH_FEATURES, init=0.25)

    def conv_blocks(self) -> list[nn.Sequential]:
        """The five convolution blocks, in order."""
        return [self.conv1, self.conv2, self.conv3, self.conv4, self.conv5]

    def conv_features(self, patch: torch.Tensor) -> torch.Tensor:
        """The convolution stack's output, flattened: B×1×32×32 patches → B×540.

        With the convolutions frozen (fine-tuning) this is a fixed function of the patch, which
        :func:`subseg.model.dense.dense_conv_features` computes once per voxel and caches.
        """
        x = self.conv2(self.conv1(patch))
        x = self.conv4(self.conv3(self.pool1(x)))
        return self.conv5(self.pool2(x)).flatten(1)

    def fully_connected(self, conv_features: torch.Tensor) -> torch.Tensor:
        """Dropout, the dense 540 → 180 layer and its PReLU, on B×540 conv features."""
        return self.dense_act(self.dense(self.dropout(conv_features)))

    def forward(self, patch: torch.Tensor) -> torch.Tensor:
        """Map B×1×32×32 patches to B×180 features."""
        return self.fully_connected(self.conv_features(patch))


class SubcorticalNet(nn.Module):
    """The full network: three paths, FC1, the atlas prior, FC2 and a 15-class output.

    Args:
        dropout: dropout probability (0.5 in the 2018 release, 0.3 in the 2019 one).
    """

    def __init__(self, dropout: float = 0.5):
        super().__init__()
        self.dropout_p = float(dropout)
        self.paths = nn.ModuleDict({view: PathNet(dropout) for view in VIEWS})
        width = PATH_FEATURES * len(VIEWS)
        self.dropout1 = Dropout(dropout)
        self.fc1 = nn.Linear(width, width)
        self.fc1_act = nn.PReLU(width, init=0.25)
        self.dropout2 = Dropout(dropout)
        self.fc2 = nn.Linear(width + NUM_CLASSES, 270)
        self.fc2_act = nn.PReLU(270, init=0.25)
        self.classifier = nn.Linear(270, NUM_CLASSES)

    def config(self) -> dict:
        """The Hydra config that rebuilds this network (``conf/model``'s ``net`` entry).

        Saved in every checkpoint, so that a checkpoint alone rebuilds its network.
        """
        return self.config_of(self.dropout_p)

    @classmethod
    def config_of(cls, dropout: float) -> dict:
        """The config of a network with this dropout, without building one."""
        return {"_target_": f"{__name__}.{cls.__qualname__}", "dropout": float(dropout)}

    def path_features(self, patches: dict[str, torch.Tensor] | tuple) -> torch.Tensor:
        """Concatenated path outputs (B×540) of the axial, coronal and sagittal patches."""
        if not isinstance(patches, dict):
            patches = dict(zip(VIEWS, patches, strict=True))
        return torch.cat([self.paths[view](patches[view]) for view in VIEWS], dim=1)

    def head_features(self, path_features: torch.Tensor, atlas: torch.Tensor) -> torch.Tensor:
        """The 555-d vector entering FC2: FC1's output and the atlas probabilities.

        Args:
            path_features: B×540 from :meth:`path_features`.
            atlas: B×15 prior in output-class order (background first). It enters in the order
                of the original network, 14 structures then background.
        """
        x = self.fc1_act(self.fc1(self.dropout1(path_features)))
        reordered = torch.cat([atlas[:, 1:], atlas[:, :1]], dim=1)
        return torch.cat([self.dropout2(x), reordered], dim=1)

    def classify(self, head_features: torch.Tensor) -> torch.Tensor:
        """Class scores (B×15 logits, output-class order) from the 555-d head features."""
        return self.classifier(self.fc2_act(self.fc2(head_features)))

    def head(self, path_features: torch.Tensor, atlas: torch.Tensor) -> torch.Tensor:
        """Logits from path features and the atlas prior (everything after the paths)."""
        return self.classify(self.head_features(path_features, atlas))

    def forward(self, axial, coronal, sagittal, atlas) -> torch.Tensor:
        """B×15 logits from three B×1×32×32 patches and the B×15 atlas prior."""
        return self.head(self.path_features((axial, coronal, sagittal)), atlas)

    def from_conv_features(self, conv_features: torch.Tensor, atlas: torch.Tensor) -> torch.Tensor:
        """B×15 logits from the three paths' conv features and the atlas prior.

        Args:
            conv_features: B×1620, the axial, coronal and sagittal blocks of 540 of
                :meth:`PathNet.conv_features`.
            atlas: B×15 prior, background first.
        """
        blocks = conv_features.split(CONV_FEATURES, dim=1)
        paths = [self.paths[view].fully_connected(x) for view, x in zip(VIEWS, blocks, strict=True)]
        return self.head(torch.cat(paths, dim=1), atlas)


NETWORKS = {f"{__name__}.{cls.__qualname__}": cls for cls in (SubcorticalNet,)}
"""The networks a checkpoint may name, by their config's ``_target_``."""


def build_network(config: dict) -> nn.Module:
    """The network a saved config (:meth:`SubcorticalNet.config`) describes, freshly initialised.

    Only the networks of :data:`NETWORKS` are built: a checkpoint from elsewhere names a class,
    and building whatever it names would run any code it likes (Hydra's ``instantiate`` would).

    Raises:
        ValueError: the config names another class, or arguments that class does not take.
    """
    settings = dict(config)
    target = settings.pop("_target_", None)
    if target not in NETWORKS:
        raise ValueError(f"the network {target!r} is not one of {', '.join(NETWORKS)}")
    return NETWORKS[target](**settings)


def count_trainable(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
