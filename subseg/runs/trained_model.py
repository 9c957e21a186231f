"""Which trained model a command names, and how its input must be prepared: the one loader.

``run_dir=`` names a complete run folder (its checkpoint and input contract); ``ckpt=`` names a
checkpoint, inside a run folder (whose contract it takes) or on its own. Every checkpoint subseg
writes carries its network's config and its input contract (preprocessing, atlas — a saved
``source_labels`` atlas's files included —, Nyúl landmarks, class order), so a ``best.ckpt``
copied anywhere predicts as its run folder does; one from elsewhere, or from an older subseg,
takes the options or the defaults. Fine-tuning names its source the same way with
``source_run=``.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from subseg.core import io
from subseg.core.labels import STRUCTURES
from subseg.preprocessing import contract as contracts
from subseg.preprocessing.contract import InputContract
from subseg.runs.run_folder import RunFolder

NETWORK_KEY = "subseg_network"
"""The checkpoint entry holding the network's config (:meth:`SubcorticalNet.config`)."""

INPUT_KEY = "subseg_input"
"""The checkpoint entry holding the model's input contract (:meth:`RunFolder.input_record`)."""


def source_run(cfg: DictConfig) -> tuple[RunFolder | None, dict | None, Path | None]:
    """The source model named by ``cfg.source_run``: a complete training run or a checkpoint.

    Returns:
        (run folder, its composed config, checkpoint); the first two are ``None`` for a bare
        checkpoint (one trained elsewhere) and all three when no source is named.

    Raises:
        io.InputError: the named run is not complete (killed, failed or still running).
    """
    if not cfg.get("source_run"):
        return None, None, None
    named = Path(cfg.source_run)
    if named.is_file():
        run = RunFolder.of(named)
        if run is not None:
            run.require_complete()
        return run, run.config() if run else None, named
    run = RunFolder(named)
    if not run.config_file.is_file():
        raise io.InputError(f"{named}: neither a subseg training run folder nor a checkpoint file")
    run.require_complete()
    return run, run.config(), run.checkpoint


@dataclass
class TrainedModel:
    """A model a command names, ready to use: its network and how to prepare its input.

    Attributes:
        checkpoint: the checkpoint file.
        net: the network, in eval mode on the CPU.
        contract: how its input is prepared (the options applied).
        run: its run folder, or ``None`` for a checkpoint on its own.
        brain_litres: the brain volumes of the scans it was made with (empty when unknown).
    """

    checkpoint: Path
    net: object
    contract: InputContract
    run: RunFolder | None
    brain_litres: list[float] = field(default_factory=list)


