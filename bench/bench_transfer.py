"""Fine-tuning epoch time with the frozen conv features cached against running the patches.

One labelled synthetic target subject (0.94 x 0.94 x 1.5 mm, the paper's TL-1 case): every
structure voxel and as many shell voxels, split 75/25, the `paper` freeze preset (conv blocks
frozen with BatchNorm in eval mode, classifier reset, FC layers trained), batch 128, lr 1e-4,
dropout 0.3. Every epoch starts from the same weights and seed and includes its validation pass;
torch's default threads throughout.

- patches: ``SegmentationModule`` on patch batches: the frozen conv stacks run on every batch.
- cached, before: the cached path as it was before issue #12: batches gathered by indexing with
  a tensor, Adam's per-tensor loop.
- cached: ``SegmentationModule`` on ``subseg.data.FeatureDataset`` as fine-tuning runs it now:
  batches gathered with ``index_select``, Adam's fused kernel.

The two cached variants run alternately, ``REPEATS`` times each, and the medians are reported:
the machine is often shared, and a burst of load on one side only would move the ratio. Each
epoch's per-step training losses are compared with the previous code's (the same batches and
dropout masks: they differ by Adam's float rounding only), and the validation loss with the
patches'. About 2 min on 2 quiet cores, most of it the patch epoch. The paper needed 8 s per
epoch for one image on a TITAN X GPU.
"""

import os
import statistics
import time

import lightning as L
import numpy as np
import torch
from common import record
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from subseg import data, io, labels, synth, transfer
from subseg.lit_module import SegmentationModule

REPEATS = 3
BATCH = 128


class _EpochTimer(L.Callback):
    """Seconds of the training epoch (with its validation) and the loss of every step."""

    def on_train_epoch_start(self, trainer, module):
        self.losses = []
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())

    def on_train_epoch_end(self, trainer, module):
        self.seconds = time.perf_counter() - self.start


class _IndexedFeatures(data.FeatureDataset):
    """Feature batches gathered as they were: indexing with a tensor."""

    def __getitems__(self, indices):
        rows = self.indices[torch.as_tensor(indices, dtype=torch.long)]
        return {
            "features": self.features[rows].float(),
            "prior": self.prior[rows],
            "target": self.targets[rows],
        }


class _StockAdam(SegmentationModule):
    """Adam as it was: its loop over the parameter tensors."""

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.hparams.lr)


VARIANTS = {
    # name: (module class, dataset class of cached features)
    "patches": (SegmentationModule, None),
    "before": (_StockAdam, _IndexedFeatures),
    "cached": (SegmentationModule, data.FeatureDataset),
}


def _epoch(pooled, variant: str) -> dict:
    """Train one epoch of ``variant`` on ``pooled``: seconds, step losses, validation loss."""
    module_class, dataset_class = VARIANTS[variant]
    if dataset_class is not None:
        pooled = dataset_class(pooled.features, pooled.prior, pooled.targets)
    torch.manual_seed(0)
    module = module_class(dropout=0.3, lr=1e-4)
    preset = transfer.FreezePreset.from_config(OmegaConf.load("conf/freeze/paper.yaml"))
    transfer.reset_layers(module.net, preset)
    train_idx, val_idx = data.split_indices(len(pooled), 0.25, np.random.default_rng(0))
    timer = _EpochTimer()
    L.seed_everything(1, verbose=False)
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[transfer.FreezeSchedule(preset), timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )

    def loader(indices, shuffle):
        return DataLoader(
            pooled.subset(indices), batch_size=BATCH, shuffle=shuffle, collate_fn=data.collate_batch
        )

    trainer.fit(module, loader(train_idx, True), loader(val_idx, False))
    return {
        "seconds": timer.seconds,
        "losses": torch.stack(timer.losses),
        "val_loss": float(trainer.callback_metrics["val_loss"]),
        "n_train": len(train_idx),
    }


