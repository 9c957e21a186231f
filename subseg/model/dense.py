"""Exact dense (fully convolutional) evaluation of the patch network (docs/method.md §3).

A path's dense 540 → 180 layer is a 3×3 convolution on the stride-4 grid, so the whole path can
run over entire slices. With the à trous conversion — pool1 2×2 at stride 1, conv3/conv4 with
dilation 2, pool2 2×2 with dilation 2 at stride 1, conv5 and the dense layer (as a 3×3 conv)
with dilation 4 — every output pixel equals the patch network's output for the patch centred
there, borders included (slices padded 16 before and 15 after, as patches are). BatchNorm is
folded into the convolutions on the fly from the model's own parameters and running statistics:
no weight copy exists that could drift from the model. The head is a per-voxel network.

Per voxel this costs ≈20× fewer multiply-adds than patches (docs/method.md §3) and never
materialises the N×3×32×32 patch tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from subseg.model.network import CONV_FEATURES, PATH_FEATURES, VIEWS, PathNet, SubcorticalNet
from subseg.model.patches import AFTER, BEFORE, VIEW_AXES, pad_volume


def _folded(block: torch.nn.Sequential) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, bias, PReLU slopes) of a conv + BatchNorm (eval) + PReLU block, BN folded in."""
    conv, norm, act = block
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    weight = conv.weight * scale[:, None, None, None]
    bias = norm.bias - norm.running_mean * scale
    return weight, bias, act.weight


def _conv_stack(path: PathNet, slices: torch.Tensor) -> torch.Tensor:
    """The à trous convolution stack: B×60×(H+8)×(W+8) conv5 maps (dense layer not applied)."""
    if path.training:
        raise RuntimeError("dense evaluation needs eval mode (BatchNorm statistics, no dropout)")
    x = slices
    dilations = (1, 1, 2, 2, 4)
    for index, (block, dilation) in enumerate(zip(path.conv_blocks(), dilations, strict=True)):
        weight, bias, slope = _folded(block)
        x = F.prelu(F.conv2d(x, weight, bias, dilation=dilation), slope)
        if index == 1:
            x = F.max_pool2d(x, 2, stride=1)
        elif index == 3:
            x = F.max_pool2d(x, 2, stride=1, dilation=2)
    return x


def path_dense(path: PathNet, slices: torch.Tensor) -> torch.Tensor:
    """Evaluate one path densely.

    Args:
        path: a path of the network, in eval mode.
        slices: B×1×(H+31)×(W+31) slices, padded 16 before and 15 after in-plane.

    Returns:
        B×180×H×W: pixel (i, j) holds the path's output for the patch centred on (i, j).
    """
    x = _conv_stack(path, slices)
    weight = path.dense.weight.view(PATH_FEATURES, -1, 3, 3)
    return F.prelu(F.conv2d(x, weight, path.dense.bias, dilation=4), path.dense_act.weight)


def path_conv_dense(path: PathNet, slices: torch.Tensor) -> torch.Tensor:
    """The conv features of every pixel (:meth:`PathNet.conv_features`), densely.

    Args:
        path: a path of the network, in eval mode.
        slices: B×1×(H+31)×(W+31) slices, padded as in :func:`path_dense`.

    Returns:
        B×540×H×W: the 60 × 3 × 3 conv5 values the dense layer of pixel (i, j)'s patch sees,
        in ``flatten`` order (channel, row, column).
    """
    x = _conv_stack(path, slices)
    height, width = x.shape[-2] - 8, x.shape[-1] - 8
    # unfold orders its output (channel, kernel row, kernel column), as flatten(1) of B×60×3×3.
    return F.unfold(x, kernel_size=3, dilation=4).view(len(x), -1, height, width)


@torch.no_grad()
def dense_path_features(
    model: SubcorticalNet, volume: torch.Tensor, roi: torch.Tensor
) -> torch.Tensor:
    """The concatenated path features (N×540) of every ROI voxel, evaluated densely.

    Each view runs over the volume's slices along its own axis, one slice at a time, each
    cropped to the bounding box of its ROI voxels (plus the patch context); slices without ROI
    voxels are skipped and only ROI voxels are kept.

    Args:
        model: the network, in eval mode.
        volume: X×Y×Z z-scored volume (canonical orientation).
        roi: X×Y×Z boolean mask of the voxels to evaluate.

    Returns:
        N×540 features in the order of ``torch.nonzero(roi)`` (axial, coronal, sagittal blocks).
    """
    return _per_voxel(model, volume, roi, path_dense, PATH_FEATURES)


