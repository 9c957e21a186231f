"""Fine-tuning epoch time with the frozen conv features cached against running the patches.

One labelled synthetic target subject (0.94 x 0.94 x 1.5 mm, the paper's TL-1 case): every
structure voxel and as many shell voxels, split 75/25, the `paper` freeze preset (conv blocks
frozen with BatchNorm in eval mode, classifier reset, FC layers trained), batch 128, lr 1e-4,
dropout 0.3. Every epoch starts from the same weights and seed and includes its validation pass;
torch's default threads throughout.

- patches: ``SegmentationModule`` on patch batches: the frozen conv stacks run on every batch.
- cached, before: the cached path as it was before issue #12: batches gathered by indexing with
  a tensor, Adam's per-tensor loop, every step's loss and accuracy logged through Lightning's
  epoch aggregation.
- cached: ``SegmentationModule`` on ``subseg.training.samples.FeatureDataset`` as fine-tuning runs
  it now: batches gathered with ``index_select``, Adam's fused kernel, epoch means in torchmetrics,
  and dropout masks from ``torch.rand`` (``subseg.model.network.Dropout``).

The three run alternately, ``REPEATS`` times each, and the medians are reported: the machine is
often shared or slowed for a spell, which would otherwise move the ratio. The patch epoch is
timed on ``PATCH_FRACTION`` of its training and validation batches and scaled to the whole
epoch (its cost per batch is constant; a whole patch epoch takes about 50 s). The new dropout
draws other masks than torch's, so the loss curves are compared as two seeds are: the epoch's
mean training loss and its validation loss, now and before, against the old code run with
another seed. That the cached path trains exactly as the patches do is tested
(tests/training/test_transfer.py). About 1.5 min on 2 quiet cores. The paper needed
8 s per epoch for one image on a TITAN X GPU.
"""

import os
import statistics
import time
from functools import partial

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from common import record
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from subseg.core import io, labels
from subseg.data import synth
from subseg.model import network
from subseg.training import transfer
from subseg.training.lit_module import SegmentationModule
from subseg.training.samples import (
    FeatureDataset,
    PatchDataset,
    SubjectSamples,
    collate_batch,
    sample_voxels,
    split_indices,
)

REPEATS = 3
BATCH = 128
PATCH_FRACTION = 0.25  # of the patch epoch's batches timed (scaled up): a whole one takes ~50 s


class _EpochTimer(L.Callback):
    """Seconds of the training epoch (with its validation) and the loss of every step."""

    def on_train_epoch_start(self, trainer, module):
        self.losses = []
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())

    def on_train_epoch_end(self, trainer, module):
        self.seconds = time.perf_counter() - self.start


class _IndexedFeatures(FeatureDataset):
    """Feature batches gathered as they were: indexing with a tensor."""

    def __getitems__(self, indices):
        rows = self.indices[torch.as_tensor(indices, dtype=torch.long)]
        return {
            "features": self.features[rows].float(),
            "prior": self.prior[rows],
            "target": self.targets[rows],
        }


class _Before(SegmentationModule):
    """The module as it was: torch's own dropout (``bernoulli_`` masks), Adam's per-tensor loop,
    and every step's loss and accuracy logged through Lightning's own epoch aggregation
    (``self.log(on_step=True, on_epoch=True)``)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for parent in self.net.modules():
            for name, child in parent.named_children():
                if isinstance(child, network.Dropout):
                    setattr(parent, name, nn.Dropout(child.p))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.hparams.lr)

    def _step(self, batch: dict, stage: str):
        logits = self(batch)
        loss = F.cross_entropy(logits, batch["target"])
        accuracy = (logits.argmax(dim=1) == batch["target"]).float().mean()
        train = stage == "train"
        options = dict(batch_size=len(logits), on_step=train, on_epoch=True, sync_dist=not train)
        self.log(f"{stage}_loss", loss, prog_bar=True, **options)
        self.log(f"{stage}_acc", accuracy, prog_bar=not train, **options)
        return loss, logits

    def training_step(self, batch: dict, batch_idx: int):
        return self._step(batch, "train")[0]

    def _log_epoch_means(self, stage: str) -> None:
        pass  # logged by Lightning


VARIANTS = {
    # name: (module class, dataset class of cached features)
    "patches": (SegmentationModule, None),
    "before": (_Before, _IndexedFeatures),
    "cached": (SegmentationModule, FeatureDataset),
}


def _epoch(pooled, variant: str, fraction: float = 1.0, seed: int = 1) -> dict:
    """Train one epoch of ``variant`` on ``pooled``: seconds, step losses, validation loss.

    With ``fraction`` < 1 only that share of the training and validation batches runs, and
    ``seconds`` is scaled to the whole epoch by the number of training batches.
    """
    module_class, dataset_class = VARIANTS[variant]
    if dataset_class is not None:
        pooled = dataset_class(pooled.features, pooled.prior, pooled.targets)
    torch.manual_seed(0)
    module = module_class(dropout=0.3, lr=1e-4)
    preset = transfer.FreezePreset.from_config(OmegaConf.load("conf/freeze/paper.yaml"))
    transfer.reset_layers(module.net, preset)
    train_idx, val_idx = split_indices(len(pooled), 0.25, np.random.default_rng(0))
    timer = _EpochTimer()
    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[transfer.FreezeSchedule(preset), timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
        limit_train_batches=fraction,
        limit_val_batches=fraction,
    )

    def loader(indices, shuffle):
        return DataLoader(
            pooled.subset(indices), batch_size=BATCH, shuffle=shuffle, collate_fn=collate_batch
        )

    train_loader = loader(train_idx, True)
    trainer.fit(module, train_loader, loader(val_idx, False))
    return {
        "seconds": timer.seconds * len(train_loader) / len(timer.losses),
        "losses": torch.stack(timer.losses),
        "val_loss": float(trainer.callback_metrics["val_loss"]),
        "train_loss": float(trainer.callback_metrics["train_loss_epoch"]),
        "n_train": len(train_idx),
    }


def _subject() -> tuple[SubjectSamples, tuple]:
    """The bench's target subject, sampled as docs/method.md §4 says (a flat prior)."""
    params = synth.CohortParams(domain="target", n_subjects=1, seed=7)
    root = synth.ensure_cohort("outputs/bench/target_subject", params, progress=False)
    image = io.load_image(root / "images" / "t000.nii.gz")
    raw = io.load_label(root / "labels" / "t000.nii.gz", image=image).data
    classes = labels.map_to_classes(raw, "aseg")
    brain = image.data[image.data != 0]
    volume = torch.from_numpy((image.data - brain.mean()) / brain.std()).float()
    volume[torch.from_numpy(image.data == 0)] = 0
    coords, targets = sample_voxels(classes, np.random.default_rng(0))
    prior = np.zeros((len(coords), 15), np.float32)
    prior[:, 0] = 1.0  # the prior's values do not change the cost
    samples = SubjectSamples(
        volume, torch.from_numpy(coords), torch.from_numpy(targets), torch.from_numpy(prior)
    )
    return samples, image.data.shape


