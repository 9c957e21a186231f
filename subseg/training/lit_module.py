"""Lightning wrapper around the network: loss, optimiser, metrics, whole-volume validation.

The network itself (:mod:`subseg.model.network`) knows nothing of Lightning; this module holds what
a training run needs around it: cross-entropy on patch batches, the injected optimiser and
scheduler, voxel accuracy, and a callback that segments held-out subjects every few epochs and
logs per-structure Dice.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassStatScores

from subseg.core import sharding
from subseg.core.labels import NUM_CLASSES, STRUCTURES
from subseg.evaluation.metrics import dice_per_structure
from subseg.model import inference
from subseg.model.network import VIEWS
from subseg.preprocessing import atlas
from subseg.runs.trained_model import NETWORK_KEY

STAGES = ("train", "val")


class SegmentationModule(L.LightningModule):
    """Trains a network (:class:`subseg.model.network.SubcorticalNet`) on patch batches.

    Built by Hydra from ``conf/model``: the network, the optimiser and the scheduler are each a
    ``_target_`` config, injected here (the optimiser and scheduler as ``_partial_`` callables,
    completed with the trainable parameters and the optimiser).

    Args:
        net: the network.
        optimizer: called with the trainable parameters, gives the optimiser.
        scheduler: called with the optimiser, gives a learning-rate scheduler; ``None``: none.
        scheduler_monitor: the logged value a ``ReduceLROnPlateau`` scheduler watches.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., object] | None = None,
        scheduler_monitor: str = "val_loss",
    ):
        super().__init__()
        self.net = net
        self.optimizer, self.scheduler = optimizer, scheduler
        self.scheduler_monitor = scheduler_monitor
        # Per-class counts over the validation samples, summed across DDP ranks by torchmetrics.
        self.val_counts = MulticlassStatScores(NUM_CLASSES, average="none")
        # Epoch means of the loss and accuracy, weighted by batch size and reduced across DDP
        # ranks by torchmetrics. Lightning's own epoch aggregation (self.log on every step)
        # costs about 0.5 ms a call: a seventh of a fine-tuning epoch on cached features.
        self.epoch_means = nn.ModuleDict(
            {f"{stage}_{what}": MeanMetric() for stage in STAGES for what in ("loss", "acc")}
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Save the network's config beside its weights: the checkpoint alone rebuilds it."""
        checkpoint[NETWORK_KEY] = self.net.config()

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits (B×15) of a batch of :mod:`subseg.training.samples` (patches or conv features)."""
        if "features" in batch:  # frozen conv stacks, their outputs cached
            return self.net.from_conv_features(batch["features"], batch["prior"])
        return self.net(*(batch[view] for view in VIEWS), batch["prior"])

    def _step(self, batch: dict, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) of one batch; its loss and accuracy enter the epoch means."""
        logits = self(batch)
        loss = F.cross_entropy(logits, batch["target"])
        accuracy = (logits.argmax(dim=1) == batch["target"]).float().mean()
        size = len(batch["target"])
        self.epoch_means[f"{stage}_loss"].update(loss.detach(), weight=size)
        self.epoch_means[f"{stage}_acc"].update(accuracy, weight=size)
        return loss, logits

    def _log_epoch_means(self, stage: str) -> None:
        """Log and reset the epoch means: ``train_loss_epoch``, ``train_acc_epoch``, ``val_*``."""
        suffix = "_epoch" if stage == "train" else ""
        for what in ("loss", "acc"):
            mean = self.epoch_means[f"{stage}_{what}"]
            self.log(f"{stage}_{what}{suffix}", mean.compute(), prog_bar=what == "loss")
            mean.reset()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Cross-entropy on one batch (its loss logged for the progress bar and the logger)."""
        loss = self._step(batch, "train")[0]
        self.log("train_loss_step", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_end(self) -> None:
        """Log the training epoch's mean loss and accuracy."""
        self._log_epoch_means("train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Loss and accuracy on the held-out voxels; counts for their per-structure Dice."""
        _, logits = self._step(batch, "val")
        self.val_counts.update(logits.argmax(dim=1), batch["target"])

    def on_validation_epoch_end(self) -> None:
        """Log ``val_sample_dice/<structure>``: Dice over the held-out voxel samples.

        Logged by every fit, fine-tuning included (which has no held-out whole volume); NaN for
        a structure absent from both the samples and the predictions.
        """
        self._log_epoch_means("val")
        tp, fp, _, fn, _ = self.val_counts.compute().double().unbind(dim=1)
        dice = (2 * tp / (2 * tp + fp + fn))[1:]  # 0/0 is NaN: nothing to score
        self.val_counts.reset()
        for name, value in zip(STRUCTURES, dice.tolist(), strict=True):
            self.log(f"val_sample_dice/{name}", value)
        self.log("val_sample_dice_mean", float(np.nanmean(dice.numpy())))

    def configure_optimizers(self):
        """The configured optimiser over the trainable parameters (fine-tuning freezes some).

        Adam's fused kernel is asked for on the CPU and CUDA unless the config says otherwise:
        one pass over all tensors instead of a loop over each; it differs from the loop in float
        rounding only (bench/bench_transfer.py). A config cannot know the device, so this is
        decided here.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        extra = {}
        keywords = getattr(self.optimizer, "keywords", {})
        if "fused" in inspect.signature(self.optimizer).parameters and "fused" not in keywords:
            extra["fused"] = all(p.device.type in ("cpu", "cuda") for p in params)
        optimizer = self.optimizer(params, **extra)
        if self.scheduler is None:
            return optimizer
        scheduler = {"scheduler": self.scheduler(optimizer), "monitor": self.scheduler_monitor}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


@dataclass
class VolumeSubject:
    """A held-out subject for whole-volume validation."""

    id: str
    volume: np.ndarray
    prior: atlas.Prior
    classes: np.ndarray


class VolumeDice(L.Callback):
    """Every few epochs, segment held-out subjects whole and log per-structure Dice.

    In a DDP job every rank segments its share of the subjects and the scores are gathered, so
    the logged numbers are those one process gets with the same weights.

    Args:
        subjects: held-out subjects (volume, prior, true classes); ``None``: the fit's
            ``PatchData`` volumes, known once it is set up.
        every_n_epochs: how often.
    """

    def __init__(self, subjects: Sequence[VolumeSubject] | None = None, every_n_epochs: int = 1):
        self.subjects = None if subjects is None else list(subjects)
        self.every = max(1, every_n_epochs)

    def setup(self, trainer: L.Trainer, module: SegmentationModule, stage: str) -> None:
        """Take the held-out volumes from the trainer's data module when none were given."""
        datamodule = getattr(trainer, "datamodule", None)
        if self.subjects is None and getattr(datamodule, "fit_data", None) is not None:
            self.subjects = list(datamodule.fit_data.volumes)

    def on_validation_epoch_end(self, trainer: L.Trainer, module: SegmentationModule) -> None:
        """Segment, compute Dice, log ``val_dice/<structure>`` and ``val_dice_mean``."""
        if trainer.sanity_checking or not self.subjects:
            return
        if (trainer.current_epoch + 1) % self.every and not trainer.should_stop:
            return
        was_training = module.training
        module.eval()
        mine = sharding.shard(self.subjects, trainer.global_rank, trainer.world_size)
        scores = [
            dice_per_structure(inference.segment(module.net, s.volume, s.prior)[0], s.classes)
            for s in mine
        ]
        module.train(was_training)
        mean = np.nanmean(np.stack(sharding.gather_shards(scores, trainer.world_size)), axis=0)
        # Every rank holds the gathered numbers already: logging them needs no further sync.
        for name, value in zip(STRUCTURES, mean, strict=True):
            module.log(f"val_dice/{name}", float(value))
        module.log("val_dice_mean", float(np.nanmean(mean)), prog_bar=True)
