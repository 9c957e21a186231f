"""Fine-tuning epoch time with the frozen conv features cached against running the patches.

One labelled synthetic target subject (0.94 x 0.94 x 1.5 mm, the paper's TL-1 case): every
structure voxel and as many shell voxels, split 75/25, the `paper` freeze preset (conv blocks
frozen with BatchNorm in eval mode, classifier reset, FC layers trained). Both paths train one
epoch from the same weights and seed: the patch path runs the frozen conv stacks on every
batch, the cached path computes their outputs once (densely) and trains only the FC layers.
Reports both epoch times, the one-off feature cost, the ratio and the loss difference after the
epoch. The paper needed 8 s per epoch for one image on a TITAN X GPU.
"""

import time

import lightning as L
import numpy as np
import torch
from common import record
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from subseg import data, io, labels, synth, transfer
from subseg.lit_module import SegmentationModule


class _EpochTimer(L.Callback):
    def on_train_epoch_start(self, trainer, module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        self.seconds = time.perf_counter() - self.start


def _epoch(samples, cached: bool) -> tuple[float, float, float, int]:
    torch.manual_seed(0)
    module = SegmentationModule(dropout=0.3, lr=1e-4)
    preset = transfer.FreezePreset.from_config(OmegaConf.load("conf/freeze/paper.yaml"))
    transfer.reset_layers(module.net, preset)
    features_seconds = 0.0
    if cached:
        start = time.perf_counter()
        pooled = data.FeatureDataset(
            transfer.conv_features_of(module.net, samples), samples.prior, samples.targets
        )
        features_seconds = time.perf_counter() - start
    else:
        pooled = data.PatchDataset([samples])
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
            pooled.subset(indices), batch_size=128, shuffle=shuffle, collate_fn=data.collate_batch
        )

    trainer.fit(module, loader(train_idx, True), loader(val_idx, False))
    loss = float(trainer.callback_metrics["val_loss"])
    return timer.seconds, features_seconds, loss, len(train_idx)


def main() -> None:
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

    t_patch, _, loss_patch, n_train = _epoch(samples, cached=False)
    t_cached, t_features, loss_cached, _ = _epoch(samples, cached=True)
    record(
        "finetune_epoch_cached_vs_patches",
        {
            "compared": f"one TL-1 fine-tuning epoch (freeze=paper, {n_train} training voxels "
            f"of one {image.data.shape} target subject, batch 128): frozen conv features "
            "cached (computed once, densely) vs patches through the frozen conv stacks",
            "seconds_epoch_patches": round(t_patch, 2),
            "seconds_epoch_cached": round(t_cached, 2),
            "seconds_features_once": round(t_features, 2),
            "ratio_epoch_patches_over_cached": round(t_patch / t_cached, 1),
            "val_loss_patches": loss_patch,
            "val_loss_cached": loss_cached,
            "max_abs_loss_difference": abs(loss_patch - loss_cached),
            "paper_gpu_seconds_per_epoch_one_image": 8,
        },
    )


if __name__ == "__main__":
    main()
