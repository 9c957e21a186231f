"""Which trained model a command names, and how its input must be prepared.

``run_dir=`` names a complete run folder (its checkpoint and input contract); ``ckpt=`` names a
checkpoint, inside a run folder (whose contract it takes) or bare (trained elsewhere: the
options or the defaults say how to prepare its input). Fine-tuning names its source the same way
with ``source_run=``.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from subseg.core import io
from subseg.preprocessing import contract as contracts
from subseg.preprocessing.contract import InputContract
from subseg.runs.run_folder import RunFolder


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


def model_of(cfg: DictConfig) -> tuple[Path, InputContract, RunFolder | None]:
    """The model ``run_dir=`` or ``ckpt=`` names, and how its input must be prepared.

    A model inside a run folder brings its recorded contract; ``preprocess=`` or ``atlas=``
    options that contradict it are refused. A bare checkpoint takes the options (or the
    defaults, with a note).

    Returns:
        (checkpoint, input contract, run folder or ``None``).

    Raises:
        io.InputError: no model named, both named and disagreeing, or the run is not complete.
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
        return checkpoint, contracts.contract_from_options(cfg, why), None
    run.require_complete()
    contract = run.contract()
    contracts.check_options(contract, cfg, run.path)
    return checkpoint, contract, run


def model_file(init: str) -> str:
    """A source as a resolved checkpoint path (a run folder stands for its best.ckpt)."""
    if init == "scratch":
        return init
    path = Path(init)
    return str((RunFolder(path).checkpoint if path.is_dir() else path).resolve())


def load_network(checkpoint: str | Path):
    """The network of a Lightning checkpoint, in eval mode on the CPU.

    Read with torch alone: importing Lightning to rebuild the training module would add a second
    to every ``predict.py`` start, for weights the bare network holds.

    Raises:
        io.InputError: the file is missing or not a subseg checkpoint.
    """
    import torch

    from subseg.model.network import SubcorticalNet

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise io.InputError(f"{checkpoint}: no such checkpoint")
    try:
        # Tensors and plain values only: a checkpoint from elsewhere cannot run code on load.
        stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = {k.removeprefix("net."): v for k, v in stored["state_dict"].items()}
        net = SubcorticalNet(dropout=float(stored["hyper_parameters"]["dropout"]))
        net.load_state_dict(state)
    except Exception as exc:  # torch raises many types for a bad file; KeyError for another kind
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise io.InputError(f"{checkpoint}: not a readable subseg checkpoint ({reason})") from None
    return net.eval()
