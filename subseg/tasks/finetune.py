"""Adapt a source model to a target scanner from k labelled images: what ``finetune.py`` runs.

The steps, in order: check the options; find the source model and its input contract; draw the
k training images (the rest are tested); prepare them as the source's input was prepared; load
the source weights; fit (or, for No TL, save the source model as is); evaluate on the target's
test subjects and, optionally, back on the source's (what adaptation costs on the old scanner).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from subseg.core import cache, io
from subseg.data import cohort
from subseg.evaluation import metrics
from subseg.preprocessing import contract as contracts
from subseg.preprocessing.contract import as_dict
from subseg.runs import trained_model
from subseg.runs.method_keys import method_key
from subseg.runs.run_folder import RunFolder, is_first_process
from subseg.runs.trained_model import source_run
from subseg.tasks import evaluate, label_free
from subseg.training import fitting
from subseg.training.preparation import (
    cached_subjects,
    check_cohort,
    nyul_landmarks,
    prepare_run,
    source_training_items,
    training_images,
)


def check_options(cfg: DictConfig) -> None:
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
    pick = cfg.target.get("pick") or "random"
    if pick not in ("random", "suggested"):
        raise io.InputError(f"target.pick={pick}: choose random (a seeded draw) or suggested")
    if pick == "suggested" and (cfg.target.get("ids") is not None or k == "all" or k == 0):
        raise io.InputError(
            f"target.pick=suggested takes the top k scans of suggest.py's ranking: give "
            f"target.n_images=k >= 1 and no target.ids (n_images={k})"
        )
    if pick == "suggested" and cfg.init == "scratch":
        raise io.InputError("target.pick=suggested ranks scans with the source model: init=source")
    for scan_id in cfg.target.get("ids") or []:
        cohort.check_id(scan_id, "target.ids")
    if not isinstance(cfg.target.get("loo", False), bool):
        raise io.InputError(f"target.loo={cfg.target.loo}: true or false")
    fold = cfg.target.get("fold")
    if fold is not None and (k != "all" or f"loo{fold}" not in str(cfg.name)):
        raise io.InputError(
            f"target.fold={fold} is a leave-one-out fold: use +experiment=loo (every other image "
            "trained on, the fold in the run name)"
        )
    steps = label_free.steps_of(cfg)
    if steps and "ddp" in str(cfg.trainer.get("strategy") or ""):
        raise io.InputError(
            f"adapt.label_free={cfg.adapt.label_free} runs in one process: trainer=cpu or gpu"
        )
    if steps and cfg.target.get("loo"):
        raise io.InputError("target.loo=true with adapt.label_free: not supported, choose one")
    if cfg.init == "scratch" and cfg.freeze.name != "none":
        raise io.InputError(
            f"init=scratch trains every layer from random weights: add freeze=none "
            f"(freeze={cfg.freeze.name} would only change its learning rate)"
        )


def _source_and_contract(cfg: DictConfig):
    """The source model and the input contract the fine-tuned model keeps.

    Returns:
        (source run folder or ``None``, its config or ``None``, source checkpoint or ``None``
        for scratch, the contract).
    """
    source_dir, source_cfg, source_ckpt = source_run(cfg)
    scratch = cfg.init == "scratch"
    if not scratch and source_ckpt is None:
        raise io.InputError("name the source model: source_run=<training run folder or .ckpt>")
    if cfg.mix_source and (not scratch or source_dir is None):
        raise io.InputError(
            "mix_source=true trains from scratch on a source run's images too: "
            "set init=scratch and source_run=<training run folder>"
        )
    embedded = None
    if source_dir is None and source_ckpt is not None:  # a checkpoint alone carries its own
        stored = trained_model.read_checkpoint(source_ckpt)
        embedded = trained_model.checkpoint_contract(stored, source_ckpt)
    nyul_known = embedded is not None and embedded.intensity == "nyul"
    if cfg.intensity == "nyul" and source_dir is None and not nyul_known:
        raise io.InputError(
            "intensity=nyul standardises to the source training images: name the source "
            "run folder, source_run=<training run folder>"
        )
    if source_dir is not None:  # the source run's input contract, never loose options
        contract = source_dir.contract()
        contracts.check_options(contract, cfg, source_dir.path)
    elif embedded is not None:  # the checkpoint's own record
        contract = contracts.check_options(embedded, cfg, source_ckpt)
    else:
        why = (
            f"{source_ckpt} is a bare checkpoint (what it was trained with is unknown; no "
            "source-domain evaluation)"
            if source_ckpt is not None
            else ""
        )
        contract = contracts.contract_from_options(cfg, why)
    where = source_dir.path if source_dir else source_ckpt
    if "nyul" in label_free.steps_of(cfg):
        if contract.intensity == "nyul":  # nothing to choose: its input is Nyúl's already
            raise io.InputError(
                f"{where}: the model already takes Nyúl's input, so adapt.label_free="
                f"{cfg.adapt.label_free} has nothing to choose; use "
                f"adapt.label_free={label_free.without_nyul(cfg.adapt.label_free)}"
            )
        if source_dir is None:
            raise io.InputError(
                f"adapt.label_free={cfg.adapt.label_free} maps the scans to the source training "
                "images' intensity scale: name the source run folder, "
                "source_run=<training run folder>"
            )
    if contract.intensity == "nyul" and cfg.intensity != "nyul":  # a Nyúl-tuned source model
        raise io.InputError(
            f"{where}: the model takes Nyúl-standardised input; "
            f"intensity={cfg.intensity} would feed it other input (add intensity=nyul)"
        )
    if cfg.intensity != contract.intensity:
        contract.intensity, contract.landmarks = str(cfg.intensity), None
    return source_dir, source_cfg, source_ckpt, contract


def _draw(cfg: DictConfig, dataset: dict, source_ckpt, contract) -> tuple[dict, object]:
    """The k training images (drawn, named or suggested); the labelled rest are tested.

    A cohort may hold scans without labels (the ones a user has not labelled): they are neither
    trained on nor tested, and a line says how many. ``target.pick=suggested`` ranks the scans
    outside the published test list with :mod:`subseg.tasks.suggest` (reading no label) and takes
    the top k, which must be labelled.

    Returns:
        (the splits, the ranking — ``(rows, ids, distances)`` — or ``None`` when not suggested).
    """
    subjects = cohort.list_subjects(dataset, require_labels=False)
    unlabelled = [s.id for s in subjects if s.label is None]
    if unlabelled and not label_free.steps_of(cfg):
        print(
            f"subseg: {len(unlabelled)} of the {len(subjects)} scans of {dataset.get('name')} "
            "have no label: they are not used here (segment them with predict.py, or adapt to "
            "them with adapt.label_free=adabn_self)"
        )
    chosen = cfg.target.get("ids")
    ranking = None
    if (cfg.target.get("pick") or "random") == "suggested":
        ranking = _suggest(dataset, subjects, source_ckpt, contract)
        chosen = [row["scan"] for row in ranking[0][: int(cfg.target.n_images)]]
        missing = [s for s in subjects if s.id in set(chosen) and s.label is None]
        if missing:
            raise io.InputError(
                f"{missing[0].image}: suggested for labelling (target.pick=suggested) but it has "
                "no label: label it, or fine-tune on target.ids=[…]"
            )
    draw = cohort.draw_target(
        [s.id for s in subjects if s.label is not None],
        cfg.target.n_images,
        int(cfg.target.draw),
        dataset.get("test_ids"),
        int((dataset.get("split") or {}).get("seed", 0)),
        cfg.target.get("fold"),
        None if chosen is None else [str(i) for i in chosen],
    )
    if cfg.init == "scratch" and not draw["train"]:
        raise io.InputError("init=scratch needs labelled target images: target.n_images >= 1")
    if not draw["test"] and not draw["train"] and not label_free.steps_of(cfg):
        raise io.InputError(f"{dataset.get('root')}: no labelled scans to test or fine-tune on")
    if cfg.target.get("loo") and (draw["test"] or len(draw["train"]) < 2):
        raise io.InputError(
            "target.loo=true estimates a run with no held-out scan by leaving each labelled scan "
            f"out in turn: it needs >= 2 labelled scans, all trained on (this run trains on "
            f"{len(draw['train'])} and tests {len(draw['test'])})"
        )
    return draw, ranking


def _suggest(dataset: dict, subjects: list, source_ckpt, contract):
    """Rank the scans outside the published test list (their images only) for labelling."""
    from subseg.runs.trained_model import load_network
    from subseg.tasks import suggest

    published = {str(i) for i in dataset.get("test_ids") or []}
    pool = {s.id: s.image for s in subjects if s.id not in published}
    if not pool:
        raise io.InputError(f"{dataset.get('root')}: no scans outside the test list to suggest")
    if contract.intensity == "nyul" and contract.landmarks is None:
        raise io.InputError(
            "target.pick=suggested ranks scans as the source model sees them: "
            "use intensity=zscore (or run suggest.py, then target.ids=[…])"
        )
    features = suggest.features_of(load_network(source_ckpt), contract, pool)
    ids, d = suggest.distances(features)
    return suggest.coverage_ranking(ids, d), ids, d


def _load_source_weights(net, source_ckpt: Path, k: int) -> dict:
    """Copy the source's weights into ``net``; their record for ``transfer.json``."""
    from subseg.training import transfer

    loaded = transfer.load_source_weights(net, source_ckpt)
    if k == 0 and loaded["missing"]:
        raise io.InputError(
            f"{source_ckpt}: lacks {', '.join(loaded['missing'][:3])}…: No TL would evaluate "
            "layers at their random initialisation"
        )
    return {
        "copied": len(loaded["copied"]),
        "skipped": loaded["skipped"],
        "missing": loaded["missing"],
    }


