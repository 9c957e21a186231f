"""Source training: throughput in samples per second, and the time to a whole-volume Dice of 0.80.

``subseg.tasks.train.train`` on the synthetic source cohort (``conf/dataset/synth_source.yaml``,
20 subjects at 1 mm: 12 to train on, 3 held out whole for validation, 5 for testing) with the
default recipe (``recipe=cpu``: the released code's optimiser, 3,000 samples per subject,
batch 128, split 75/25 at voxel level, so 27,000 training samples per epoch) and the default
trainer, with two bench settings:

- ``volume_dice_every=1``: the 3 validation subjects are segmented whole after every
  epoch (the default does it every 4th), so the first epoch whose ``val_dice_mean`` reaches 0.80
  is known;
- the run stops there (a callback raises once the target is reached), or after ``MAX_EPOCHS``
  epochs; neither the remaining epochs nor the test evaluation run. ``trainer.max_time`` is
  raised to an hour, so a busy machine does not cut an epoch short.

Figures:

- ``samples_per_second``: training samples through forward and backward per second of the
  training loop (patch extraction and optimiser step included; validation excluded), median
  over the complete epochs run;
- ``seconds_to_target``: wall time from the first training step to the end of the validation
  that first shows ``val_dice_mean`` >= 0.80, with every epoch's validation (voxel samples and
  the 3 whole volumes) included; ``seconds_to_target_training_only`` leaves the validations out;
- ``seconds_setup``: from the call to the first training step: checks, bias correction and
  atlas registration (cached beside the data after the first run; ``setup_scans_recomputed``
  counts the scans this run had to correct and register), loading and sampling the subjects.

What it replaces: before this bench no throughput or time-to-Dice figure existed; the README's
figure was the whole 8-epoch fit (9.9 min here) and its test Dice. Extra Hydra overrides on the
command line are added to the run's (for short trials: ``sampling.samples_per_subject=300``).
"""

import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import lightning as L
from common import record
from hydra import compose, initialize_config_dir

from subseg.core import io, job_threads
from subseg.tasks import train

TARGET = 0.80
MAX_EPOCHS = 3
RUN_DIR = Path("outputs/bench/runs/source")
OVERRIDES = [
    "logger=csv",
    "name=bench_source",
    "volume_dice_every=1",
    f"trainer.max_epochs={MAX_EPOCHS}",
    "trainer.max_time=00:01:00:00",  # a safety net only: MAX_EPOCHS bounds the bench
    "+callbacks.bench._target_=__main__.Recorder",
    f"+callbacks.bench.target={TARGET}",
]


class Recomputed(logging.Handler):
    """Counts the scans the run bias-corrects or registers (subseg logs one line for each)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.count = {"n4": 0, "registration": 0}

    def emit(self, entry: logging.LogRecord) -> None:
        message = entry.getMessage()
        for kind, text in (("n4", "bias-field correction"), ("registration", "atlas registration")):
            self.count[kind] += message.startswith(text)


class Stop(Exception):
    """Raised by :class:`Recorder` to end the run after the fit: no test evaluation."""


class Recorder(L.Callback):
    """Times every epoch's training loop and validation, counts the samples, stops at target."""

    last = None  # the instance Hydra built, for main() to read

    def __init__(self, target: float):
        self.target = float(target)
        self.epochs: list[dict] = []
        self.train_start = None
        self.reached = None
        Recorder.last = self

    def on_train_start(self, trainer, module):
        self.train_start = time.perf_counter()

    def on_train_epoch_start(self, trainer, module):
        self.epoch_start = time.perf_counter()
        self.samples = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.samples += len(batch["target"])

    def on_validation_start(self, trainer, module):
        if not trainer.sanity_checking:
            self.val_start = time.perf_counter()

    def on_validation_end(self, trainer, module):
        if trainer.sanity_checking:
            return
        now = time.perf_counter()
        dice = trainer.callback_metrics.get("val_dice_mean")
        entry = {
            "epoch": trainer.current_epoch + 1,
            "samples": self.samples,
            "seconds_training": round(self.val_start - self.epoch_start, 2),
            "seconds_validation": round(now - self.val_start, 2),
            "seconds_since_start": round(now - self.train_start, 2),
            "val_dice_mean": None if dice is None else round(float(dice), 4),
            "val_loss": round(float(trainer.callback_metrics["val_loss"]), 4),
        }
        self.epochs.append(entry)
        print(f"bench_source: {entry}", file=sys.stderr)
        if dice is not None and float(dice) >= self.target:
            self.reached = entry

    def on_train_epoch_end(self, trainer, module):
        if self.reached:  # after the validation's checkpoint: best.ckpt is the model that did
            raise Stop

    def on_train_end(self, trainer, module):
        raise Stop  # the last epoch ran without reaching the target: skip the test too


def main() -> None:
    with initialize_config_dir(config_dir=str(Path("conf").resolve()), version_base="1.3"):
        cfg = compose("train", overrides=OVERRIDES + sys.argv[1:])  # more overrides: trials
    job_threads.apply(cfg.threads)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    recomputed = Recomputed()
    logger = logging.getLogger("subseg")
    logger.addHandler(recomputed)
    logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    start = time.perf_counter()
    try:
        with io.cli_errors():
            train.train(cfg, RUN_DIR)
    except Stop:
        pass
    total = time.perf_counter() - start
    rec = Recorder.last
    epochs = rec.epochs
    setup = rec.train_start - start
    full = [e for e in epochs if e["samples"] == epochs[0]["samples"]]  # not a cut-short one
    rates = [e["samples"] / e["seconds_training"] for e in full]
    reached = rec.reached
    record(
        "source_training",
        {
            "compared": f"train.py's fit on the synthetic source cohort (Adam lr "
            f"{cfg.model.optimizer.lr}, dropout {cfg.model.net.dropout}, "
            f"{cfg.sampling.samples_per_subject} samples per subject, batch "
            f"{cfg.sampling.batch_size}, whole-volume validation Dice on the 3 validation subjects "
            f"after every epoch, stopped at val_dice_mean >= {rec.target} or after "
            f"{cfg.trainer.max_epochs} epochs), {cfg.trainer.accelerator}, "
            f"threads={cfg.threads or 'all'}",
            "samples_per_second": round(statistics.median(rates)),
            "samples_per_second_by_epoch": [round(r) for r in rates],
            "target_val_dice_mean": rec.target,
            "reached_target": reached is not None,
            "epochs_to_target": reached["epoch"] if reached else None,
            "seconds_to_target": reached["seconds_since_start"] if reached else None,
            "seconds_to_target_training_only": round(sum(e["seconds_training"] for e in epochs), 2)
            if reached
            else None,
            "seconds_setup": round(setup, 2),
            "setup_scans_recomputed": recomputed.count,
            "seconds_whole_bench": round(total, 2),
            "epochs": epochs,
            "load_average_1min_at_end": round(os.getloadavg()[0], 1),
        },
    )


if __name__ == "__main__":
    main()