def _cached_dataset(samples) -> tuple[FeatureDataset, float]:
    """The frozen conv features of every sample, and the seconds they took (once per fit)."""
    torch.manual_seed(0)
    module = SegmentationModule(network.SubcorticalNet(0.3), partial(torch.optim.Adam, lr=1e-4))
    start = time.perf_counter()
    features = transfer.conv_features_of(module.net, samples)
    seconds = time.perf_counter() - start
    return FeatureDataset(features, samples.prior, samples.targets), seconds


def main() -> None:
    samples, shape = _subject()
    load_before = os.getloadavg()[0]
    patched = PatchDataset([samples])
    pooled, t_features = _cached_dataset(samples)
    runs = {name: [] for name in ("patches", "before", "cached")}
    for _ in range(REPEATS):  # alternately, so that a slow spell of the machine hits all alike
        runs["patches"].append(_epoch(patched, "patches", PATCH_FRACTION))
        for name in ("before", "cached"):
            runs[name].append(_epoch(pooled, name))
    seconds = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    before, cached = runs["before"][0], runs["cached"][0]
    # Other dropout masks: the same loss curve means as close as two seeds of the old code.
    reseeded = _epoch(pooled, "before", seed=2)
    curve = {
        name: {"train_loss_epoch": round(r["train_loss"], 5), "val_loss": round(r["val_loss"], 5)}
        for name, r in (("before", before), ("before_seed_2", reseeded), ("cached", cached))
    }
    record(
        "finetune_epoch_cached_vs_patches",
        {
            "compared": f"one TL-1 fine-tuning epoch with its validation (freeze=paper, "
            f"{before['n_train']} training voxels of one {shape} target subject, batch {BATCH}, "
            f"{torch.get_num_threads()} torch threads): patches through the frozen conv stacks "
            "vs the frozen conv features cached (computed once, densely), as fine-tuning runs "
            "them now (cached) and before issue #12 (before: torch's bernoulli dropout, tensor "
            "indexing, Adam's loop, Lightning's per-step epoch aggregation); the patch epoch "
            "timed on "
            f"{PATCH_FRACTION:.0%} of its batches and scaled; medians of {REPEATS} alternating "
            "repeats",
            "seconds_epoch_patches": round(seconds["patches"], 2),
            "seconds_epoch_cached_before": round(seconds["before"], 2),
            "seconds_epoch_cached": round(seconds["cached"], 2),
            "seconds_each_repeat": {
                name: [round(r["seconds"], 2) for r in rs] for name, rs in runs.items()
            },
            "seconds_features_once": round(t_features, 2),
            "ratio_epoch_patches_over_cached": round(seconds["patches"] / seconds["cached"], 1),
            "ratio_epoch_cached_before_over_cached": round(
                seconds["before"] / seconds["cached"], 2
            ),
            "losses": curve,
            "train_loss_difference_cached_vs_before": round(
                abs(cached["train_loss"] - before["train_loss"]), 5
            ),
            "train_loss_difference_seed_2_vs_seed_1": round(
                abs(reseeded["train_loss"] - before["train_loss"]), 5
            ),
            "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
            "paper_gpu_seconds_per_epoch_one_image": 8,
        },
    )


if __name__ == "__main__":
    main()