def _starting_model(cfg, source_ckpt, init: str, k: int):
    """The network fine-tuning starts from, the source weights loaded (refused if unusable).

    The network is the source checkpoint's own (its saved config); ``conf/model``'s without a
    source (``init=scratch`` alone) or for a bare ``state_dict``. The optimiser is
    ``conf/model``'s, its learning rate the freeze preset's.

    Returns:
        (the Lightning module, the start of ``transfer.json``'s record).
    """
    from hydra.utils import instantiate

    from subseg.model.network import build_network

    config = None
    if source_ckpt is not None:
        config = trained_model.network_config(trained_model.read_checkpoint(source_ckpt))
    # A bare state_dict names no network: conf/model's (its weights are checked on loading).
    net = build_network(config) if config is not None else instantiate(cfg.model.net)
    module = instantiate(cfg.model, net=net)
    record = {"init": init, "n_images": k}
    if init != "scratch":
        record["source_sha256"] = cache.file_digest(source_ckpt)
        record.update(_load_source_weights(module.net, source_ckpt, k))
    return module, record


def _evaluate(cfg, run: RunFolder, net, cached, test_ids, by_id, loggers, record: dict) -> dict:
    """Publish the target test results of the fine-tuned model."""
    summary = evaluate.publish(
        run,
        net,
        cached,
        test_ids,
        by_id,
        loggers,
        {
            "checkpoint": str(run.checkpoint.relative_to(run.path)),
            "n_images": record["n_images"],
            "method": method_key(cfg),
            **({"fit": record["fit"]} if "fit" in record else {}),
            **({"label_free": label_free.summary_of(record)} if "label_free" in record else {}),
        },
    )
    print(
        f"subseg: {method_key(cfg)} on {cfg.dataset.name}: test mean Dice {summary['avg']:.3f} "
        f"(wDSC {summary['wavg']:.3f}) over {summary['n_subjects']} subjects; run folder {run.path}"
    )
    return summary


