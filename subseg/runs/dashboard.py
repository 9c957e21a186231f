"""What a run tells a W&B dashboard: its config, group and tags up front, its results at the end.

A learning-curve sweep is many runs; with the method, k, draw, freeze preset and preprocessing
in each run's config and the test Dice in its summary, a W&B panel plots Dice against k per
method without code.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf

from subseg.runs.method_keys import method_key
from subseg.runs.run_folder import RunFolder


def _experiment() -> str | None:
    """The ``+experiment=…`` a Hydra command chose (``None`` outside Hydra or without one)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get("experiment")


def describe(cfg: DictConfig, run: RunFolder) -> dict:
    """The run's W&B config: a few top-level keys to plot by, then the whole resolved config.

    Keys: ``task``, ``method`` (the report's method name), ``k`` (labelled target images),
    ``draw``, ``freeze``, ``intensity``, ``preprocessing``, ``dataset``, ``config``.
    """
    resolved = OmegaConf.to_container(cfg, resolve=True)
    out = {"task": cfg.task, "dataset": cfg.dataset.name, "config": resolved}
    preprocess = cfg.get("preprocess")
    if preprocess is None and run.contract_file.is_file():  # a fine-tuning run keeps its source's
        preprocess = run.read_json(run.contract_file).get("preprocess")
    out["preprocessing"] = (preprocess or {}).get("name")
    if cfg.task == "finetune":
        out.update(
            method=method_key(cfg),
            k=cfg.target.n_images,
            draw=cfg.target.draw,
            freeze=cfg.freeze.name,
            intensity=cfg.intensity,
            init=cfg.init,
        )
    else:
        out.update(method="source", k=None, draw=None, freeze=None, intensity="zscore")
    return out


def wandb_defaults(cfg: DictConfig, run: RunFolder, given: Mapping) -> dict:
    """``WandbLogger`` arguments the user's config leaves unset: config, group, tags, folder.

    The group is ``<task>-<dataset>[-<experiment>]`` (one per sweep); the tags are the task, the
    method, the dataset, ``k=…``, the freeze preset, the intensity standardisation and the
    preprocessing.
    """
    config = describe(cfg, run)
    out = {"config": config, "dir": str(run.path)}
    if given.get("group") is None:
        experiment = _experiment()
        out["group"] = "-".join(
            str(p) for p in (cfg.task, cfg.dataset.name, experiment) if p is not None
        )
    if given.get("tags") is None:
        tags = [cfg.task, config["method"], config["dataset"]]
        if config["k"] is not None:
            tags.append(f"k={config['k']}")
        tags += [config[key] for key in ("freeze", "intensity", "preprocessing") if config[key]]
        out["tags"] = list(dict.fromkeys(str(t) for t in tags))
    return out


def publish_summary(loggers, summary: Mapping) -> None:
    """Send the test Avg, wAvg and per-structure Dice to each W&B run's summary."""
    values = {"test/avg": summary["avg"], "test/wavg": summary["wavg"]}
    values.update({f"test/dice/{k}": v["mean"] for k, v in summary["per_structure"].items()})
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.summary.update(values)
