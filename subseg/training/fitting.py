"""One Lightning fit, shared by training and fine-tuning: samples, checkpoints, resume, loggers.

Checkpoints are written atomically and carry the random-number state, so a run killed at any
moment continues with ``resume=true`` from its last finished epoch and ends exactly where an
uninterrupted run with the same seed ends.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from subseg.core import io
from subseg.runs import dashboard, trained_model
from subseg.runs.run_folder import RunFolder


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic on a local disk.

    Lightning's own writer commits through an fsspec transaction whose temporary file lies in
    the system's temp folder, and the final move across file systems is a copy that a kill can
    cut short. This one writes a temporary file beside the checkpoint and renames it.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        """Write ``checkpoint`` to a temporary file in ``path``'s folder, then rename it."""
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        with io.atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class RandomState(Callback):
    """Keep the random-number state in every checkpoint and restore it on resume.

    Lightning's checkpoints hold the model, optimiser, loops and callbacks but not the RNG state
    (its fault-tolerant mode, which did, was removed), so a resumed run would shuffle and drop
    out differently from an uninterrupted one.
    """

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:  # noqa: D102
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        # Plain types only: torch.load(weights_only=True) refuses numpy arrays.
        checkpoint["subseg_rng"] = {
            "torch": torch.get_rng_state(),
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            checkpoint["subseg_rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:  # noqa: D102
        state = checkpoint.get("subseg_rng")
        if state is not None:
            torch.set_rng_state(state["torch"])
            name, keys, pos, has_gauss, gauss = state["numpy"]
            np.random.set_state((name, np.asarray(keys, np.uint32), pos, has_gauss, gauss))
            random.setstate(state["python"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])


class InputRecord(Callback):
    """Put the model's input contract in every checkpoint: a checkpoint alone is a whole model.

    What the run folder records of the model's input (``preprocessing.json``, a saved
    ``source_labels`` atlas, the brain volumes of its scans, the class order), read once, when
    the first checkpoint is written (the run has recorded it by then).
    """

    def __init__(self, run: RunFolder):
        self.run, self.record = run, None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:  # noqa: D102
        if self.record is None:
            self.record = self.run.input_record()
        checkpoint[trained_model.INPUT_KEY] = self.record


def loggers(cfg: DictConfig, run: RunFolder) -> list:
    """The run folder's CSV log, then every logger of ``cfg.logger``, built by Hydra.

    ``cfg.logger`` maps names to Lightning logger configs with a ``_target_``; a logger that
    takes a ``save_dir`` writes into the run folder unless its config says otherwise. W&B runs
    get a group and tags a sweep can be sliced by (:func:`subseg.runs.dashboard.wandb_defaults`).
    """
    import inspect

    from hydra.utils import get_class, instantiate
    from lightning.pytorch.loggers import CSVLogger

    chosen = [CSVLogger(save_dir=run.path, name=run.logs_dir.name, version="")]
    for key, conf in (cfg.get("logger") or {}).items():
        if not isinstance(conf, Mapping) or "_target_" not in conf:
            raise io.InputError(f"logger.{key}: give a Lightning logger with a _target_")
        try:
            target = get_class(conf["_target_"])
        except Exception as exc:
            raise io.InputError(f"logger.{key}._target_={conf['_target_']}: {exc}") from None
        given = {k: v for k, v in conf.items() if v is not None}
        extra = {}
        if "save_dir" in inspect.signature(target).parameters and "save_dir" not in given:
            extra["save_dir"] = str(run.path)
        if target.__name__ == "WandbLogger":
            extra.update(dashboard.wandb_defaults(cfg, run, given))
        # The logger's own arguments through Hydra (plain dicts and lists: W&B cannot serialise
        # OmegaConf containers); the ones added here go straight to the logger, since Hydra would
        # build every `_target_` inside them, and the W&B config holds the whole run config
        # (its model, trainer and loggers).
        own = {k: v for k, v in given.items() if k != "_target_"}
        chosen.append(target(**instantiate(own, _convert_="all"), **extra))
    return chosen


def callbacks_of(cfg: DictConfig) -> list:
    """The Lightning callbacks a user adds in ``cfg.callbacks`` (name → ``_target_`` config)."""
    from hydra.utils import instantiate

    added = []
    for key, conf in (cfg.get("callbacks") or {}).items():
        if not isinstance(conf, Mapping) or "_target_" not in conf:
            raise io.InputError(f"callbacks.{key}: give a Lightning callback with a _target_")
        added.append(instantiate(conf))
    return added


def pooled_samples(items, sampling: Mapping, rng: np.random.Generator, extra=()):
    """Sample every subject (docs/method.md §4) and split the pooled samples into train/val.

    Args:
        items: the prepared subjects.
        sampling: the ``conf/sampling`` entry (samples per subject, validation fraction, level).
        rng: the run's generator.
        extra: more subjects' samples, already drawn (pseudo-labelled scans), pooled after them.

    Returns:
        (the subjects' :class:`subseg.training.samples.SubjectSamples`, train indices, validation
        indices).
    """
    from subseg.training.samples import split_indices, subject_samples

    samples = [subject_samples(item, rng, sampling["samples_per_subject"]) for item in items]
    samples += list(extra)
    owner = np.concatenate([np.full(len(s.targets), i) for i, s in enumerate(samples)])
    by_subject = owner if sampling["split_level"] == "subject" else None
    train_idx, val_idx = split_indices(len(owner), sampling["val_fraction"], rng, by_subject)
    return samples, train_idx, val_idx


def trainer_for(cfg: DictConfig, run: RunFolder, callbacks=()):
    """The Lightning trainer of ``cfg.trainer`` (built by Hydra), writing to ``run``.

    ``cfg.trainer`` holds the epochs and the wall-clock cap too (Trainer arguments); the run
    adds atomic checkpoints that carry the model's input contract, the random state, early
    stopping on ``cfg.stopping``, its loggers and the callbacks of ``cfg.callbacks``. Samples
    are sharded by :class:`subseg.training.patch_data.PatchData`, so Lightning's own distributed
    sampler is off.

    Returns:
        (the trainer, its ``ModelCheckpoint``, its ``EarlyStopping``).
    """
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    stopping = cfg.stopping
    checkpoint = ModelCheckpoint(
        dirpath=run.checkpoints_dir,
        filename=run.checkpoint.stem,
        monitor=stopping.monitor,
        mode=stopping.mode,
        save_last=True,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    early = EarlyStopping(
        monitor=stopping.monitor, mode=stopping.mode, patience=int(stopping.patience)
    )
    trainer = instantiate(
        cfg.trainer,
        logger=loggers(cfg, run),
        callbacks=[
            checkpoint,
            early,
            RandomState(),
            InputRecord(run),
            *callbacks,
            *callbacks_of(cfg),
        ],
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(run.path),
        use_distributed_sampler=False,
    )
    return trainer, checkpoint, early


def fit(cfg, run: RunFolder, module, datamodule, callbacks=()):
    """Fit ``module`` on ``datamodule`` with checkpoints and early stopping.

    ``datamodule`` is a :class:`subseg.training.patch_data.PatchData`.

    With ``cfg.resume`` and a ``last.ckpt`` in the run, the fit continues from it (model,
    optimiser, epoch, early-stopping state and random state); when the run's ``fit.json`` says
    the fit had already ended, it is not fitted again.

    Returns:
        (the best checkpoint's path (on every rank of a DDP job; the first one wrote it);
        the trainer; :func:`fit_record`'s record).
    """
    trainer, checkpoint, early = trainer_for(cfg, run, callbacks)
    resume = bool(cfg.get("resume"))
    if resume and run.fit_file.is_file() and run.checkpoint.is_file():
        # The fit had ended before the kill (in testing, say): fitting on from last.ckpt would
        # train more epochs than the uninterrupted run (Lightning does not restore should_stop).
        print(f"subseg: {run.path}: its fit had ended; continuing after it", file=sys.stderr)
        return run.checkpoint, trainer, run.read_json(run.fit_file)["record"]
    resume_from = run.last_checkpoint if resume and run.last_checkpoint.is_file() else None
    if resume and resume_from is None:
        print(f"subseg: {run.path}: no last.ckpt to resume from: starting afresh", file=sys.stderr)
    elif resume_from is not None:
        print(f"subseg: resuming {run.path} from {resume_from.name}", file=sys.stderr)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    record = fit_record(trainer, early, cfg.trainer.get("max_time"))
    if not checkpoint.best_model_path:
        raise io.InputError(
            f"{run.path}: training stopped before its first validation (trainer.max_time="
            f"{record['max_time']}, trainer.max_epochs={record['max_epochs']}): no model to keep"
        )
    if trainer.is_global_zero:
        frozen = sorted(n for n, p in module.net.named_parameters() if not p.requires_grad)
        run.write_json(run.fit_file, {"record": record, "frozen": frozen})
    return Path(checkpoint.best_model_path), trainer, record


def fit_record(trainer, early, max_time: str | None) -> dict:
    """How a fit ended: the epochs it ran and what stopped it.

    ``max_epochs`` and ``early_stopping`` give the same model on any machine; ``max_time`` is the
    wall-clock safety net, and a model it stopped depends on the machine's speed.

    Args:
        trainer: the trainer after its fit.
        early: its ``EarlyStopping`` callback.
        max_time: its wall-clock cap as configured (``trainer.max_time``), for the record.
    """
    from lightning.pytorch.callbacks import Timer

    epochs = int(trainer.current_epoch)
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if trainer.interrupted:
        stopped_by = "interrupted"
    elif early.wait_count >= early.patience:
        stopped_by = "early_stopping"
    elif epochs >= int(trainer.max_epochs):
        stopped_by = "max_epochs"
    elif timer is not None and (timer.time_remaining() or 0) <= 0:
        stopped_by = "max_time"
    else:  # e.g. a non-finite monitored value
        stopped_by = "other"
    if stopped_by == "max_time":
        print(
            f"subseg: the wall-clock cap trainer.max_time={max_time} stopped training "
            f"after {epochs} of {trainer.max_epochs} epochs: the result depends on this "
            "machine's speed",
            file=sys.stderr,
        )
    return {
        "epochs": epochs,
        "max_epochs": int(trainer.max_epochs),
        "stopped_by": stopped_by,
        "max_time": max_time,
    }


def save_untrained(run: RunFolder, module) -> Path:
    """Save ``module`` as the run's model without training it (No TL), through Lightning.

    The checkpoint is Lightning's own (network config, input contract, version), so evaluate.py
    and predict.py read this run, or the checkpoint alone, like any other.

    Returns:
        The checkpoint path.
    """
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[InputRecord(run)],
        plugins=[AtomicCheckpointIO()],
        default_root_dir=run.path,
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(run.checkpoint)
    return run.checkpoint
