"""Adapt to a new scanner from its unlabelled scans: ``finetune.py adapt.label_free=…``.

The pool is the cohort's scans that are neither tested nor labelled for training (their label
files, if any, are never opened). Three steps, alone or in turn (``adabn_self``,
``nyul_adabn``), and each combinable with k labelled scans:

- ``nyul``: the input's intensity standardisation chosen on the pool. The source model's own
  (the z-score) and Nyúl's histogram standardisation to the source training images' scale each
  prepare the pool, the source model segments both, and Nyúl's is kept only when the pool's
  quality score says so (:func:`choose_intensity`). Neither helps everywhere: on the demo's
  target Nyúl gained +0.014 Avg Dice, on two study scanners it lost 0.017 and 0.049
  (docs/results.md). The run's recorded input contract is the one kept, so ``predict.py``
  prepares scans the same way.
- ``adabn``: the conv stacks' BatchNorm statistics re-estimated on the pool's and the labelled
  scans' images, around the structures' expected places (:mod:`subseg.training.adabn`); every
  weight kept.
- ``self``: self-training. The current model (the source, after AdaBN when asked, or the TL-k
  model fitted on the k labelled scans) segments the pool; its answers, kept only where the
  label-free quality signals call them reliable (:mod:`subseg.training.pseudo_labels`), join
  the labelled samples, and the fully-connected layers are fine-tuned as TL-k is (the
  ``freeze`` preset, on cached conv features). ``adapt.rounds`` repeats it, each round's model
  teaching the next.

Every step is guarded: the pool's label-free quality score (the mean of ``qc.csv``'s score over
its scans and structures) and its atlas agreement are measured before and after, and a step
that lowers the score — or, for self-training, either — is undone: the run says so and keeps
the model it started from (:func:`_guarded` says why). ``transfer.json`` records each step.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping

import numpy as np
from omegaconf import DictConfig

from subseg.core import io
from subseg.data import cohort
from subseg.preprocessing import atlas, bias
from subseg.runs.run_folder import RunFolder
from subseg.training import fitting

METHODS = {
    "adabn": ("adabn",),
    "self": ("self",),
    "adabn_self": ("adabn", "self"),
    "nyul": ("nyul",),
    "nyul_adabn": ("nyul", "adabn"),
}
"""``adapt.label_free`` → its steps, in order."""


def without_nyul(method: str) -> str:
    """The ``adapt.label_free`` method that takes ``method``'s steps but Nyúl's (AdaBN if none)."""
    rest = [
        name
        for name, steps in METHODS.items()
        if steps == tuple(step for step in METHODS[method] if step != "nyul")
    ]
    return rest[0] if rest else "adabn"


def steps_of(cfg: DictConfig) -> tuple[str, ...]:
    """The label-free steps a config asks for (empty: none).

    Raises:
        io.InputError: an unknown method, or settings it cannot use.
    """
    adapt = cfg.get("adapt") or {}
    method = adapt.get("label_free")
    if method in (None, "none"):
        return ()
    if method not in METHODS:
        raise io.InputError(
            f"adapt.label_free={method}: choose adabn, self, adabn_self, nyul or nyul_adabn "
            "(or null: none)"
        )
    if "nyul" in METHODS[method] and cfg.get("intensity") == "nyul":
        raise io.InputError(
            f"adapt.label_free={method} chooses between the model's own intensity "
            "standardisation and Nyúl's on the unlabelled scans: leave out intensity=nyul"
        )
    if cfg.init == "scratch":
        raise io.InputError("adapt.label_free adapts the source model: init=source")
    rounds, confidence = adapt.get("rounds", 1), adapt.get("confidence", 0.9)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise io.InputError(f"adapt.rounds={rounds}: give a number of rounds, 1 or more")
    if isinstance(confidence, bool) or not 0 < float(confidence) < 1:
        raise io.InputError(f"adapt.confidence={confidence}: a probability between 0 and 1")
    pseudo = adapt.get("pseudo_samples", 40_000)
    if isinstance(pseudo, bool) or not isinstance(pseudo, int) or pseudo < 1:
        raise io.InputError(f"adapt.pseudo_samples={pseudo}: a number of samples, 1 or more")
    size = adapt.get("pool_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise io.InputError(f"adapt.pool_size={size}: a number of scans, or null for all")
    return METHODS[method]


def pool_subjects(cfg: DictConfig, dataset: Mapping, draw: Mapping) -> list:
    """The unlabelled pool: scans neither tested nor trained on (``adapt.pool`` names them).

    At most ``adapt.pool_size`` scans, a seeded draw (``seed``): each costs a segmentation per
    step and its samples' conv features in memory.
    """
    subjects = cohort.list_subjects(dataset, require_labels=False)
    used = set(draw["train"]) | set(draw["test"])
    named = cfg.adapt.get("pool")
    if named is not None:
        known = {s.id for s in subjects}
        for scan in named:
            cohort.check_id(str(scan), "adapt.pool")
            if str(scan) not in known:
                raise io.InputError(f"adapt.pool: {scan}: not a scan of {dataset.get('root')}")
            if str(scan) in used:
                raise io.InputError(
                    f"adapt.pool: {scan} is a test or labelled training scan: the pool is the "
                    "scans you have not labelled"
                )
        pool = [s for s in subjects if s.id in {str(i) for i in named}]
    else:
        pool = [s for s in subjects if s.id not in used]
    size = cfg.adapt.get("pool_size")
    if size is not None and len(pool) > size:
        order = np.random.default_rng([int(cfg.seed), 1]).permutation(len(pool))
        pool = [pool[i] for i in sorted(order[:size])]
    if not pool:
        raise io.InputError(
            f"adapt.label_free={cfg.adapt.label_free}: {dataset.get('root')} has no scan outside "
            "the test list and the labelled ones to adapt to"
        )
    return pool


def prepare_pool(pool: list, contract, source) -> list[tuple[str, dict]]:
    """The pool's images prepared as the model's input (no label read): (id, item) pairs.

    Bias correction and atlas registration run one process per core, cached beside each scan
    as for any other (``predict.py`` on the same scans later reuses them).
    """
    from rich.progress import track

    images = [s.image for s in pool]
    bias.ensure_corrected(images, contract.preprocess)
    atlas.ensure_priors(images, contract.atlas, source, preprocess=contract.preprocess)
    prepare = contract.pipeline(None, source)
    return [
        (s.id, prepare({"image": str(s.image)}))
        for s in track(pool, description="preparing the unlabelled scans")
    ]


def choose_intensity(cfg: DictConfig, net, pool: list, contract, source, landmarks_of: Callable):
    """The ``nyul`` step: the model's own intensity standardisation or Nyúl's, chosen on the pool.

    Both prepare the pool and the source network segments both; Nyúl's is kept when the pool's
    quality score is not lower with it (:func:`_guarded`, with the model's own as "before").
    Without the step the pool is prepared as ``contract`` says.

    Args:
        cfg: the composed ``finetune.yaml``.
        net: the source network.
        pool: the unlabelled subjects (:func:`pool_subjects`).
        contract: the source model's input contract.
        source: the loaded atlas.
        landmarks_of: ``landmarks_of(contract)`` → the source training images' Nyúl scale, for
            a contract with ``intensity="nyul"``.

    Returns:
        (the contract kept, the pool prepared by it (:func:`prepare_pool`), the step's record
        and the source network's segmentation of that pool — both ``None`` without the step).
    """
    from subseg.training import pseudo_labels

    prepared = prepare_pool(pool, contract, source)
    if "nyul" not in steps_of(cfg):
        return contract, prepared, None, None
    nyul = dataclasses.replace(contract, intensity="nyul", landmarks=None)
    nyul.landmarks = landmarks_of(nyul)
    alternative = prepare_pool(pool, nyul, source)
    net.eval()
    own = pseudo_labels.segment_pool(net, prepared)
    theirs = pseudo_labels.segment_pool(net, alternative)
    entry = {"step": "nyul", "scans": len(pool)}
    guard = bool(cfg.adapt.get("guard", True))
    kept = "not used, the model's own standardisation is kept"
    if _guarded("Nyúl's intensity standardisation", own, theirs, entry, guard, kept):
        return nyul, alternative, entry, theirs
    return contract, prepared, entry, own


def _adabn(cfg, net, scans, rng) -> dict:
    from subseg.training.adabn import adapt_batchnorm, expected_voxels

    volumes = [(item["image"][0], expected_voxels(item["prior"], rng)) for _, item in scans]
    return adapt_batchnorm(net, volumes, rng, int(cfg.adapt.get("voxels_per_scan", 4096)))


def _guarded(
    step: str,
    before,
    after,
    record: dict,
    guard: bool = True,
    undone: str = "undone, the model it started from is kept",
    self_taught: bool = False,
) -> bool:
    """Record a step's effect on the pool's label-free scores; whether to keep it.

    A step is undone when it lowers the pool's quality score, the label-free stand-in for Dice
    (the geometric mean of the network's confidence and its atlas agreement). A step that learns
    from the model's own answers (``self_taught``: self-training) is also undone when it lowers
    the atlas agreement: it raises the confidence by construction, and on a study scanner the
    score rose 0.67 → 0.73 while Dice fell 0.790 → 0.780, the agreement, which no step trains,
    falling with Dice. A step that learns nothing from the answers (AdaBN, the choice of
    standardisation) is judged by the score alone: on a study scanner AdaBN lowered the
    agreement 0.790 → 0.785 while it raised the score and Dice (+0.015), a gain the agreement
    alone would have undone (docs/results.md). Without an atlas the score is the confidence.
    ``guard=False`` (``adapt.guard=false``, for measuring what a step does) keeps every step.
    ``undone`` is what the run prints when it undoes the step.
    """
    from subseg.training.pseudo_labels import pool_agreement

    scores = {
        "pool_qc_before": _quality(before),
        "pool_qc_after": _quality(after),
        "pool_agreement_before": pool_agreement(before),
        "pool_agreement_after": pool_agreement(after),
    }
    judged = [("quality score", "pool_qc")]
    if self_taught:
        judged.append(("atlas agreement", "pool_agreement"))
    lowered = [
        name
        for name, key in judged
        if scores[f"{key}_after"] < scores[f"{key}_before"]  # False for NaN (no atlas)
    ]
    kept = not lowered or not guard
    record.update({**scores, "kept": kept})
    change = (
        f"quality score {scores['pool_qc_before']:.4f} → {scores['pool_qc_after']:.4f}, atlas "
        f"agreement {scores['pool_agreement_before']:.4f} → {scores['pool_agreement_after']:.4f}"
    )
    if not lowered:
        print(f"subseg: {step}: the unlabelled scans' {change}")
    elif not guard:
        print(
            f"subseg: {step} lowered the unlabelled scans' {' and '.join(lowered)} ({change}); "
            "kept (adapt.guard=false)"
        )
    else:
        print(
            f"subseg: {step} lowered the unlabelled scans' {' and '.join(lowered)} ({change}): "
            f"{undone}"
        )
    return kept


def adapt(
    cfg: DictConfig,
    run: RunFolder,
    module,
    labelled: list,
    pool: list[tuple[str, dict]],
    record: dict,
    fit: Callable,
    chosen: tuple[dict, list] | None = None,
):
    """Run the label-free steps (and the labelled fit, for k ≥ 1) and save the run's model.

    Args:
        cfg: the composed ``finetune.yaml``.
        run: the run folder.
        module: the Lightning module, the source weights loaded.
        labelled: the k labelled training items (may be empty).
        pool: the prepared unlabelled scans (:func:`prepare_pool`).
        record: ``transfer.json``'s record; ``label_free`` is added.
        fit: ``fit(module, items, record, extra_samples)`` → (network in eval mode, trainer):
            fine-tuning as TL-k runs it.
        chosen: the ``nyul`` step's record and the source network's segmentation of the pool
            as prepared (:func:`choose_intensity`; ``None`` without the step).

    Returns:
        (the run's network in eval mode, the last trainer or ``None`` when nothing was fitted).
    """
    from subseg.training import pseudo_labels

    steps = steps_of(cfg)
    guard = bool(cfg.adapt.get("guard", True))
    rng = np.random.default_rng(int(cfg.seed))
    log = {"method": str(cfg.adapt.label_free), "pool": [scan for scan, _ in pool], "steps": []}
    record["label_free"] = log
    net = module.net.eval()
    start = copy.deepcopy(net.state_dict())  # what every fit starts from
    kept = start  # the model the run keeps so far
    trainer = None
    if chosen is not None:  # the input was chosen on the pool: the source already segmented it
        log["steps"].append(chosen[0])
        current = chosen[1]
    else:
        current = pseudo_labels.segment_pool(net, pool)
    log["source_scan_qc"] = {s.scan: s.qc for s in current}  # the source's weakness, per scan
    if "adabn" in steps:
        images = pool + [(str(i), item) for i, item in enumerate(labelled)]
        entry = {"step": "adabn", **_adabn(cfg, net, images, rng)}
        adapted = pseudo_labels.segment_pool(net, pool)
        log["steps"].append(entry)
        if _guarded("AdaBN", current, adapted, entry, guard):
            start = kept = copy.deepcopy(net.state_dict())
            current = adapted
    if labelled:  # TL-k first: with self-training, it teaches the first round
        module.net.load_state_dict(start)
        fitted, trainer = fit(module, labelled, record, ())
        kept = copy.deepcopy(fitted.state_dict())
        current = pseudo_labels.segment_pool(fitted, pool)
        log["steps"].append({"step": f"tl{len(labelled)}", "pool_qc": _quality(current)})
    if "self" in steps:
        for round_ in range(1, int(cfg.adapt.get("rounds", 1)) + 1):
            entry, (student, trainer) = _self_training_round(
                cfg, module, start, labelled, pool, current, record, fit, rng
            )
            after = pseudo_labels.segment_pool(student, pool)
            entry["step"] = f"self-training round {round_}"
            log["steps"].append(entry)
            if not _guarded(entry["step"], current, after, entry, guard, self_taught=True):
                break
            kept, current = copy.deepcopy(student.state_dict()), after
    log["pool_qc"] = _quality(current)
    module.net.load_state_dict(kept)
    fitting.save_untrained(run, module)  # the kept model is the run's, whatever a fit wrote
    return module.net.eval(), trainer


def _quality(segmentations) -> float:
    from subseg.training.pseudo_labels import pool_quality

    return pool_quality(segmentations)


def _self_training_round(cfg, module, start, labelled, pool, teacher, record, fit, rng):
    """One round: the teacher's reliable answers on the pool, fitted with the labelled scans.

    Returns:
        (the round's record, (the student in eval mode, its trainer)).
    """
    from subseg.training import pseudo_labels

    keep = pseudo_labels.reliable_structures(teacher)
    items = dict(pool)
    # The pool together gives adapt.pseudo_samples samples (an epoch's cost stays that of a
    # TL-2 run however many scans the pool holds), each scan at most a labelled scan's share.
    per_scan = -(-int(cfg.adapt.get("pseudo_samples", 40_000)) // len(teacher))
    limit = min(per_scan, cfg.sampling.get("samples_per_subject") or per_scan)
    extra, kept = [], []
    for segmentation, structures in zip(teacher, keep, strict=True):
        samples, counts = pseudo_labels.pseudo_samples(
            segmentation,
            items[segmentation.scan],
            structures,
            float(cfg.adapt.get("confidence", 0.9)),
            rng,
            limit,
        )
        extra.append(samples)
        kept.append({"scan": segmentation.scan, **counts})
    entry = {
        "teacher_pool_qc": _quality(teacher),
        "pseudo_labelled": kept,
        "voxels": int(sum(k["kept"] for k in kept)),
        "structures_dropped": int(14 * len(kept) - sum(k["structures_kept"] for k in kept)),
    }
    module.net.load_state_dict(start)
    return entry, fit(module, labelled, record, extra)


def summary_of(record: Mapping) -> dict:
    """``summary.json``'s account of the label-free steps: the pool and its quality scores."""
    log = record["label_free"]
    keys = (
        "step",
        "pool_qc_before",
        "pool_qc_after",
        "pool_agreement_before",
        "pool_agreement_after",
        "kept",
    )
    steps = [{k: step[k] for k in keys if k in step} for step in log["steps"]]
    return {
        "method": log["method"],
        "pool": len(log["pool"]),
        "pool_qc": log["pool_qc"],
        "steps": steps,
    }
