"""Fine-tuning epoch time with the frozen conv features cached against running the patches.

One labelled synthetic target subject (0.94 x 0.94 x 1.5 mm, the paper's TL-1 case): every
structure voxel and as many shell voxels, split 75/25, the `paper` freeze preset (conv blocks
frozen with BatchNorm in eval mode, classifier reset, FC layers trained), batch 128, lr 1e-4,
dropout 0.3. Every epoch starts from the same weights and seed and includes its validation pass.

- patches: the frozen conv stacks run on every batch (torch's default threads).
- cached, baseline: the cached path as it was: the network's own dropout layers, batches
  gathered by tensor indexing, torch's default threads, stock Adam.
- cached, baseline on one thread: the same with one torch thread.
- cached, exact: one torch thread, the dropout noise drawn a step ahead on the other core
  (:class:`subseg.model.DropoutNoise`, bit-identical to torch's dropout), batches gathered with
  ``index_select`` (:class:`subseg.data.FeatureDataset`).
- cached, fast: exact plus Adam's fused CPU kernel (float rounding differs, nothing else) and
  the training loss and accuracy logged only when the logger writes (their epoch means the same).

Threads, Adam's kernel and the logging are proposals for the fit's own code and settings
(``subseg.lit_module``, ``conf/trainer``), prototyped here. The cached variants run
alternately, ``REPEATS`` times each, and the medians are reported: the machine is often shared,
and 2 torch threads on 2 busy cores slow down many times over. Each epoch's per-step training
losses are compared with the baseline's (the same batches and dropout masks). About 3.5 min on
2 quiet cores, most of it the patch epoch. The paper needed 8 s per epoch for one image on a
TITAN X GPU.
"""

import contextlib
import os
import statistics
import time

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from common import record
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from subseg import data, io, labels, synth, transfer
from subseg.lit_module import SegmentationModule
from subseg.model import CONV_FEATURES, VIEWS

REPEATS = 3
BATCH = 128


class _EpochTimer(L.Callback):
    """Seconds of the training epoch (with its validation) and the loss of every step.

    Also the CPU seconds of the main thread: on one torch thread, what the epoch takes on a
    quiet machine (a helper thread's work aside), however busy the machine is now.
    """

    def on_train_epoch_start(self, trainer, module):
        self.losses = []
        self.start, self.start_cpu = time.perf_counter(), time.thread_time()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())

    def on_train_epoch_end(self, trainer, module):
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.thread_time() - self.start_cpu


class _TorchDropout(SegmentationModule):
    """The cached path as it was: the network's dropout layers draw their masks inline."""

    def forward(self, batch: dict) -> torch.Tensor:
        if "features" not in batch:
            return super().forward(batch)
        net = self.net
        blocks = batch["features"].split(CONV_FEATURES, dim=1)
        paths = [net.paths[v].fully_connected(x) for v, x in zip(VIEWS, blocks, strict=True)]
        return net.head(torch.cat(paths, dim=1), batch["prior"])


class _IndexedFeatures(data.FeatureDataset):
    """Feature batches gathered as they were: indexing with a tensor."""

    def __getitems__(self, indices):
        rows = self.indices[torch.as_tensor(indices, dtype=torch.long)]
        return {
            "features": self.features[rows].float(),
            "prior": self.prior[rows],
            "target": self.targets[rows],
        }