def _training_set(cfg, module, items, preset, record: dict, extra=()):
    """Pool the training samples: cached frozen-layer features when the preset allows.

    ``extra``: pseudo-labelled samples, pooled after the labelled ones.

    Returns:
        (the dataset, (train indices, validation indices)).
    """
    from subseg.training import transfer
    from subseg.training.samples import PatchDataset

    rng = np.random.default_rng(int(cfg.seed))
    samples, train_idx, val_idx = fitting.pooled_samples(items, as_dict(cfg.sampling), rng, extra)
    scratch = cfg.init == "scratch"
    record["cached_features"] = not scratch and transfer.caches_conv_features(module.net, preset)
    if record["cached_features"]:
        pooled = transfer.feature_dataset(module.net, samples)
    else:
        pooled = PatchDataset(samples)
    record["samples"] = {"train": len(train_idx), "val": len(val_idx)}
    return pooled, (train_idx, val_idx)


def _adapt(cfg, run: RunFolder, module, items: list, record: dict, extra=()):
    """Fit the k images (reset layers re-initialised, frozen ones per the preset).

    ``extra``: pseudo-labelled samples of unlabelled scans, pooled with the k images' samples.

    Returns:
        (the fine-tuned network in eval mode, the trainer).
    """
    import torch

    from subseg.runs.trained_model import load_network
    from subseg.training import transfer
    from subseg.training.patch_data import FitData, PatchData

    preset = transfer.FreezePreset.from_config(as_dict(cfg.freeze))
    torch.manual_seed(int(cfg.seed))  # the reset layers' initialisation
    callbacks = []
    if cfg.init != "scratch":
        record["reset"] = transfer.reset_layers(module.net, preset)
        callbacks.append(transfer.FreezeSchedule(preset))
    pooled, (train_idx, val_idx) = _training_set(cfg, module, items, preset, record, extra)
    fit_data = PatchData(
        lambda: FitData(pooled, train_idx, val_idx),
        cfg.sampling.batch_size,
        int(cfg.seed),
        None,
        cfg.num_workers,
    )
    best, trainer, record["fit"] = fitting.fit(cfg, run, module, fit_data, callbacks)
    if trainer.is_global_zero:  # it wrote fit.json (the other ranks write no results)
        record["frozen"] = run.read_json(run.fit_file)["frozen"]
    return load_network(best), trainer


