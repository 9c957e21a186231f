"""A run folder: every file a training, fine-tuning or evaluation run writes, in one object.

The layout (no other module spells these paths)::

    <run>/.hydra/config.yaml      the composed config (Hydra writes it)
    <run>/environment.json        software and machine (:mod:`subseg.core.environment`)
    <run>/splits.json             subjects used for training, validation and test
    <run>/preprocessing.json      the input contract (:mod:`subseg.preprocessing.contract`)
    <run>/atlas/                  a ``source_labels`` atlas (built in, or copied from the source)
    <run>/qc/                     prior and segmentation overlays
    <run>/checkpoints/            best.ckpt (the model) and last.ckpt (for resume=true)
    <run>/logs/metrics.csv        every number Lightning logged
    <run>/learning_curve.png
    <run>/transfer.json           what fine-tuning copied, reset and froze
    <run>/metrics.csv             per test subject × structure: Dice, HD95, ASSD, volumes
    <run>/summary.json            Avg, wAvg, per-structure Dice, how the fit ended
    <run>/source_test/            the same two files on the source cohort's test subjects
    <run>/segmentations/          test segmentations (evaluate.py segmentations=true)
    <run>/started.json            the config hash and data digests a run started with
    <run>/fit.json                how the fit ended, written as soon as it ends
    <run>/complete.json           written last: the run finished (config hash, config, data)
    <run>/.subseg.lock            held while a process writes it (:mod:`subseg.core.folder_lock`)

A run is complete only when ``complete.json`` exists, and it is written after every other file:
a killed run, or one still running, has none, and every reader (a source run for fine-tuning,
the demo's reuse, the report, evaluate, predict) refuses it with a one-line error. Starting a run
deletes the marker first and then the previous results, so nothing stale survives beside new
files.

A finished run is never replaced silently: starting another configuration in its folder is a
one-line error naming what differs, unless ``overwrite=true``; only a change of the cohort's
files (a corrected label, an added scan) re-runs it, and says which files changed. Default run
names end with :func:`subseg.core.config_identity.config_id`, so runs that differ get folders of
their own, and one process at a time writes a folder (its lock).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from subseg.core import environment, io
from subseg.core.config_identity import UNHASHED_KEYS, strip
from subseg.core.folder_lock import FolderLock
from subseg.core.labels import STRUCTURES
from subseg.preprocessing.contract import InputContract, as_dict


def config_hash(cfg, inputs: Mapping | None = None) -> str:
    """A hash of what determines a run's result: its resolved config and its input models.

    Args:
        cfg: the composed config (DictConfig or mapping).
        inputs: digests of files the run depends on beyond its config (a source checkpoint).

    Returns:
        16 hex digits.
    """
    resolved = as_dict(cfg) or {}
    kept = strip({k: v for k, v in resolved.items() if k not in UNHASHED_KEYS})
    text = json.dumps({"config": kept, "inputs": dict(inputs or {})}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_hash(cfg, inputs: Mapping | None = None, data: Mapping | None = None) -> str:
    """What a run's completion marker records: the config, input models and cohort files.

    Args:
        cfg: the composed config.
        inputs: digests of the model files it starts from (a source checkpoint).
        data: digests of the cohort's files (:func:`subseg.data.cohort.file_digests`).
    """
    return config_hash(cfg, {**dict(inputs or {}), "data": dict(data or {})})


def config_differences(before: Mapping, after: Mapping, limit: int = 4) -> list[str]:
    """What differs between two configs, as ``key: old → new`` (dotted keys, result-changing only).

    Args:
        before: a finished run's config.
        after: the config about to run.
        limit: at most this many entries; one more says how many were left out.
    """

    def flat(node, prefix=""):
        if isinstance(node, Mapping):
            out = {}
            for key, value in node.items():
                if prefix or key not in (*UNHASHED_KEYS, "name"):
                    out.update(flat(value, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: node}

    old, new = flat(strip(as_dict(before) or {})), flat(strip(as_dict(after) or {}))
    changed = [
        f"{key}: {old.get(key, '(unset)')} → {new.get(key, '(unset)')}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]
    return _at_most(changed, limit)


def _at_most(items: list[str], limit: int) -> list[str]:
    """The first ``limit`` items, and one more saying how many were left out."""
    return items if len(items) <= limit else [*items[:limit], f"and {len(items) - limit} more"]


def data_differences(before: Mapping, after: Mapping, limit: int = 4) -> list[str]:
    """Which cohort files changed, were added or removed between two sets of digests."""
    changed = [
        f"{path} {'added' if path not in before else 'removed' if path not in after else 'changed'}"
        for path in sorted(before.keys() | after.keys())
        if before.get(path) != after.get(path)
    ]
    return _at_most(changed, limit)


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
"""Where launchers put a process's rank (Lightning's DDP, torchrun, SLURM's srun)."""