class _Proposed(SegmentationModule):
    """``SegmentationModule`` with the changes proposed for it: Adam's fused CPU kernel, and the
    training loss and accuracy logged when the logger writes (their epoch means summed here)."""

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.hparams.lr, fused=True)

    def on_train_epoch_start(self) -> None:
        self._train_sums, self._train_count = torch.zeros(2, device=self.device), 0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        loss = F.cross_entropy(logits, batch["target"])
        accuracy = (logits.argmax(dim=1) == batch["target"]).float().mean()
        size = len(batch["target"])
        self._train_sums = self._train_sums + torch.stack([loss.detach(), accuracy]) * size
        self._train_count += size
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:
            self.log("train_loss_step", loss, prog_bar=True, on_step=True, on_epoch=False)
            self.log("train_acc_step", accuracy, on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_end(self) -> None:
        loss, accuracy = self._train_sums / self._train_count
        self.log("train_loss_epoch", loss)
        self.log("train_acc_epoch", accuracy)


VARIANTS = {
    # name: (module class, dataset class of cached features, torch threads; None = default)
    "patches": (SegmentationModule, None, None),
    "baseline": (_TorchDropout, _IndexedFeatures, None),
    "baseline_1thread": (_TorchDropout, _IndexedFeatures, 1),
    "exact": (SegmentationModule, data.FeatureDataset, 1),
    "fast": (_Proposed, data.FeatureDataset, 1),
}


@contextlib.contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _epoch(pooled, variant: str) -> dict:
    """Train one epoch of ``variant`` on ``pooled``: seconds, step losses, validation loss."""
    module_class, dataset_class, threads = VARIANTS[variant]
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

    with _threads(threads):
        trainer.fit(module, loader(train_idx, True), loader(val_idx, False))
    return {
        "seconds": timer.seconds,
        "cpu_seconds": timer.cpu_seconds,
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
    runs = {name: [] for name in ("baseline", "baseline_1thread", "exact", "fast")}
    for _ in range(REPEATS):  # alternately, so that a burst of load hits every variant alike
        for name, results in runs.items():
            results.append(_epoch(pooled, name))
    seconds = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    first = {name: rs[0] for name, rs in runs.items()}
    baseline_losses = first["baseline"]["losses"]
    exact = _loss_difference(first["exact"]["losses"], baseline_losses)
    fast = _loss_difference(first["fast"]["losses"], baseline_losses)
    record(
        "finetune_epoch_cached_vs_patches",
        {
            "compared": f"one TL-1 fine-tuning epoch with its validation (freeze=paper, "
            f"{patches['n_train']} training voxels of one {shape} target subject, batch {BATCH}):"
            " patches through the frozen conv stacks vs frozen conv features cached (computed "
            "once, densely): as it was (baseline) and with one torch thread and dropout noise "
            "drawn ahead (exact), plus fused Adam (fast)",
            "torch_threads_default": torch.get_num_threads(),
            "seconds_epoch_patches": round(patches["seconds"], 2),
            "seconds_epoch_cached_baseline": round(seconds["baseline"], 2),
            "seconds_epoch_cached_baseline_1thread": round(seconds["baseline_1thread"], 2),
            "seconds_epoch_cached_exact": round(seconds["exact"], 2),
            "seconds_epoch_cached": round(seconds["fast"], 2),
            "seconds_each_repeat": {
                name: [round(r["seconds"], 2) for r in rs] for name, rs in runs.items()
            },
            "main_thread_cpu_seconds_median": {
                name: round(statistics.median(r["cpu_seconds"] for r in rs), 2)
                for name, rs in runs.items()
            },
            "seconds_features_once": round(t_features, 2),
            "ratio_epoch_patches_over_cached": round(patches["seconds"] / seconds["fast"], 1),
            "ratio_epoch_patches_over_cached_baseline": round(
                patches["seconds"] / seconds["baseline"], 1
            ),
            "steps_compared": len(baseline_losses),
            "max_abs_step_loss_difference_exact_vs_baseline": exact["abs"],
            "max_abs_step_loss_difference_fast_vs_baseline": fast["abs"],
            "max_rel_step_loss_difference_fast_vs_baseline": fast["rel"],
            "val_loss_patches": patches["val_loss"],
            "val_loss_cached_baseline": first["baseline"]["val_loss"],
            "val_loss_cached": first["fast"]["val_loss"],
            "max_abs_val_loss_difference_patches_vs_cached_baseline": abs(
                patches["val_loss"] - first["baseline"]["val_loss"]
            ),
            "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
            "paper_gpu_seconds_per_epoch_one_image": 8,
        },
    )


if __name__ == "__main__":
    main()