def _retention(cfg, net, source_dir: RunFolder, source_cfg, contract, run: RunFolder):
    """Evaluate the fine-tuned model on the source's test subjects (``None`` if impossible)."""
    try:
        return evaluate.evaluate_on(
            net,
            source_cfg["dataset"],
            source_dir.split("test"),
            contract,
            run.source_test,
            {"method": method_key(cfg)},
        )
    except Exception as exc:  # optional: a source run moved elsewhere lacks its data
        reason = io.find_input_error(exc) or (exc if isinstance(exc, OSError) else None)
        if reason is None or io.find_output_error(exc) is not None:  # a full disk is not optional
            raise
        print(f"subseg: source-domain evaluation skipped: {reason}", file=sys.stderr)
        return None


def _without_test(cfg: DictConfig, run: RunFolder, record: dict, first: bool, train) -> dict:
    """The results of a run that trained on every labelled scan: none held out to measure.

    Its ``metrics.csv`` is empty and ``summary.json`` says ``held_out: 0``; with
    ``target.loo=true`` it holds the leave-one-out estimate (:func:`_leave_one_out`).
    """
    summary = {
        "method": method_key(cfg),
        "n_images": record["n_images"],
        "n_subjects": 0,
        "held_out": 0,
        "checkpoint": str(run.checkpoint.relative_to(run.path)),
        **({"fit": record["fit"]} if "fit" in record else {}),
        **({"label_free": label_free.summary_of(record)} if "label_free" in record else {}),
    }
    label_free_only = "label_free" in record and not train  # no label at all: no Dice
    if cfg.target.get("loo") and not label_free_only:
        summary["loo_estimate"] = _leave_one_out(cfg, run, train)
    message = _untested_message(cfg, run, summary, train, label_free_only)
    if first:
        run.publish_results([], list(evaluate.COLUMNS), summary)
    print(message)
    return summary