def _subject() -> tuple[data.SubjectSamples, tuple]:
    """The bench's target subject, sampled as docs/method.md §4 says (a flat prior)."""
    params = synth.CohortParams(domain="target", n_subjects=1, seed=7)
    root = synth.ensure_cohort("outputs/bench/target_subject", params, progress=False)
    image = io.load_image(root / "images" / "t000.nii.gz")
    raw = io.load_label(root / "labels" / "t000.nii.gz", image=image).data
    classes = labels.map_to_classes(raw, "aseg")
    brain = image.data[image.data != 0]
    volume = torch.from_numpy((image.data - brain.mean()) / brain.std()).float()
    volume[torch.from_numpy(image.data == 0)] = 0
    coords, targets = data.sample_voxels(classes, np.random.default_rng(0))
    prior = np.zeros((len(coords), 15), np.float32)
    prior[:, 0] = 1.0  # the prior's values do not change the cost
    samples = data.SubjectSamples(
        volume, torch.from_numpy(coords), torch.from_numpy(targets), torch.from_numpy(prior)
    )
    return samples, image.data.shape


def _cached_dataset(samples) -> tuple[data.FeatureDataset, float]:
    """The frozen conv features of every sample, and the seconds they took (once per fit)."""
    torch.manual_seed(0)
    module = SegmentationModule(dropout=0.3, lr=1e-4)
    start = time.perf_counter()
    features = transfer.conv_features_of(module.net, samples)
    seconds = time.perf_counter() - start
    return data.FeatureDataset(features, samples.prior, samples.targets), seconds


def _loss_difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Largest absolute and relative difference between two step-loss curves."""
    if len(a) != len(b):
        raise RuntimeError(f"the epochs took {len(a)} and {len(b)} steps")
    diff = (a - b).abs()
    return {"abs": float(diff.max()), "rel": float((diff / b.abs()).max())}


def main() -> None:
    samples, shape = _subject()
    load_before = os.getloadavg()[0]
    patches = _epoch(data.PatchDataset([samples]), "patches")
    pooled, t_features = _cached_dataset(samples)
    runs = {name: [] for name in ("before", "cached")}
    for _ in range(REPEATS):  # alternately, so that a burst of load hits both alike
        for name, results in runs.items():
            results.append(_epoch(pooled, name))
    seconds = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    before, cached = runs["before"][0], runs["cached"][0]
    steps = _loss_difference(cached["losses"], before["losses"])
    record(
        "finetune_epoch_cached_vs_patches",
        {
            "compared": f"one TL-1 fine-tuning epoch with its validation (freeze=paper, "
            f"{patches['n_train']} training voxels of one {shape} target subject, batch {BATCH}, "
            f"{torch.get_num_threads()} torch threads): patches through the frozen conv stacks "
            "vs the frozen conv features cached (computed once, densely), as fine-tuning runs "
            "them now (cached) and before issue #12 (before: tensor indexing, Adam's loop); "
            f"medians of {REPEATS} alternating repeats",
            "seconds_epoch_patches": round(patches["seconds"], 2),
            "seconds_epoch_cached_before": round(seconds["before"], 2),
            "seconds_epoch_cached": round(seconds["cached"], 2),
            "seconds_each_repeat": {
                name: [round(r["seconds"], 2) for r in rs] for name, rs in runs.items()
            },
            "seconds_features_once": round(t_features, 2),
            "ratio_epoch_patches_over_cached": round(patches["seconds"] / seconds["cached"], 1),
            "ratio_epoch_cached_before_over_cached": round(
                seconds["before"] / seconds["cached"], 2
            ),
            "steps_compared": len(before["losses"]),
            "max_abs_step_loss_difference_cached_vs_before": steps["abs"],
            "max_rel_step_loss_difference_cached_vs_before": steps["rel"],
            "val_loss_patches": patches["val_loss"],
            "val_loss_cached": cached["val_loss"],
            "max_abs_val_loss_difference_patches_vs_cached": abs(
                patches["val_loss"] - cached["val_loss"]
            ),
            "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
            "paper_gpu_seconds_per_epoch_one_image": 8,
        },
    )


if __name__ == "__main__":
    main()