@torch.no_grad()
def dense_conv_features(
    model: SubcorticalNet, volume: torch.Tensor, roi: torch.Tensor
) -> torch.Tensor:
    """The three paths' conv features (N×1620) of every ROI voxel, evaluated densely.

    What :meth:`SubcorticalNet.from_conv_features` takes: with the convolutions frozen,
    fine-tuning computes these once and trains only the fully-connected layers on them.

    Args:
        model: the network, in eval mode.
        volume: X×Y×Z z-scored volume (canonical orientation).
        roi: X×Y×Z boolean mask of the voxels to evaluate.

    Returns:
        N×1620 in the order of ``torch.nonzero(roi)`` (axial, coronal, sagittal blocks of 540).
    """
    return _per_voxel(model, volume, roi, path_conv_dense, CONV_FEATURES)


def _per_voxel(model, volume, roi, evaluate, width: int) -> torch.Tensor:
    device = next(model.parameters()).device
    volume = volume.to(device=device, dtype=torch.float32)
    roi = roi.to(device=device, dtype=torch.bool)
    padded = pad_volume(volume)
    rows = torch.full(roi.shape, -1, dtype=torch.long, device=device)
    rows[roi] = torch.arange(int(roi.sum()), device=device)
    out = torch.empty((int(roi.sum()), width * len(VIEWS)), device=device)
    context = BEFORE + AFTER
    for v, view in enumerate(VIEWS):
        fixed = VIEW_AXES[view][0]
        path = model.paths[view]
        columns = slice(v * width, (v + 1) * width)
        # Moving the fixed axis first leaves (row, column) in ascending axis order, as patches.
        planes, targets = padded.movedim(fixed, 0), rows.movedim(fixed, 0)
        for index in torch.nonzero(roi.movedim(fixed, 0).flatten(1).any(dim=1)).flatten().tolist():
            target = targets[index]
            (r0, c0), (r1, c1) = _extent(target >= 0)
            crop = planes[index + BEFORE, r0 : r1 + context, c0 : c1 + context]
            # Fastest on CPU: one slice at a time, channels-last
            # (docs/engineering.md#dense-evaluation-on-cpu).
            features = evaluate(
                path, crop[None, None].contiguous(memory_format=torch.channels_last)
            )
            inside = target[r0:r1, c0:c1]
            keep = inside >= 0
            out[inside[keep], columns] = features[0].permute(1, 2, 0)[keep]
    return out


def _extent(mask: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    """Low (inclusive) and high (exclusive) corners of a 2-D mask's bounding box."""
    index = torch.nonzero(mask)
    return tuple(index.min(dim=0).values.tolist()), tuple((index.max(dim=0).values + 1).tolist())


@torch.no_grad()
def dense_probabilities(
    model: SubcorticalNet,
    volume: torch.Tensor,
    roi: torch.Tensor,
    atlas: torch.Tensor,
    voxels_per_batch: int = 65536,
) -> torch.Tensor:
    """Class probabilities (N×15) of every ROI voxel, evaluated densely.

    Args:
        model: the network, in eval mode.
        volume: X×Y×Z z-scored volume (canonical orientation).
        roi: X×Y×Z boolean mask.
        atlas: N×15 atlas prior of the ROI voxels (order of ``torch.nonzero(roi)``, background
            first).
        voxels_per_batch: voxels per head evaluation.

    Returns:
        N×15 softmax probabilities, background first.
    """
    features = dense_path_features(model, volume, roi)
    atlas = atlas.to(features.device, torch.float32)
    return torch.cat(
        [
            torch.softmax(model.head(chunk, atlas[i : i + voxels_per_batch]), dim=1)
            for i, chunk in zip(
                range(0, len(features), voxels_per_batch),
                features.split(voxels_per_batch),
                strict=True,
            )
        ]
    )