def _untested_message(
    cfg: DictConfig, run: RunFolder, summary: dict, train: list[str], label_free_only: bool
) -> str:
    """What a run with no held-out scan tells its user: why no Dice, and how to get one."""
    if label_free_only:
        return (
            f"subseg: {method_key(cfg)} adapted to {summary['label_free']['pool']} unlabelled "
            f"scans (their quality score {summary['label_free']['pool_qc']:.3f}); no labelled "
            f"scan to measure its Dice on. Segment with predict.py run_dir={run.path} and check "
            "the scans its qc.csv flags"
        )
    estimate = summary.get("loo_estimate")
    if estimate:
        says = (
            f"leave-one-out estimate (TL-{len(train) - 1} on each left-out scan): mean Dice "
            f"{estimate['avg']:.3f} (per scan {estimate['avg_min']:.3f}–"
            f"{estimate['avg_max']:.3f})"
        )
    elif len(train) >= 2:
        says = (
            f"add target.loo=true for a leave-one-out estimate ({len(train)} more fits, each "
            f"on {len(train) - 1} scans, tested on the one left out)"
        )
    else:
        says = "label a second scan to estimate it (target.loo=true leaves each out in turn)"
    return (
        f"subseg: {method_key(cfg)} fine-tuned on every labelled scan ({', '.join(train)}): "
        f"no held-out scan, so its Dice on your scanner is not measured here; {says}. "
        f"Run folder {run.path}"
    )


def _leave_one_out(cfg: DictConfig, run: RunFolder, train: list[str]) -> dict:
    """Fine-tune once per labelled scan on all the others and test it on the one left out.

    Each fold is a fine-tuning run of its own in ``<run>/loo/<id>`` (reused when complete); the
    estimate pools their test metrics (one scan each), and is a little pessimistic: each fold
    has one labelled scan fewer than the run it estimates.
    """
    from omegaconf import OmegaConf

    from subseg.report import report

    rows, per_fold = [], {}
    for left_out in train:
        fold_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        kept = [i for i in train if i != left_out]
        fold_cfg.target.ids, fold_cfg.target.n_images = kept, len(kept)
        fold_cfg.target.loo, fold_cfg.target.pick = False, "random"
        fold_cfg.evaluate_source = False
        fold_cfg.target.fold_of = str(run.path)  # the report counts the run, not its folds
        fold = RunFolder(run.path / "loo" / left_out)
        fold.config_file.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(fold_cfg, fold.config_file)
        print(f"subseg: leave-one-out fold: fine-tune on {', '.join(kept)}, test on {left_out}")
        per_fold[left_out] = finetune(fold_cfg, fold.path)["avg"]
        rows += report.read_metrics(fold.metrics_file)
    pooled = metrics.summarize(rows)
    return {
        "avg": pooled["avg"],
        "wavg": pooled["wavg"],
        "avg_min": min(per_fold.values()),
        "avg_max": max(per_fold.values()),
        "per_fold": per_fold,
        "n_images_per_fold": len(train) - 1,
        "per_structure": pooled["per_structure"],
    }


