"""What the entry points do: each top-level ``*.py`` composes a config and calls one of these.

Tests call the same functions with configs composed by Hydra's compose API.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure
from omegaconf import DictConfig
from rich.progress import track

from subseg import (
    atlas,
    bias,
    cache,
    cohort,
    figures,
    inference,
    io,
    metrics,
    overlay,
    run_folder,
    transforms,
)
from subseg import labels as label_protocol
from subseg.run_folder import InputContract, RunFolder, as_dict


def summarize_cohort(dataset: Mapping) -> dict:
    """Describe a cohort: subjects, grids, voxel sizes, intensity ranges and structure volumes.

    Every subject goes through the loading half of the MONAI pipeline (checks, canonical
    orientation, label mapping), so a summary also validates the cohort.

    Args:
        dataset: a ``conf/dataset`` entry.

    Returns:
        A JSON-ready dict.
    """
    dataset = as_dict(dataset)
    subjects = cohort.list_subjects(dataset)
    load = transforms.preprocessing(dataset["label_ids"], normalize=False)
    rows = []
    for subject in subjects:
        item = load(subject.as_item())
        image = item["image"]
        stored = nib.load(subject.image)
        row = {
            "id": subject.id,
            "group": subject.group,
            "shape": list(stored.shape[:3]),
            "voxel_mm": [round(float(z), 4) for z in stored.header.get_zooms()[:3]],
            "orientation": "".join(nib.aff2axcodes(stored.affine)),
            "intensity_min": float(image.min()),
            "intensity_max": float(image.max()),
        }
        if item.get("label") is not None:
            counts = np.bincount(
                item["label"].numpy().ravel(), minlength=label_protocol.NUM_CLASSES
            )
            voxel = float(image.meta["voxel_volume_mm3"])
            row["volumes_mm3"] = {
                name: float(counts[c] * voxel)
                for c, name in enumerate(label_protocol.STRUCTURES, 1)
            }
        rows.append(row)
    volumes = {}
    labelled = [r for r in rows if "volumes_mm3" in r]
    for name in label_protocol.STRUCTURES:
        values = np.array([r["volumes_mm3"][name] for r in labelled])
        if values.size:
            volumes[name] = {"mean": float(values.mean()), "std": float(values.std())}
    return {
        "name": dataset.get("name"),
        "root": str(dataset["root"]),
        "n_subjects": len(rows),
        "groups": dict(Counter(r["group"] for r in rows if r["group"])),
        "orientations": sorted({r["orientation"] for r in rows}),
        "voxel_mm": sorted({tuple(r["voxel_mm"]) for r in rows}),
        "shapes": sorted({tuple(r["shape"]) for r in rows}),
        "intensity_max": [
            min(r["intensity_max"] for r in rows),
            max(r["intensity_max"] for r in rows),
        ],
        "structure_volumes_mm3": volumes,
        "subjects": rows,
    }


def format_summary(summary: Mapping) -> str:
    """Render a cohort summary as Markdown (a header block and a volume table)."""
    lines = [
        f"### {summary['name']} — {summary['n_subjects']} subjects (SYNTHETIC where generated)",
        "",
        f"- root: `{summary['root']}`",
        f"- scanner groups: {summary['groups'] or 'one'}",
        f"- stored orientation: {', '.join(summary['orientations'])}; "
        f"voxel size (mm): {', '.join('×'.join(f'{v:g}' for v in z) for z in summary['voxel_mm'])}",
        f"- grids: {', '.join('×'.join(map(str, s)) for s in summary['shapes'][:3])}"
        + (" …" if len(summary["shapes"]) > 3 else ""),
        f"- intensity maximum: {summary['intensity_max'][0]:g} – {summary['intensity_max'][1]:g}",
        "",
        "| structure | volume mm³ (mean ± std) |",
        "|---|---|",
    ]
    for name, stats in summary["structure_volumes_mm3"].items():
        lines.append(f"| {name} | {stats['mean']:.0f} ± {stats['std']:.0f} |")
    return "\n".join(lines) + "\n"


def preview_cohorts(datasets: Mapping[str, Mapping], path: str | Path) -> Path:
    """Write a PNG with one subject per cohort and scanner group, structures overlaid.

    Args:
        datasets: role (e.g. ``source``) → ``conf/dataset`` entry.
        path: the PNG to write.

    Returns:
        The path written.
    """
    rows = []
    for role, dataset in datasets.items():
        dataset = as_dict(dataset)
        load = transforms.preprocessing(dataset["label_ids"], normalize=False)
        firsts = {}
        for subject in cohort.list_subjects(dataset):
            firsts.setdefault(subject.group, subject)
        for group, subject in firsts.items():
            item = load(subject.as_item())
            label = None if item.get("label") is None else item["label"][0].numpy()
            spacing = item["image"].meta["spacing"]
            title = f"{role} {dataset['name']} {subject.id}" + (f" ({group})" if group else "")
            rows.append((item["image"][0].numpy(), label, spacing, title))
    fig = Figure(figsize=(10, 3.3 * len(rows)))
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for row_axes, (image, label, spacing, title) in zip(axes, rows, strict=True):
        overlay.draw_row(row_axes, image, label, spacing, title)
    overlay.add_legend(fig)
    return overlay.save_figure(fig, path)


def demo(cfg: DictConfig) -> dict:
    """Generate (or reuse) the synthetic source and target cohorts, summarise and preview them.

    Writes ``cohorts.json``, ``cohorts.md`` and ``cohorts.png`` to ``cfg.output_dir``.

    Args:
        cfg: the composed ``conf/demo.yaml``.

    Returns:
        ``{"source": summary, "target": summary}``.
    """
    out_dir = Path(cfg.output_dir)
    summaries = {role: summarize_cohort(cfg[role]) for role in ("source", "target")}
    text = "# subseg demo cohorts (synthetic)\n\n" + "\n".join(
        format_summary(s) for s in summaries.values()
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(out_dir / "cohorts.json") as tmp:
        tmp.write_text(json.dumps(summaries, indent=2))
    with io.atomic_path(out_dir / "cohorts.md") as tmp:
        tmp.write_text(text)
    preview_cohorts({role: cfg[role] for role in ("source", "target")}, out_dir / "cohorts.png")
    print(text)
    written = ", ".join(str(out_dir / f"cohorts.{ext}") for ext in ("md", "json", "png"))
    print(f"written: {written}")
    return summaries


def prepare_run(
    cfg: DictConfig,
    run_dir: str | Path,
    splits: Mapping | None = None,
    contract: InputContract | None = None,
) -> tuple[dict, list, object, InputContract]:
    """Set up a run folder: cohort on disk, splits drawn once, every subject checked and primed.

    Each subject the splits use has its files checked, its bias field corrected and its atlas
    prior computed (both cached beside the subject), with a QC overlay in ``run_dir/qc/``; for
    ``task=train``, ``atlas=source_labels`` is built in ``run_dir/atlas`` from the training split.

    Args:
        cfg: a composed task config with a ``dataset`` entry (and ``preprocess`` and ``atlas``
            entries when ``contract`` is not given).
        run_dir: the run folder (Hydra's output directory).
        splits: splits drawn by the task (default: the cohort's own, drawn once).
        contract: how the model's input is prepared (a source run's); default: from ``cfg``.

    Returns:
        (the splits written to ``run_dir/splits.json``, the subjects they use, the atlas
        source, the input contract with its atlas located).
    """
    run = RunFolder(run_dir)
    dataset = as_dict(cfg.dataset)
    if contract is None:
        contract = InputContract(as_dict(cfg.preprocess), as_dict(cfg.atlas))
    protocol = dataset["label_ids"]
    subjects = cohort.list_subjects(dataset)
    splits = cohort.ensure_splits(run.path, dataset, subjects, splits)
    check = transforms.LoadSubjectd(protocol=protocol)
    used = {i for ids in splits.values() for i in ids}
    subjects = [s for s in subjects if s.id in used]  # a draw may leave subjects unused
    for subject in subjects:  # every file first: a bad one fails before minutes of registration
        check(subject.as_item())
    images = [s.image for s in subjects]
    bias.ensure_corrected(images, contract.preprocess)
    # source_labels is built from a *source* cohort's training split only: built from a target
    # cohort it would leak test labels into the prior. Other tasks name a saved atlas.
    training = (
        [s for s in subjects if s.id in set(splits["train"])] if cfg.task == "train" else None
    )
    source = atlas.load_source(
        contract.atlas, training, protocol, build_dir=run.atlas_dir, preprocess=contract.preprocess
    )
    if contract.atlas.get("kind") == "source_labels" and not contract.atlas.get("path"):
        contract.atlas = {**contract.atlas, "path": str(run.atlas_dir)}
    atlas.ensure_priors(images, contract.atlas, source, preprocess=contract.preprocess)
    for subject in track(subjects, description="prior QC"):
        image = io.load_image(subject.image)
        prior = atlas.subject_prior(image, contract.atlas, source, contract.preprocess)
        atlas.save_prior_qc(image, prior, run.path / "qc" / f"{subject.id}_prior.png")
    return splits, subjects, source, contract


def _loggers(cfg: DictConfig, run_dir: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    loggers = [CSVLogger(save_dir=run_dir, name="logs", version="")]
    if cfg.logger.kind == "wandb":
        # Offline by default: no account, no network; `wandb sync` uploads the run later.
        loggers.append(
            WandbLogger(
                name=str(cfg.name),
                save_dir=str(run_dir),
                dir=str(run_dir),
                offline=bool(cfg.logger.offline),
                project=cfg.logger.project,
            )
        )
    return loggers


def evaluate_subjects(
    net, subjects, qc_dir: Path | None = None, seg_dir: Path | None = None
) -> list[dict]:
    """Segment labelled subjects and return their ``metrics.csv`` rows.

    Args:
        net: the network, in eval mode.
        subjects: (subject, item) pairs; items carry ``image``, ``label`` and ``prior``.
        qc_dir: when given, an overlay of each segmentation is written there.
        seg_dir: when given, each segmentation is written there as ``<id>_seg.nii.gz`` (classes
            0–14 on the scan's own grid, as ``predict.py`` writes them).
    """
    rows = []
    for subject, item in subjects:
        volume = np.asarray(item["image"][0])
        classes, _ = inference.segment(net, volume, item["prior"])
        if seg_dir is not None:
            stored = io.load_image(subject.image)
            io.save_like(classes.astype(np.uint8), stored, seg_dir / f"{subject.id}_seg.nii.gz")
        spacing = item["image"].meta["spacing"]
        rows += metrics.structure_metrics(
            subject.id, classes, np.asarray(item["label"][0]), spacing
        )
        if qc_dir is not None:
            overlay.save_overlay(
                volume,
                classes,
                spacing,
                qc_dir / f"{subject.id}_seg.png",
                title=f"{subject.id}: segmentation",
            )
    return rows


def _write_table(rows: list[dict], path: Path) -> None:
    with io.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=metrics.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _cached_subjects(by_id, protocol, contract: InputContract, source, num_workers=0):
    """A function: subject ids → a MONAI ``CacheDataset`` of subjects prepared as ``contract``."""
    from monai.data import CacheDataset

    pipeline = contract.pipeline(protocol, source)

    def cached(ids):
        items = [by_id[i].as_item() for i in ids]
        return CacheDataset(items, pipeline, num_workers=int(num_workers), progress=False)

    return cached


def _pooled_samples(items, recipe: Mapping, rng: np.random.Generator):
    """Sample every subject (METHOD.md §4) and split the pooled samples into train/validation.

    Returns:
        (the subjects' :class:`subseg.data.SubjectSamples`, train indices, validation indices).
    """
    from subseg import data

    samples = [data.subject_samples(item, rng, recipe["samples_per_subject"]) for item in items]
    owner = np.concatenate([np.full(len(s.targets), i) for i, s in enumerate(samples)])
    by_subject = owner if recipe["split_level"] == "subject" else None
    train_idx, val_idx = data.split_indices(len(owner), recipe["val_fraction"], rng, by_subject)
    return samples, train_idx, val_idx


def _fit(cfg, run_dir: Path, module, pooled, indices, recipe: Mapping, callbacks=()):
    """Fit ``module`` on ``pooled`` samples with checkpointing and early stopping.

    Returns:
        (the best checkpoint's path on the main process, ``None`` on the others (DDP);
        the trainer; :func:`fit_record`'s record).
    """
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from torch.utils.data import DataLoader

    from subseg import data

    def loader(subset, shuffle):
        return DataLoader(
            pooled.subset(subset),
            batch_size=int(recipe["batch_size"]),
            shuffle=shuffle,
            collate_fn=data.collate_batch,
            num_workers=int(cfg.num_workers),
        )

    # A rerun in the same folder starts clean: Lightning would otherwise save best-v1.ckpt beside
    # the old best.ckpt, which every later step (finetune, evaluate, predict) would load.
    shutil.rmtree(RunFolder(run_dir).checkpoints_dir, ignore_errors=True)
    checkpoint = ModelCheckpoint(
        dirpath=RunFolder(run_dir).checkpoints_dir,
        filename="best",
        monitor=recipe["monitor"],
        mode=recipe["mode"],
        save_last=True,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    early = EarlyStopping(
        monitor=recipe["monitor"], mode=recipe["mode"], patience=int(recipe["patience"])
    )
    trainer = L.Trainer(
        max_epochs=int(recipe["max_epochs"]),
        max_time=recipe["max_time"],
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        precision=cfg.precision,
        logger=_loggers(cfg, run_dir),
        callbacks=[checkpoint, early, *callbacks],
        default_root_dir=run_dir,
        log_every_n_steps=10,
    )
    train_idx, val_idx = indices
    trainer.fit(module, loader(train_idx, True), loader(val_idx, False))
    fit = fit_record(trainer, early, recipe)
    if not trainer.is_global_zero:
        return None, trainer, fit
    best = checkpoint.best_model_path or checkpoint.last_model_path
    if not best:
        raise io.InputError(
            f"{run_dir}: training stopped before its first validation (recipe.max_time="
            f"{recipe['max_time']}, recipe.max_epochs={recipe['max_epochs']}): no model to keep"
        )
    return best, trainer, fit


def fit_record(trainer, early, recipe: Mapping) -> dict:
    """How a fit ended: the epochs it ran and what stopped it.

    ``max_epochs`` and ``early_stopping`` give the same model on any machine; ``max_time`` is the
    wall-clock safety net, and a model it stopped depends on the machine's speed.
    """
    from lightning.pytorch.callbacks import Timer

    epochs = int(trainer.current_epoch)
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if trainer.interrupted:
        stopped_by = "interrupted"
    elif early.wait_count >= early.patience:
        stopped_by = "early_stopping"
    elif epochs >= int(recipe["max_epochs"]):
        stopped_by = "max_epochs"
    elif timer is not None and (timer.time_remaining() or 0) <= 0:
        stopped_by = "max_time"
    else:  # e.g. a non-finite monitored value
        stopped_by = "other"
    if stopped_by == "max_time":
        print(
            f"subseg: the wall-clock cap recipe.max_time={recipe['max_time']} stopped training "
            f"after {epochs} of {recipe['max_epochs']} epochs: the result depends on this "
            "machine's speed",
            file=sys.stderr,
        )
    return {
        "epochs": epochs,
        "max_epochs": int(recipe["max_epochs"]),
        "stopped_by": stopped_by,
        "max_time": recipe["max_time"],
    }


def _finish(run_dir: Path, net, test_items, by_id, loggers=(), extra=None, seg_dir=None) -> dict:
    """Evaluate on the test subjects; write ``metrics.csv``, ``summary.json`` and figures."""
    rows = evaluate_subjects(
        net, [(by_id[item["id"]], item) for item in test_items], run_dir / "qc", seg_dir
    )
    summary = metrics.summarize(rows)
    summary.update(extra or {})
    _write_table(rows, run_dir / "metrics.csv")
    with io.atomic_path(run_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    log = run_dir / "logs" / "metrics.csv"
    if log.is_file():
        figures.learning_curve(log, run_dir / "learning_curve.png")
    overlays = sorted(str(p) for p in (run_dir / "qc").glob("*_seg.png"))[:4]
    for logger in loggers:
        if hasattr(logger, "log_image") and overlays:  # W&B: a few test overlays on the dashboard
            logger.log_image(key="test/segmentations", images=overlays)
            logger.log_metrics(
                {f"test/dice_{k}": v["mean"] for k, v in summary["per_structure"].items()}
            )
    return summary


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train a network from scratch on a source cohort and evaluate it on the test split.

    Writes to ``run_dir``: ``splits.json``, ``qc/``, ``checkpoints/best.ckpt`` (and
    ``last.ckpt``), ``logs/metrics.csv`` (every logged number), an offline W&B run with the
    default logger, ``metrics.csv`` and ``summary.json`` for the test subjects.

    Args:
        cfg: the composed ``conf/train.yaml``.
        run_dir: the run folder.

    Returns:
        The test summary (``avg``, ``wavg``, ``per_structure``).
    """
    import lightning as L

    from subseg import data
    from subseg.lit_module import SegmentationModule, VolumeDice, VolumeSubject

    run_dir = Path(run_dir)
    L.seed_everything(int(cfg.seed), workers=True)
    RunFolder(run_dir).write_environment(str(cfg.accelerator))
    splits, subjects, source, contract = prepare_run(cfg, run_dir)
    RunFolder(run_dir).write_contract(contract)
    dataset, recipe = as_dict(cfg.dataset), as_dict(cfg.recipe)
    by_id = {s.id: s for s in subjects}
    cached = _cached_subjects(by_id, dataset["label_ids"], contract, source, cfg.num_workers)

    rng = np.random.default_rng(int(cfg.seed))
    samples, train_idx, val_idx = _pooled_samples(cached(splits["train"]), recipe, rng)
    pooled = data.PatchDataset(samples)
    del samples  # the padded copies in ``pooled`` are all training needs

    volume_subjects = [
        VolumeSubject(
            item["id"], np.asarray(item["image"][0]), item["prior"], np.asarray(item["label"][0])
        )
        for item in cached(splits["val"])
    ]
    module = SegmentationModule(dropout=float(recipe["dropout"]), lr=float(recipe["lr"]))
    best, trainer, fit = _fit(
        cfg,
        run_dir,
        module,
        pooled,
        (train_idx, val_idx),
        recipe,
        [VolumeDice(volume_subjects, int(recipe["volume_dice_every"]))],
    )
    if best is None:
        return {}
    net = SegmentationModule.load_from_checkpoint(best, map_location="cpu").net.eval()
    summary = _finish(
        run_dir,
        net,
        cached(splits["test"]),
        by_id,
        trainer.loggers,
        {
            "checkpoint": str(Path(best).resolve().relative_to(run_dir.resolve())),
            "fit": fit,
        },
    )
    print(
        f"subseg: test mean Dice {summary['avg']:.3f} (wDSC {summary['wavg']:.3f}) over "
        f"{summary['n_subjects']} subjects; run folder {run_dir}"
    )
    return summary


def _source_run(cfg: DictConfig) -> tuple[RunFolder | None, dict | None, Path | None]:
    """The source model named by ``cfg.source_run``: a training run folder or a checkpoint.

    Returns:
        (run folder, its composed config, checkpoint); the first two are ``None`` for a bare
        checkpoint (one trained elsewhere) and all three when no source is named.
    """
    if not cfg.get("source_run"):
        return None, None, None
    named = Path(cfg.source_run)
    if named.is_file():
        run = RunFolder.of(named)
        return run, run.config() if run else None, named
    run = RunFolder(named)
    if not run.checkpoint.is_file() or not run.config_file.is_file():
        raise io.InputError(
            f"{named}: not a finished training run (needs checkpoints/best.ckpt and "
            f".hydra/config.yaml) nor a checkpoint file"
        )
    return run, run.config(), run.checkpoint


def _nyul_landmarks(source: RunFolder, source_cfg: Mapping, contract: InputContract) -> list:
    """The source training images' standard scale (Nyúl stage one), prepared as ``contract``."""
    train_ids = set(source.split("train"))
    prepare = contract.intensities(landmarks=False)
    images = [
        prepare({"image": str(s.image)})["image"][0].numpy()
        for s in cohort.list_subjects(source_cfg["dataset"])
        if s.id in train_ids
    ]
    return [float(v) for v in transforms.learn_standard_scale(images)]


def finetune(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Adapt a source model to a target cohort from k labelled images, and evaluate it.

    ``target.n_images=0`` is No TL: the source model evaluated as is. ``init=scratch`` trains
    the same k images from random weights (the scratch-k baseline). ``intensity=nyul``
    standardises the target images to the source training images' histogram first.

    Writes to ``run_dir``: ``splits.json`` (the k drawn images; the rest are tested),
    ``transfer.json`` (copied/skipped/reset tensors, frozen modules, whether features were
    cached), ``checkpoints/best.ckpt``, ``logs/``, ``metrics.csv`` and ``summary.json`` on the
    target test subjects, and with ``evaluate_source`` ``source_test/`` (the same files on the
    source cohort's test subjects: what adaptation costs on the old scanner).

    Args:
        cfg: the composed ``conf/finetune.yaml``.
        run_dir: the run folder.

    Returns:
        The target test summary.
    """
    import lightning as L
    import torch

    from subseg import data, transfer
    from subseg.lit_module import SegmentationModule

    run_dir = Path(run_dir)
    L.seed_everything(int(cfg.seed), workers=True)
    _check_finetune_options(cfg)
    source_dir, source_cfg, source_ckpt = _source_run(cfg)
    scratch = cfg.init == "scratch"
    if not scratch and source_ckpt is None:
        raise io.InputError("name the source model: source_run=<training run folder or .ckpt>")
    _check_run_folder(run_dir, method_key(cfg), "scratch" if scratch else str(source_ckpt))
    if source_dir is not None:  # the source run's input contract, never loose options
        contract = source_dir.contract()
        run_folder.check_options(contract, cfg, source_dir.path)
    else:
        why = (
            f"{source_ckpt} is a bare checkpoint (what it was trained with is unknown; no "
            "source-domain evaluation)"
            if source_ckpt is not None
            else ""
        )
        contract = run_folder.contract_from_options(cfg, why)
    if contract.intensity == "nyul" and cfg.intensity != "nyul":  # a Nyúl-tuned source model
        raise io.InputError(
            f"{source_dir.path}: the model was trained with intensity=nyul; "
            f"intensity={cfg.intensity} would feed it other input (add intensity=nyul)"
        )
    if cfg.intensity != contract.intensity:
        contract.intensity, contract.landmarks = str(cfg.intensity), None
    print(f"subseg: input: {contract.describe()}")
    dataset, recipe = as_dict(cfg.dataset), as_dict(cfg.recipe)
    preset = transfer.FreezePreset.from_config(as_dict(cfg.freeze))
    requested = cfg.target.n_images
    if cfg.mix_source and (not scratch or source_dir is None):
        raise io.InputError(
            "mix_source=true trains from scratch on a source run's images too: "
            "set init=scratch and source_run=<training run folder>"
        )
    ids = [s.id for s in cohort.list_subjects(dataset)]
    test_ids = dataset.get("test_ids")
    draw = cohort.draw_target(
        ids,
        requested,
        int(cfg.target.draw),
        test_ids,
        int((dataset.get("split") or {}).get("seed", 0)),
        cfg.target.get("fold"),
    )
    k = len(draw["train"])
    if scratch and k == 0:
        raise io.InputError("init=scratch needs labelled target images: target.n_images >= 1")
    if cfg.intensity == "nyul" and source_dir is None:
        raise io.InputError(
            "intensity=nyul standardises to the source training images: name the source "
            "run folder, source_run=<training run folder>"
        )
    RunFolder(run_dir).write_environment(str(cfg.accelerator))
    splits, subjects, source, contract = prepare_run(cfg, run_dir, draw, contract)
    if cfg.intensity == "nyul" and contract.landmarks is None:
        contract.landmarks = _nyul_landmarks(source_dir, source_cfg, contract)
    RunFolder(run_dir).write_contract(contract)
    by_id = {s.id: s for s in subjects}
    cached = _cached_subjects(by_id, dataset["label_ids"], contract, source, cfg.num_workers)
    dropout = float(source_cfg["recipe"]["dropout"]) if source_cfg else float(recipe["dropout"])
    module = SegmentationModule(dropout=dropout, lr=float(preset.lr))
    record = {"init": "scratch" if scratch else str(source_ckpt), "n_images": k}
    if not scratch:
        loaded = transfer.load_source_weights(module.net, source_ckpt)
        if k == 0 and loaded["missing"]:
            raise io.InputError(
                f"{source_ckpt}: lacks {', '.join(loaded['missing'][:3])}…: No TL would evaluate "
                "layers at their random initialisation"
            )
        record.update(copied=len(loaded["copied"]), skipped=loaded["skipped"])
        record["missing"] = loaded["missing"]
        print(
            f"subseg: loaded {len(loaded['copied'])} tensors from {source_ckpt}; skipped "
            f"{loaded['skipped'] or 'none'}; left at initialisation {loaded['missing'] or 'none'}"
        )

    if k == 0:  # No TL: the source model as is
        # Written as a Lightning checkpoint of the loaded weights (a bare source may be a plain
        # state_dict), so evaluate.py and predict.py read this run folder like any other.
        best = RunFolder(run_dir).checkpoint
        best.parent.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(best) as tmp:
            torch.save(
                {
                    "state_dict": module.state_dict(),
                    "hyper_parameters": dict(module.hparams),
                    "pytorch-lightning_version": L.__version__,
                },
                tmp,
            )
        net, loggers = module.net.eval(), ()
    else:
        torch.manual_seed(int(cfg.seed))  # the reset layers' initialisation
        callbacks = []
        if not scratch:
            record["reset"] = transfer.reset_layers(module.net, preset)
            callbacks.append(transfer.FreezeSchedule(preset))
        rng = np.random.default_rng(int(cfg.seed))
        items = list(cached(splits["train"]))
        if cfg.mix_source:  # the mixed baseline: source training images join the k target ones
            items += _source_training_items(source_dir, source_cfg, contract)
            record["mixed_source_images"] = len(items) - k
        samples, train_idx, val_idx = _pooled_samples(items, recipe, rng)
        del items
        record["cached_features"] = not scratch and transfer.caches_conv_features(
            module.net, preset
        )
        if record["cached_features"]:
            pooled = data.FeatureDataset(
                torch.cat([transfer.conv_features_of(module.net, s) for s in samples]),
                torch.cat([s.prior for s in samples]),
                torch.cat([s.targets for s in samples]),
            )
        else:
            pooled = data.PatchDataset(samples)
        del samples
        record["samples"] = {"train": len(train_idx), "val": len(val_idx)}
        best, trainer, record["fit"] = _fit(
            cfg, run_dir, module, pooled, (train_idx, val_idx), recipe, callbacks
        )
        if best is None:
            return {}
        net = SegmentationModule.load_from_checkpoint(best, map_location="cpu").net.eval()
        loggers = trainer.loggers
        record["frozen"] = sorted(
            n for n, p in module.net.named_parameters() if not p.requires_grad
        )
    with io.atomic_path(run_dir / "transfer.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    summary = _finish(
        run_dir,
        net,
        cached(splits["test"]),
        by_id,
        loggers,
        {
            "checkpoint": "checkpoints/best.ckpt",
            "n_images": k,
            "method": method_key(cfg),
            **({"fit": record["fit"]} if "fit" in record else {}),
        },
    )
    print(
        f"subseg: {method_key(cfg)} on {dataset['name']}: test mean Dice {summary['avg']:.3f} "
        f"(wDSC {summary['wavg']:.3f}) over {summary['n_subjects']} subjects; run folder {run_dir}"
    )
    if cfg.evaluate_source and source_dir is not None:
        try:
            retained = evaluate_on(
                net,
                source_cfg["dataset"],
                source_dir.split("test"),
                contract,
                run_dir / "source_test",
                {"method": method_key(cfg)},
            )
        except Exception as exc:  # optional: a source run moved elsewhere lacks its data
            reason = io.find_input_error(exc) or (exc if isinstance(exc, OSError) else None)
            if reason is None:
                raise
            print(f"subseg: source-domain evaluation skipped: {reason}", file=sys.stderr)
        else:
            summary["source_test"] = {"avg": retained["avg"], "wavg": retained["wavg"]}
            print(f"subseg: on the source cohort's test subjects: mean Dice {retained['avg']:.3f}")
    return summary


def _check_finetune_options(cfg: DictConfig) -> None:
    """One-line errors for option values the run cannot use (before any work is done)."""
    k = cfg.target.n_images
    if not (k == "all" or (isinstance(k, int) and not isinstance(k, bool) and k >= 0)):
        raise io.InputError(f"target.n_images={k}: give a number of images (0 = No TL) or all")
    if not isinstance(cfg.target.draw, int) or cfg.target.draw < 0:
        raise io.InputError(f"target.draw={cfg.target.draw}: give a draw number (0, 1, …)")
    if cfg.init not in ("source", "scratch"):
        raise io.InputError(f"init={cfg.init}: choose source (transfer) or scratch")
    if cfg.intensity not in ("zscore", "nyul"):
        raise io.InputError(f"intensity={cfg.intensity}: choose zscore or nyul")
    fold = cfg.target.get("fold")
    if fold is not None and (k != "all" or f"loo{fold}" not in str(cfg.name)):
        raise io.InputError(
            f"target.fold={fold} is a leave-one-out fold: use +experiment=loo (every other image "
            "trained on, the fold in the run name)"
        )
    if cfg.init == "scratch" and cfg.freeze.name != "none":
        raise io.InputError(
            f"init=scratch trains every layer from random weights: add freeze=none "
            f"(freeze={cfg.freeze.name} would only change its learning rate)"
        )


def _model_file(init: str) -> str:
    """A source as a resolved checkpoint path (a run folder stands for its best.ckpt)."""
    if init == "scratch":
        return init
    path = Path(init)
    return str((RunFolder(path).checkpoint if path.is_dir() else path).resolve())


def _check_run_folder(run_dir: Path, method: str, init: str) -> None:
    """Refuse to overwrite a finished run of another method or source model in ``run_dir``."""
    done = {}
    for name in ("summary.json", "transfer.json"):
        if (run_dir / name).is_file():
            done.update(json.loads((run_dir / name).read_text()))
    before = (done.get("method", method), _model_file(done.get("init", init)))
    if done and before != (method, _model_file(init)):
        raise io.InputError(
            f"{run_dir}: holds a finished {done.get('method')} run from {done.get('init')}; "
            "give this one another name=…"
        )


def _source_training_items(source: RunFolder, source_cfg: Mapping, contract) -> list:
    """A source run's training images prepared as ``contract`` (for the mixed baseline)."""
    dataset = dict(source_cfg["dataset"])
    subjects = {s.id: s for s in cohort.list_subjects(dataset)}
    cached = _cached_subjects(subjects, dataset["label_ids"], contract, contract.load_atlas())
    return list(cached(source.split("train")))


def method_key(cfg: DictConfig) -> str:
    """The report's name of a fine-tuning run's method (no_tl, tl3, scratch3, mixed3, …).

    ``n_images=all`` from scratch is ``full`` (full training; the folds of a leave-one-out
    share it, so the report pools them), and ``tl_all`` with transfer.
    """
    k = cfg.target.n_images
    k = "_all" if k == "all" else int(k)
    prefix = "nyul_" if cfg.intensity == "nyul" else ""
    if cfg.init == "scratch":
        if k == "_all" and not cfg.get("mix_source"):
            return f"{prefix}full"
        return f"{prefix}{'mixed' if cfg.get('mix_source') else 'scratch'}{k}"
    preset = "" if cfg.freeze.name == "paper" else f"_{cfg.freeze.name}"
    return f"{prefix}no_tl" if k == 0 else f"{prefix}tl{k}{preset}"


def evaluate_on(
    net,
    dataset: Mapping,
    test_ids: list[str] | None,
    contract: InputContract,
    out_dir: Path,
    extra: Mapping | None = None,
    segmentations: bool = False,
) -> dict:
    """Segment a cohort's test subjects with ``net``; write ``metrics.csv`` and ``summary.json``.

    Args:
        net: the network, in eval mode.
        dataset: the cohort (a ``conf/dataset`` entry).
        test_ids: the subjects to segment (``None``: every subject of the cohort).
        contract: how the network's input is prepared (its run's).
        out_dir: where the files go.
        extra: more entries for ``summary.json``.
        segmentations: also write each segmentation to ``out_dir/segmentations/``.

    Returns:
        The summary.
    """
    dataset = dict(dataset)
    subjects = cohort.list_subjects(dataset)
    by_id = {s.id: s for s in subjects}
    ids = sorted(by_id) if test_ids is None else list(test_ids)
    unknown = sorted(set(ids) - set(by_id))
    if unknown:
        raise io.InputError(f"{dataset['root']}: test subjects not found: {unknown}")
    cached = _cached_subjects(by_id, dataset["label_ids"], contract, contract.load_atlas())
    out_dir.mkdir(parents=True, exist_ok=True)
    return _finish(
        out_dir,
        net,
        cached(ids),
        by_id,
        (),
        {"dataset": dataset["name"], **(extra or {})},
        out_dir / "segmentations" if segmentations else None,
    )


def model_of(cfg: DictConfig) -> tuple[Path, InputContract, RunFolder | None]:
    """The model ``run_dir=`` or ``ckpt=`` names, and how its input must be prepared.

    A model inside a run folder brings its recorded contract; ``preprocess=`` or ``atlas=``
    options that contradict it are refused. A bare checkpoint takes the options (or the
    defaults, with a note).

    Returns:
        (checkpoint, input contract, run folder or ``None``).
    """
    run = RunFolder(cfg.run_dir) if cfg.get("run_dir") else None
    if run is not None:
        run.config()  # a one-line error when it is not a run folder
    checkpoint = Path(cfg.ckpt) if cfg.get("ckpt") else (run.checkpoint if run else None)
    if checkpoint is None:
        raise io.InputError("name a trained model: run_dir=<run folder> or ckpt=<file>")
    owner = RunFolder.of(checkpoint)
    if (
        run is not None
        and cfg.get("ckpt")
        and (owner is None or owner.path.resolve() != run.path.resolve())
    ):
        raise io.InputError(
            f"{checkpoint}: not a checkpoint of run_dir={run.path} (that run's input contract "
            "would not be this model's): give one of run_dir= or ckpt="
        )
    run = run or owner
    if run is None:
        why = f"{checkpoint} is a bare checkpoint (what it was trained with is unknown)"
        return checkpoint, run_folder.contract_from_options(cfg, why), None
    contract = run.contract()
    run_folder.check_options(contract, cfg, run.path)
    return checkpoint, contract, run


def evaluate(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Evaluate a trained or fine-tuned model on a cohort's test subjects.

    ``run_dir=<run folder>`` rebuilds everything from the folder: its checkpoint, input
    contract (bias correction, atlas, intensity standardisation), cohort and test split
    (``dataset=<cohort>`` evaluates it on another cohort: that cohort's published test list, or
    all its subjects). ``ckpt=<file> dataset=<cohort>`` evaluates a bare checkpoint with
    ``cfg.preprocess`` and ``cfg.atlas``.

    Writes ``metrics.csv`` (subject, structure, dsc, hd95_mm, assd_mm, vol_ref_mm3,
    vol_pred_mm3), ``summary.json`` (avg, wavg, per-structure mean/std) and ``qc/`` to
    ``out_dir``; with ``segmentations=true`` also ``segmentations/<id>_seg.nii.gz``.

    Returns:
        The summary.
    """
    out_dir = Path(out_dir)
    checkpoint, contract, run = model_of(cfg)
    run_cfg = run.config() if run is not None else None
    dataset = as_dict(cfg.dataset) if cfg.get("dataset") else None
    if dataset is None and run_cfg is None:
        raise io.InputError(f"{checkpoint}: name the cohort to evaluate on: dataset=<cohort>")
    own = run_cfg is not None and (dataset is None or dataset["name"] == run_cfg["dataset"]["name"])
    upstream = (
        RunFolder.of(run_cfg["source_run"]) if run_cfg and run_cfg.get("source_run") else None
    )
    if own:
        dataset = run_cfg["dataset"] if dataset is None else dataset
        test_ids = run.split("test")
    elif upstream is not None and upstream.config()["dataset"]["name"] == dataset["name"]:
        test_ids = upstream.split("test")  # back on the source cohort: never its training subjects
    else:
        test_ids = dataset.get("test_ids")
    net = load_network(checkpoint)
    print(f"subseg: input: {contract.describe()}")
    summary = evaluate_on(
        net,
        dataset,
        None if test_ids is None else list(test_ids),
        contract,
        out_dir,
        {"checkpoint": str(checkpoint)},
        bool(cfg.get("segmentations")),
    )
    print(
        f"subseg: {dataset['name']}: mean Dice {summary['avg']:.3f} (wDSC {summary['wavg']:.3f})"
        f" over {summary['n_subjects']} subjects; written to {out_dir}"
    )
    return summary


def _input_images(spec) -> list[Path]:
    """T1 files named by a file, a folder (every .nii / .nii.gz in it) or a list of either."""
    items = [spec] if isinstance(spec, str | Path) else list(spec)
    files = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(
                p
                for p in item.iterdir()
                if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith(".")
            )
            if not found:
                raise io.InputError(f"{item}: no .nii or .nii.gz files in this folder")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise io.InputError(f"{item}: no such file or folder")
    return files


def load_network(checkpoint: str | Path):
    """The network of a Lightning checkpoint, in eval mode on the CPU.

    Raises:
        io.InputError: the file is missing or not a subseg checkpoint.
    """
    from subseg.lit_module import SegmentationModule

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise io.InputError(f"{checkpoint}: no such checkpoint")
    try:
        module = SegmentationModule.load_from_checkpoint(checkpoint, map_location="cpu")
    except Exception as exc:  # torch/Lightning raise many types for a bad file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise io.InputError(f"{checkpoint}: not a readable subseg checkpoint ({reason})") from None
    return module.net.eval()


def _check_batch(files: list[Path]) -> None:
    """Refuse a batch before any scan is segmented: duplicate output names, unreadable scans.

    Outputs are named by the scan's file name, so two ``T1.nii.gz`` from different folders
    would overwrite each other; a bad scan found at the end of a long batch would waste it.
    """
    by_name: dict[str, Path] = {}
    for path in files:
        twin = by_name.setdefault(cache.stem(path), path)
        if twin != path:
            raise io.InputError(
                f"{path}: has the same name as {twin}; their outputs would overwrite each other "
                "(segment them into different out_dir=)"
            )
    for path in track(files, description="checking inputs"):
        io.load_image(path)  # one line naming the file on a bad one


def predict(cfg: DictConfig) -> list[dict]:
    """Segment new T1 scans and report their structure volumes.

    Writes to ``cfg.out_dir``: ``<id>_seg.nii.gz`` (same shape, affine and orientation as the
    input; classes 0–14 or the raw ids of ``cfg.raw_ids``), ``<id>_qc.png``, optionally
    ``<id>_prob.nii.gz``, and ``volumes.csv`` (subject, structure, volume_mm3).

    Returns:
        The rows of ``volumes.csv``.
    """
    out_dir = Path(cfg.out_dir)
    checkpoint, contract, _ = model_of(cfg)
    net = load_network(checkpoint)
    files = _input_images(cfg.input)
    _check_batch(files)
    print(f"subseg: input: {contract.describe()}")
    prepare = contract.pipeline()  # exactly the model's own: N4, standardisation, atlas
    rows = []
    for path in track(files, description="segmenting"):
        subject = cache.stem(path)
        image = io.load_image(path)
        item = prepare({"image": str(path)})
        volume, prior = item["image"][0].numpy(), item["prior"]
        classes, probabilities = inference.segment(net, volume, prior, bool(cfg.postprocessing))
        stored = label_protocol.map_to_raw(classes, cfg.raw_ids) if cfg.raw_ids else classes
        io.save_like(
            stored.astype(np.int16 if cfg.raw_ids else np.uint8),
            image,
            out_dir / f"{subject}_seg.nii.gz",
        )
        if cfg.probabilities:
            full = np.zeros((*image.data.shape, label_protocol.NUM_CLASSES), np.float32)
            full[..., 0] = 1.0
            full[prior.box] = np.moveaxis(probabilities, 0, -1)
            full[prior.box][~(prior.regions > 0)] = np.eye(label_protocol.NUM_CLASSES)[0]
            io.save_like(full, image, out_dir / f"{subject}_prob.nii.gz")
        overlay.save_overlay(
            image.data,
            classes,
            image.spacing,
            out_dir / f"{subject}_qc.png",
            title=f"{subject}: subseg segmentation",
        )
        counts = np.bincount(classes.ravel(), minlength=label_protocol.NUM_CLASSES)
        rows += [
            {
                "subject": subject,
                "structure": name,
                "volume_mm3": float(counts[c] * image.voxel_volume_mm3),
            }
            for c, name in enumerate(label_protocol.STRUCTURES, 1)
        ]
    with io.atomic_path(out_dir / "volumes.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["subject", "structure", "volume_mm3"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"subseg: {len(files)} scans segmented; volumes in {out_dir / 'volumes.csv'}")
    return rows