def is_first_process() -> bool:
    """False in every process but the first of a distributed job (any launcher)."""
    return all(os.environ.get(k, "0") == "0" for k in RANK_VARIABLES)


class RunFolder:
    """A training, fine-tuning or evaluation run folder (see the module docstring's layout).

    Args:
        path: the folder.
    """

    CONTRACT = "preprocessing.json"
    MARKER = "complete.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock: FolderLock | None = None

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def config_file(self) -> Path:
        """Hydra's record of the composed config."""
        return self.path / ".hydra" / "config.yaml"

    @property
    def checkpoints_dir(self) -> Path:
        """Lightning's checkpoints (``best.ckpt``, ``last.ckpt``)."""
        return self.path / "checkpoints"

    @property
    def checkpoint(self) -> Path:
        """The model to use: ``checkpoints/best.ckpt``."""
        return self.checkpoints_dir / "best.ckpt"

    @property
    def splits_file(self) -> Path:
        """The subjects used for training, validation and test."""
        return self.path / "splits.json"

    @property
    def atlas_dir(self) -> Path:
        """Where a ``source_labels`` atlas is kept (built in, or copied from the source run)."""
        return self.path / "atlas"

    @property
    def last_checkpoint(self) -> Path:
        """The end of the latest epoch: what ``resume=true`` continues from."""
        return self.checkpoints_dir / "last.ckpt"

    @property
    def logs_dir(self) -> Path:
        """Lightning's loggers write here (``logs/metrics.csv``)."""
        return self.path / "logs"

    @property
    def log_file(self) -> Path:
        """Every number Lightning logged, per step and epoch."""
        return self.logs_dir / "metrics.csv"

    @property
    def learning_curve_file(self) -> Path:
        """The learning curve drawn from :attr:`log_file`."""
        return self.path / "learning_curve.png"

    @property
    def qc_dir(self) -> Path:
        """Prior and segmentation overlays."""
        return self.path / "qc"

    @property
    def brain_file(self) -> Path:
        """What brain extraction did to each scan the run used (``brain_extraction.csv``)."""
        return self.path / "brain_extraction.csv"

    @property
    def segmentations_dir(self) -> Path:
        """Test segmentations (``<id>_seg.nii.gz``)."""
        return self.path / "segmentations"

    @property
    def metrics_file(self) -> Path:
        """Per test subject and structure: Dice, distances, volumes."""
        return self.path / "metrics.csv"

    @property
    def summary_file(self) -> Path:
        """Avg, wAvg and per-structure Dice of the test subjects, and how the fit ended."""
        return self.path / "summary.json"

    @property
    def transfer_file(self) -> Path:
        """What fine-tuning copied, reset and froze."""
        return self.path / "transfer.json"

    @property
    def source_test(self) -> RunFolder:
        """A fine-tuned model's results back on the source cohort's test subjects."""
        return RunFolder(self.path / "source_test")

    @property
    def started_file(self) -> Path:
        """The config hash the run started with: a resume must have the same."""
        return self.path / "started.json"

    @property
    def fit_file(self) -> Path:
        """How the fit ended (:func:`subseg.training.fitting.fit_record`), written when it ends."""
        return self.path / "fit.json"

    @property
    def marker_file(self) -> Path:
        """Written last: the run is complete."""
        return self.path / self.MARKER

    @property
    def environment_file(self) -> Path:
        """The software and machine that made the run (:mod:`subseg.core.environment`)."""
        return self.path / "environment.json"

    def write_environment(self, accelerator: str | None = None) -> dict:
        """Record this process's software and machine in ``environment.json``."""
        record = environment.record(accelerator)
        self.path.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(self.environment_file) as tmp:
            tmp.write_text(json.dumps(record, indent=2))
        return record

    def environment(self) -> dict | None:
        """The recorded environment, or ``None`` for a run made before subseg recorded it."""
        if not self.environment_file.is_file():
            return None
        return json.loads(self.environment_file.read_text())

    @property
    def contract_file(self) -> Path:
        """The input contract (:class:`InputContract`)."""
        return self.path / self.CONTRACT

    @classmethod
    def of(cls, path: str | Path) -> RunFolder | None:
        """The run folder of ``path``: the folder itself or the run a checkpoint lies in."""
        path = Path(path)
        for folder in (path, path.parent.parent):  # <run>/checkpoints/<file>.ckpt
            if cls(folder).config_file.is_file():
                return cls(folder)
        return None

    def config(self) -> dict:
        """The run's composed config: for a complete run, the one its results were made with.

        Hydra rewrites ``.hydra/config.yaml`` whenever a command names this folder, even one
        refused before it starts; the completion marker keeps the config of the results.

        Raises:
            io.InputError: the folder has no ``.hydra/config.yaml``.
        """
        snapshot = (self.completion() or {}).get("config")
        if snapshot is not None:
            return snapshot
        if not self.config_file.is_file():
            raise io.InputError(f"{self.path}: not a subseg run folder (no .hydra/config.yaml)")
        return as_dict(OmegaConf.load(self.config_file))

    def split(self, name: str) -> list[str]:
        """The subject ids of one split (``train``, ``val``, ``test``).

        Raises:
            io.InputError: the folder has no ``splits.json``.
        """
        if not self.splits_file.is_file():
            raise io.InputError(f"{self.path}: no splits.json (not a subseg run folder)")
        return json.loads(self.splits_file.read_text())[name]

    def brain_volumes(self) -> list[float]:
        """The brain mask volume (litres) of each scan the run used (``brain_extraction.csv``).

        Empty for a run made before subseg extracted brains.
        """
        if not self.brain_file.is_file():
            return []
        with open(self.brain_file, newline="") as f:
            return [float(row["brain_litres"]) for row in csv.DictReader(f)]

    def contract(self) -> InputContract:
        """The recorded input contract, the atlas located inside this folder when it is saved.

        Raises:
            io.InputError: the run has no ``preprocessing.json`` (made before subseg recorded
                it, or unfinished).
        """
        if not self.contract_file.is_file():
            raise io.InputError(
                f"{self.path}: no {self.CONTRACT}: this run does not record how its input was "
                "prepared (made by an older subseg): train it again"
            )
        contract = InputContract.from_record(json.loads(self.contract_file.read_text()))
        if contract.atlas.get("kind") == "source_labels":
            contract.atlas = {**contract.atlas, "path": str(self.atlas_dir)}
        return contract

    def write_contract(self, contract: InputContract) -> None:
        """Record the contract in ``preprocessing.json``.

        A ``source_labels`` atlas saved elsewhere (a source run's) is copied in first, so that
        the folder alone rebuilds the model's input.
        """
        record = contract.record()
        if contract.atlas.get("kind") == "source_labels":
            saved = Path(contract.atlas["path"])
            if saved.resolve() != self.atlas_dir.resolve():
                shutil.rmtree(self.atlas_dir, ignore_errors=True)
                shutil.copytree(saved, self.atlas_dir)
            record["atlas"] = {**record["atlas"], "path": None}  # this folder's atlas/
        self.path.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(self.contract_file) as tmp:
            tmp.write_text(json.dumps(record, indent=2))

    def input_record(self) -> dict:
        """What a checkpoint of this run carries of its input, to be a whole model on its own.

        Returns:
            ``contract`` (``preprocessing.json``'s record), ``atlas_files`` (a saved
            ``source_labels`` atlas's files, name → bytes, else ``None``), ``brain_litres``
            (:meth:`brain_volumes`), ``structures`` (the class order) and ``label_ids`` (the
            label protocol of the run's cohort).

        Raises:
            io.InputError: the run has not recorded its contract yet.
        """
        self.contract()  # a one-line error when the run has not recorded it
        record = json.loads(self.contract_file.read_text())  # a saved atlas: path null, atlas/
        atlas_files = None
        if record["atlas"].get("kind") == "source_labels":
            atlas_files = {p.name: p.read_bytes() for p in sorted(self.atlas_dir.iterdir())}
        dataset = (self.config().get("dataset") or {}) if self.config_file.is_file() else {}
        return {
            "contract": record,
            "atlas_files": atlas_files,
            "brain_litres": self.brain_volumes(),
            "structures": list(STRUCTURES),
            "label_ids": dataset.get("label_ids"),
        }

    # --- results ------------------------------------------------------------------------------

    def publish_results(self, rows: list[dict], columns: list[str], summary: Mapping) -> None:
        """Write ``metrics.csv`` and ``summary.json`` together.

        Both are written to temporary files first and renamed one after the other, so a reader
        never sees the new table beside an old summary (the completion marker, written after,
        is what makes them count).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        with (
            io.atomic_path(self.metrics_file) as metrics_tmp,
            io.atomic_path(self.summary_file) as summary_tmp,
        ):
            io.write_csv(rows, columns, metrics_tmp, atomic=False)
            summary_tmp.write_text(json.dumps(dict(summary), indent=2))

    def summary(self) -> dict:
        """The test summary of a complete run.

        Raises:
            io.InputError: the run is not complete.
        """
        self.require_complete()
        return json.loads(self.summary_file.read_text())

    def write_json(self, path: Path, record: Mapping) -> None:
        """Write one of this folder's JSON files atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(path) as tmp:
            tmp.write_text(json.dumps(dict(record), indent=2))

    def read_json(self, path: Path) -> dict:
        """Read one of this folder's JSON files (``{}`` when absent)."""
        return json.loads(path.read_text()) if path.is_file() else {}

    # --- completion ---------------------------------------------------------------------------

    def completion(self) -> dict | None:
        """The completion record (``config_hash``, ``task``, ``finished``), or ``None``."""
        if not self.marker_file.is_file():
            return None
        try:
            return json.loads(self.marker_file.read_text())
        except json.JSONDecodeError:
            return None

    def is_complete(self, expected_hash: str | None = None) -> bool:
        """Whether the run finished (with this config hash, when one is given)."""
        record = self.completion()
        if record is None:
            return False
        return expected_hash is None or record.get("config_hash") == expected_hash

    def require_complete(self) -> RunFolder:
        """Return ``self`` if the run finished.

        Raises:
            io.InputError: no completion marker (a run killed, failed or still running).
        """
        if self.completion() is None:
            what = "results" if self.summary_file.exists() else "files"
            raise io.InputError(
                f"{self.path}: not a complete run (no {self.MARKER}: it was killed, failed or is "
                f"still running, so its {what} cannot be trusted); run it again, or continue it "
                "with resume=true"
            )
        return self

    def begin(self, cfg, inputs: Mapping | None = None, data: Mapping | None = None) -> str | None:
        """Start a run here unless it is already complete with the same config and data.

        A re-run sweep thus skips its finished points; ``cfg.resume`` keeps what continuing a
        killed run needs. The first process takes the folder's lock (held until :meth:`finish`
        or the process ends): a second writer is refused with one line.

        A complete run made with another configuration or input model is refused with one line
        naming the differences, unless ``cfg.overwrite``; one whose only change is the cohort's
        files (``data``) is re-run, and the line says which files changed.

        Args:
            cfg: the run's composed config.
            inputs: digests of the files it depends on (see :func:`config_hash`).
            data: digests of the cohort's files, by path (:func:`subseg.data.cohort.file_digests`).

        Returns:
            The config hash to :meth:`finish` with, or ``None``: complete already, nothing to do.

        Raises:
            io.InputError: another process writes this folder, a finished run of another
                configuration is here, or ``resume=true`` meets another configuration.
        """
        inputs, data = dict(inputs or {}), dict(data or {})
        digest = run_hash(cfg, inputs, data)
        io.ensure_writable(self.path)  # one line now, not a traceback from deep in a writer
        first = is_first_process()  # DDP's relaunched ranks: rank 0 owns the folder
        if first:
            self.lock()
        try:
            if self.is_complete(digest):
                print(
                    f"subseg: {self.path}: already complete with this configuration and data; "
                    "skipped (overwrite=true runs it again)",
                    file=sys.stderr,
                )
                self.unlock()
                return None
            self._refuse_replacing(cfg, inputs, data)
            resume = bool(cfg.get("resume"))
            started = self.read_json(self.started_file).get("config_hash")
            if resume and started not in (None, digest):
                raise io.InputError(
                    f"{self.path}: was started with another configuration; resume=true would mix "
                    "the two (drop resume=true to start afresh, or give this run another name=)"
                )
            if not first:
                return digest
            self.start(resume=resume)
            self.write_config(cfg)
            self.write_json(
                self.started_file,
                {"config_hash": digest, "inputs": inputs, "data": data},
            )
        except BaseException:
            self.unlock()
            raise
        print(f"subseg: run folder {self.path}", file=sys.stderr)
        return digest

    def write_config(self, cfg) -> None:
        """Record the composed config (resolved) and the command's overrides in ``.hydra/``.

        Written here, once the run may start, rather than by Hydra as a command begins
        (``hydra.output_subdir: null`` in the task configs): a command refused at a finished
        run's folder then leaves that folder exactly as it was.
        """
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(as_dict(cfg) or {})
        with io.atomic_path(self.config_file) as tmp:
            OmegaConf.save(cfg, tmp, resolve=True)
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            overrides = list(HydraConfig.get().overrides.task)
            with io.atomic_path(self.config_file.with_name("overrides.yaml")) as tmp:
                OmegaConf.save(OmegaConf.create(overrides), tmp)

    def _refuse_replacing(self, cfg, inputs: dict, data: dict) -> None:
        """Refuse to start over a finished run of another config, unless ``cfg.overwrite``."""
        record = self.completion()
        if record is None:
            return
        # A marker without data digests (an older subseg) cannot say what changed: refused below.
        changed_data = data_differences(record["data"], data) if "data" in record else []
        if cfg.get("overwrite"):
            print(
                f"subseg: {self.path}: overwrite=true: replacing the finished run", file=sys.stderr
            )
            return
        changes = config_differences(record.get("config") or {}, cfg)
        before = record.get("inputs")
        if before is not None and before != inputs:
            moved = sorted(
                k for k in before.keys() | inputs.keys() if before.get(k) != inputs.get(k)
            )
            changes.append(f"its {', '.join(moved)} model file changed")
        if changes or not changed_data:
            what = "; ".join(changes) or "a run made by another subseg version"
            raise io.InputError(
                f"{self.path}: holds a finished run with another configuration ({what}); give "
                "this run another name=, or overwrite=true to replace it"
            )
        print(
            f"subseg: {self.path}: the cohort changed since this run finished "
            f"({', '.join(changed_data)}): running it again",
            file=sys.stderr,
        )

    def lock(self) -> FolderLock:
        """Take this folder's lock (one writer at a time); kept until :meth:`unlock`."""
        self._lock = FolderLock(self.path, "run folder").acquire()
        return self._lock

    def unlock(self) -> None:
        """Release the lock taken by :meth:`lock` (nothing happens if none is held)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def start(self, resume: bool = False) -> None:
        """Begin a run here: the marker goes first, then every earlier result.

        Args:
            resume: keep what a continued run needs (checkpoints, logs, splits, the atlas and
                the contract); the results are recomputed either way.
        """
        self.marker_file.unlink(missing_ok=True)
        results = [
            self.summary_file,
            self.metrics_file,
            self.transfer_file,
            self.learning_curve_file,
            self.environment_file,
            self.source_test.path,
            self.segmentations_dir,
            self.qc_dir,
        ]
        if not resume:
            results += [
                self.started_file,
                self.fit_file,
                self.checkpoints_dir,
                self.logs_dir,
                self.splits_file,
                self.contract_file,
                self.atlas_dir,
            ]
        for path in results:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)

    def finish(self, task: str, config_hash_: str, cfg=None) -> None:
        """Write the completion marker, the last file of every run, and release the lock.

        Args:
            task: ``train``, ``finetune`` or ``evaluate``.
            config_hash_: what :meth:`begin` returned.
            cfg: the run's config, kept in the marker (see :meth:`config`).
        """
        started = self.read_json(self.started_file)
        record = {
            "task": task,
            "config_hash": config_hash_,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": as_dict(cfg),
            "inputs": started.get("inputs", {}),
            "data": started.get("data", {}),
        }
        self.write_json(self.marker_file, record)
        self.unlock()