def finetune(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Adapt a source model to a target cohort from k labelled images, and evaluate it.

    ``target.n_images=0`` is No TL: the source model evaluated as is. ``init=scratch`` trains
    the same k images from random weights (the scratch-k baseline). ``intensity=nyul``
    standardises the target images to the source training images' histogram first.

    Writes the run folder (:mod:`subseg.runs.run_folder`): ``splits.json`` (the k drawn images; the
    rest are tested), ``preprocessing.json``, ``transfer.json`` (copied/skipped/reset tensors,
    frozen modules, whether features were cached), ``checkpoints/best.ckpt``, ``logs/``,
    ``metrics.csv`` and ``summary.json`` on the target test subjects, with ``evaluate_source``
    ``source_test/`` (the same files on the source cohort's test subjects), and last
    ``complete.json``. A run already complete with the same config and source is left as it is;
    ``resume=true`` continues a killed one.

    ``target.ids`` names the k images, ``target.pick=suggested`` takes the top k of
    :mod:`subseg.tasks.suggest`'s ranking (also written, as ``suggest.csv`` and ``suggest.png``).
    A run that trains on every labelled scan has no test set: its ``metrics.csv`` is empty,
    ``summary.json`` says ``held_out: 0``, and with ``target.loo=true`` it holds the
    leave-one-out estimate from the folds in ``loo/<id>/``.

    Args:
        cfg: the composed ``conf/finetune.yaml``.
        run_dir: the run folder.

    Returns:
        The target test summary.
    """
    import lightning as L

    run = RunFolder(run_dir)
    check_options(cfg)
    source_dir, source_cfg, source_ckpt, contract = _source_and_contract(cfg)
    init = "scratch" if cfg.init == "scratch" else str(source_ckpt)
    dataset = as_dict(cfg.dataset)
    draw, ranking = _draw(cfg, dataset, source_ckpt, contract)
    pool = label_free.pool_subjects(cfg, dataset, draw) if label_free.steps_of(cfg) else []
    # Everything that can be refused is checked before the run folder is touched.
    drawn = {i for ids in draw.values() for i in ids}
    subjects = check_cohort(dataset, drawn) if drawn else []  # none: a label-free run
    learns_scale = cfg.intensity == "nyul" and contract.landmarks is None
    if source_dir is not None and (learns_scale or "nyul" in label_free.steps_of(cfg)):
        training_images(source_dir, source_cfg)  # Nyúl's reference, there before the run begins
    L.seed_everything(int(cfg.seed), workers=True)
    module, record = _starting_model(cfg, source_ckpt, init, len(draw["train"]))
    digest = run.begin(
        cfg,
        {"source": cache.file_digest(source_ckpt)} if source_ckpt else {},
        cohort.file_digests(dataset),
    )
    if digest is None:
        return run.summary()
    print(f"subseg: input: {contract.describe()}")
    if "copied" in record:
        print(
            f"subseg: loaded {record['copied']} tensors from {source_ckpt}; skipped "
            f"{record['skipped'] or 'none'}; left at initialisation {record['missing'] or 'none'}"
        )
    if is_first_process():
        run.write_environment(str(cfg.trainer.accelerator))
        if ranking is not None:  # the ranking the k scans came from, as suggest.py writes it
            from subseg.tasks import suggest

            suggest.write(*ranking, int(cfg.target.n_images), run.path)
    splits, subjects, source, contract = prepare_run(cfg, run, subjects, draw, contract)
    if cfg.intensity == "nyul" and contract.landmarks is None:
        contract.landmarks = nyul_landmarks(source_dir, source_cfg, contract)
    if pool:  # the pool prepared, and the input standardisation chosen on it (``nyul``)
        contract, prepared, *chosen = label_free.choose_intensity(
            cfg,
            module.net,
            pool,
            contract,
            source,
            lambda candidate: nyul_landmarks(source_dir, source_cfg, candidate),
        )
    run.write_contract(contract)  # the input the kept model takes, for predict.py
    by_id = {s.id: s for s in subjects}
    cached = cached_subjects(by_id, dataset["label_ids"], contract, source, cfg.num_workers)
    if pool:  # adapted to the unlabelled scans too (and to the k labelled ones, if any)
        items = list(cached(splits["train"])) if splits["train"] else []
        net, trainer = label_free.adapt(
            cfg,
            run,
            module,
            items,
            prepared,
            record,
            lambda m, its, rec, extra: _adapt(cfg, run, m, its, rec, extra),
            None if chosen[0] is None else tuple(chosen),
        )
        loggers, first = (trainer.loggers if trainer else ()), True
    elif record["n_images"] == 0:  # No TL: the source model as is, saved by Lightning
        fitting.save_untrained(run, module)
        net, loggers, first = module.net.eval(), (), True
    else:
        items = list(cached(splits["train"]))
        if cfg.mix_source:  # the mixed baseline: source training images join the k target ones
            items += source_training_items(source_dir, source_cfg, contract)
            record["mixed_source_images"] = len(items) - record["n_images"]
        net, trainer = _adapt(cfg, run, module, items, record)
        loggers, first = trainer.loggers, trainer.is_global_zero
    if first:
        run.write_json(run.transfer_file, record)
    if splits["test"]:
        # Every rank of a DDP job segments its share of the test subjects; the first writes.
        summary = _evaluate(cfg, run, net, cached, splits["test"], by_id, loggers, record)
    else:
        summary = _without_test(cfg, run, record, first, splits["train"])
    if cfg.evaluate_source and source_dir is not None:
        retained = _retention(cfg, net, source_dir, source_cfg, contract, run)
        if retained is not None and first:
            summary["source_test"] = {"avg": retained["avg"], "wavg": retained["wavg"]}
            run.write_json(run.summary_file, summary)  # a reused run reads back the same
            print(f"subseg: on the source cohort's test subjects: mean Dice {retained['avg']:.3f}")
    if first:
        run.finish("finetune", digest, cfg)
    return summary