def model_of(cfg: DictConfig) -> TrainedModel:
    """The model ``run_dir=`` or ``ckpt=`` names, and how its input must be prepared.

    A model inside a run folder brings its recorded contract, and so does a checkpoint on its
    own (every checkpoint carries it since the contract travelled inside them); ``preprocess=``
    or ``atlas=`` options that contradict it are refused. A checkpoint on its own without a
    record (trained elsewhere, or by an older subseg) takes the options (or the defaults, with
    a note).

    Raises:
        io.InputError: no model named, both named and disagreeing, the run is not complete, or
            the checkpoint is unreadable.
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
    if run is not None:
        run.require_complete()
    stored = read_checkpoint(checkpoint)
    net = network_of(stored, checkpoint)
    if run is not None:
        contract = contracts.check_options(run.contract(), cfg, run.path)
        return TrainedModel(checkpoint, net, contract, run, run.brain_volumes())
    embedded = checkpoint_contract(stored, checkpoint)
    if embedded is None:
        why = f"{checkpoint} is a bare checkpoint (what it was trained with is unknown)"
        return TrainedModel(checkpoint, net, contracts.contract_from_options(cfg, why), None)
    contract = contracts.check_options(embedded, cfg, checkpoint)
    return TrainedModel(checkpoint, net, contract, None, stored[INPUT_KEY].get("brain_litres", []))


def model_file(init: str) -> str:
    """A source as a resolved checkpoint path (a run folder stands for its best.ckpt)."""
    if init == "scratch":
        return init
    path = Path(init)
    return str((RunFolder(path).checkpoint if path.is_dir() else path).resolve())


def read_checkpoint(checkpoint: str | Path) -> dict:
    """A checkpoint's contents, read with torch alone (tensors and plain values only).

    Importing Lightning to rebuild the training module would add a second to every
    ``predict.py`` start, for weights the bare network holds; and plain values only means a
    checkpoint from elsewhere cannot run code on load.

    Raises:
        io.InputError: the file is missing or unreadable.
    """
    import torch

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise io.InputError(f"{checkpoint}: no such checkpoint")
    try:
        stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        reason = _reason(exc)
        raise io.InputError(f"{checkpoint}: not a readable subseg checkpoint ({reason})") from None
    if isinstance(stored, dict) and "state_dict" not in stored:  # a network's state_dict alone
        stored = {"state_dict": stored}
    if not isinstance(stored, dict) or not isinstance(stored["state_dict"], dict):
        raise io.InputError(f"{checkpoint}: holds no state_dict")
    return stored


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def network_config(stored: dict) -> dict | None:
    """The config of a checkpoint's network (:meth:`SubcorticalNet.config`).

    Checkpoints written before the config travelled in them hold the dropout alone, as the
    training module's hyper-parameter; the network was then always ``SubcorticalNet``.

    Returns:
        The config, or ``None`` when the checkpoint says neither (a bare ``state_dict``, or
        another program's model).
    """
    if NETWORK_KEY in stored:
        return dict(stored[NETWORK_KEY])
    dropout = (stored.get("hyper_parameters") or {}).get("dropout")
    if dropout is None:
        return None
    from subseg.model.network import SubcorticalNet

    return SubcorticalNet.config_of(dropout)


def network_of(stored: dict, checkpoint: str | Path):
    """The network of a checkpoint's contents (:func:`read_checkpoint`), in eval mode.

    Raises:
        io.InputError: it is not a subseg network, or its classes are not subseg's.
    """
    from subseg.model.network import build_network

    structures = (stored.get(INPUT_KEY) or {}).get("structures")
    if structures is not None and list(structures) != list(STRUCTURES):
        raise io.InputError(
            f"{checkpoint}: the model segments {len(structures)} structures in another order "
            f"({', '.join(structures[:3])}…) than this subseg ({', '.join(STRUCTURES[:3])}…)"
        )
    config = network_config(stored)
    if config is None:
        raise io.InputError(f"{checkpoint}: not a subseg model (it names no subseg network)")
    try:
        net = build_network(config)
        state = {k.removeprefix("net."): v for k, v in stored["state_dict"].items()}
        net.load_state_dict(state)
    except Exception as exc:  # KeyError, ValueError, RuntimeError: another kind of checkpoint
        reason = _reason(exc)
        raise io.InputError(f"{checkpoint}: not a readable subseg checkpoint ({reason})") from None
    return net.eval()


def load_network(checkpoint: str | Path):
    """The network of a Lightning checkpoint (any subseg's, old ones too), in eval mode on the CPU.

    Raises:
        io.InputError: the file is missing or not a subseg checkpoint.
    """
    return network_of(read_checkpoint(checkpoint), checkpoint)


_MATERIALISED: dict[str, Path] = {}
"""Saved atlases unpacked from checkpoints in this process, by their files' digest."""


def checkpoint_contract(stored: dict, checkpoint: str | Path) -> InputContract | None:
    """The input contract a checkpoint carries (``None`` for one written before they did).

    A ``source_labels`` atlas travels as its files; they are unpacked once per process into a
    temporary folder (removed at exit) that the contract points at, as a run folder's
    ``atlas/``.

    Raises:
        io.InputError: the record names a saved atlas the checkpoint lacks.
    """
    record = stored.get(INPUT_KEY)
    if not record:
        return None
    contract = InputContract.from_record(record["contract"])
    if contract.atlas.get("kind") == "source_labels":
        files = record.get("atlas_files")
        if not files:
            raise io.InputError(f"{checkpoint}: its source_labels atlas is missing")
        contract.atlas = {**contract.atlas, "path": str(_unpacked_atlas(files))}
    return contract


def _unpacked_atlas(files: dict) -> Path:
    """A folder holding ``files`` (name → bytes), made once per process and removed at exit."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name])
    key = digest.hexdigest()
    if key not in _MATERIALISED:
        folder = Path(tempfile.mkdtemp(prefix="subseg-atlas-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        for name, content in files.items():
            (folder / Path(name).name).write_bytes(content)  # a bare name: never outside it
        _MATERIALISED[key] = folder
    return _MATERIALISED[key]
