"""The command line: one Hydra entry point per command.

The same functions serve the repository's scripts (``python train.py …``) and the installed
console scripts (``subseg-train …``); both read the configs shipped inside the package
(``subseg/conf``), so an installed wheel needs no checkout. Each config names its Hydra job
(``hydra.job.name``), so the job's log is ``train.log`` whichever way it was started.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from subseg import CONF_DIR
from subseg.core import io, job_threads, start_method

# An absolute folder: a relative one would be read as the module subseg.conf when the command
# runs as a console script, and the config tree is data, not a Python package.
CONFIGS = str(CONF_DIR)


RUN_FOLDER_TASKS = ("train", "finetune", "evaluate")
"""The commands that write a run folder: Hydra's run directory, named by the config."""


def _command(name: str, doc: str) -> Callable[[], None]:
    """The Hydra entry point of command ``name``: ``subseg.tasks.<name>.<name>(cfg, …)``.

    The task's module is imported when the command runs, so each command starts with what it
    uses only.
    """

    @hydra.main(version_base="1.3", config_path=CONFIGS, config_name=name)
    def main(cfg: DictConfig) -> None:
        job_threads.apply(cfg.threads)  # its share of the cores when a sweep runs jobs side by side
        start_method.reset_in_loky_worker()  # lets a joblib job start its N4/registration pools
        task = getattr(importlib.import_module(f"subseg.tasks.{name}"), name)
        with io.cli_errors():
            if name in RUN_FOLDER_TASKS:
                task(cfg, HydraConfig.get().runtime.output_dir)
            else:
                task(cfg)

    main.__doc__ = doc
    return main


train = _command("train", "Train on the source cohort, then evaluate on its test split.")
finetune = _command("finetune", "Fine-tune a source model on k target images and evaluate it.")
evaluate = _command("evaluate", "Evaluate a model on its cohort's test subjects, or another's.")
predict = _command("predict", "Segment every input T1 and report structure volumes.")
suggest = _command("suggest", "Rank scans by how much labelling each would help fine-tuning.")


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="demo")
def demo(cfg: DictConfig) -> None:
    """The cohorts' summary, the paper's protocol and the report (``subseg-demo``)."""
    from subseg.report import cohort_preview
    from subseg.tasks import protocol

    with io.cli_errors():
        cohort_preview.write_cohort_preview(cfg)
        protocol.run(cfg)
