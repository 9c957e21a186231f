"""From files to network input: check the cohort, correct the bias field, register the atlas.

Every training, fine-tuning and evaluation run starts here. What is slow (N4, registration) is
cached beside each scan and keyed on its content (:mod:`subseg.core.cache`), so a second run, or a
resumed one, finds it done.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig
from rich.progress import track

from subseg.core import io
from subseg.data import cohort
from subseg.preprocessing import atlas, bias, brain, transforms
from subseg.preprocessing.contract import InputContract, as_dict, with_brain
from subseg.runs.run_folder import RunFolder


def check_subjects(subjects: list, protocol) -> list:
    """Load every subject's image and label through the checks; ``subjects`` back.

    Called before a run writes anything: a bad file is a one-line error naming it, before
    minutes of registration and with no half-made run folder left behind.
    """
    check = transforms.LoadSubjectd(protocol=protocol)
    for subject in track(subjects, description="checking files"):
        check(subject.as_item())
    return subjects


def check_cohort(dataset: Mapping, ids=None) -> list:
    """The cohort's subjects (those of ``ids`` when given), every file checked.

    Every subject listed must be labelled; with ``ids``, the cohort's other subjects may not be
    (a partly labelled folder, for fine-tuning).
    """
    listed = dataset if ids is None else {**dataset, "ids": sorted(ids)}
    subjects = cohort.list_subjects(listed)
    return check_subjects(subjects, dataset["label_ids"])


def prepare_run(
    cfg: DictConfig,
    run: RunFolder,
    subjects: list,
    splits: Mapping | None = None,
    contract: InputContract | None = None,
) -> tuple[dict, list, object, InputContract]:
    """Set up a run folder: splits drawn once, every subject primed.

    Each subject the splits use has its brain extracted (``brain_extraction.csv`` says how),
    its bias field corrected and its atlas prior computed (all cached beside the subject), with
    a QC overlay in the run's ``qc/``; for
    ``task=train``, ``atlas=source_labels`` is built in the run's ``atlas/`` from the training
    split.

    Args:
        cfg: a composed task config with a ``dataset`` entry (and ``preprocess`` and ``atlas``
            entries when ``contract`` is not given).
        run: the run folder.
        subjects: the cohort's subjects, their files checked (:func:`check_cohort`).
        splits: splits drawn by the task (default: the cohort's own, drawn once).
        contract: how the model's input is prepared (a source run's); default: from ``cfg``.

    Returns:
        (the splits written to the run's ``splits.json``, the subjects they use, the atlas
        source, the input contract with its atlas located).
    """
    dataset = as_dict(cfg.dataset)
    if contract is None:
        contract = InputContract(with_brain(as_dict(cfg.preprocess), cfg), as_dict(cfg.atlas))
    protocol = dataset["label_ids"]
    splits = cohort.ensure_splits(run.splits_file, dataset, subjects, splits)
    used = {i for ids in splits.values() for i in ids}
    subjects = [s for s in subjects if s.id in used]  # a draw may leave subjects unused
    images = [s.image for s in subjects]
    bias.ensure_corrected(images, contract.preprocess)
    write_brain_table(run.brain_file, subjects, contract.preprocess)
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
        atlas.save_prior_qc(image, prior, run.qc_dir / f"{subject.id}_prior.png")
    return splits, subjects, source, contract


BRAIN_COLUMNS = ("subject", "extraction", "brain_litres", "scan_litres", "image")


def brain_rows(subjects: list, preprocess) -> list[dict]:
    """What brain extraction did to each subject's scan (masks from the cache)."""
    rows = []
    for subject in subjects:
        image = io.load_image(subject.image)
        found = brain.brain_mask(image.path, image.data, image.affine, preprocess)
        rows.append(
            {
                "subject": subject.id,
                "extraction": found.method,
                "brain_litres": round(found.litres, 4),
                "scan_litres": round(found.scan_litres, 4),
                "image": str(subject.image),
            }
        )
    return rows


def write_brain_table(path, subjects: list, preprocess) -> None:
    """Write :func:`brain_rows` as a run's ``brain_extraction.csv``."""
    io.write_csv(brain_rows(subjects, preprocess), BRAIN_COLUMNS, path)


def cached_subjects(by_id, protocol, contract: InputContract, source, num_workers=0):
    """A function: subject ids → a MONAI ``CacheDataset`` of subjects prepared as ``contract``."""
    from monai.data import CacheDataset

    pipeline = contract.pipeline(protocol, source)

    def cached(ids):
        items = [by_id[i].as_item() for i in ids]
        return CacheDataset(items, pipeline, num_workers=int(num_workers), progress=False)

    return cached


def nyul_landmarks(source: RunFolder, source_cfg: Mapping, contract: InputContract) -> list:
    """The source training images' standard scale (Nyúl stage one), prepared as ``contract``.

    Raises:
        io.InputError: the source run's training images are gone, or one has no usable histogram.
    """
    paths = training_images(source, source_cfg)
    prepare = contract.intensities(landmarks=False)
    images = [prepare({"image": str(path)})["image"][0].numpy() for path in paths]
    try:
        return [float(v) for v in transforms.learn_standard_scale(images)]
    except ValueError as error:
        raise io.InputError(
            f"{source.path}: its training images give no Nyúl scale: {error}"
        ) from None


def training_images(source: RunFolder, source_cfg: Mapping) -> list:
    """The image files a source run trained on (Nyúl's reference), checked to be there.

    Raises:
        io.InputError: none of them is found (the source cohort moved or was deleted).
    """
    train_ids = set(source.split("train"))
    found = [
        s.image
        for s in cohort.list_subjects(source_cfg["dataset"], require_labels=False)
        if s.id in train_ids
    ]
    if not found:
        raise io.InputError(
            f"{source.path}: none of its {len(train_ids)} training images is at "
            f"{source_cfg['dataset'].get('root')} any more; Nyúl's scale is learnt from them"
        )
    return found


def source_training_items(source: RunFolder, source_cfg: Mapping, contract) -> list:
    """A source run's training images prepared as ``contract`` (for the mixed baseline)."""
    dataset = dict(source_cfg["dataset"])
    subjects = {s.id: s for s in cohort.list_subjects(dataset)}
    cached = cached_subjects(subjects, dataset["label_ids"], contract, contract.load_atlas())
    return list(cached(source.split("train")))
