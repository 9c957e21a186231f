"""The command line: one Hydra entry point per command.

The same functions serve the repository's scripts (``python train.py …``) and the installed
console scripts (``subseg-train …``); both read the configs shipped inside the package
(``subseg/conf``), so an installed wheel needs no checkout. Each config names its Hydra job
(``hydra.job.name``), so the job's log is ``train.log`` whichever way it was started.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from subseg import CONF_DIR
from subseg.core import io, job_threads, start_method

# An absolute folder: a relative one would be read as the module subseg.conf when the command
# runs as a console script, and the config tree is data, not a Python package.
CONFIGS = str(CONF_DIR)


def _job(cfg: DictConfig) -> None:
    """What every job does first: its share of the cores, and a start method its pools can use."""
    job_threads.apply(cfg.threads)  # its share of the cores when a sweep runs jobs side by side
    start_method.reset_in_loky_worker()  # lets a joblib job start its N4/registration pools


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="train")
def train(cfg: DictConfig) -> None:
    """Train on the source cohort, then evaluate on its test split (``subseg-train``)."""
    from subseg.tasks import train as task

    _job(cfg)
    with io.cli_errors():
        task.train(cfg, HydraConfig.get().runtime.output_dir)


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="finetune")
def finetune(cfg: DictConfig) -> None:
    """Fine-tune a source model on k target images and evaluate it (``subseg-finetune``)."""
    from subseg.tasks import finetune as task

    _job(cfg)
    with io.cli_errors():
        task.finetune(cfg, HydraConfig.get().runtime.output_dir)


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="evaluate")
def evaluate(cfg: DictConfig) -> None:
    """Evaluate a model on its cohort's test subjects, or another's (``subseg-evaluate``)."""
    from subseg.tasks import evaluate as task

    _job(cfg)
    with io.cli_errors():
        task.evaluate(cfg, HydraConfig.get().runtime.output_dir)


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="predict")
def predict(cfg: DictConfig) -> None:
    """Segment every input T1 and report structure volumes (``subseg-predict``)."""
    from subseg.tasks import predict as task

    _job(cfg)
    with io.cli_errors():
        task.predict(cfg)


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="suggest")
def suggest(cfg: DictConfig) -> None:
    """Rank scans by how much labelling each would help fine-tuning (``subseg-suggest``)."""
    from subseg.tasks import suggest as task

    _job(cfg)
    with io.cli_errors():
        task.suggest(cfg)


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="demo")
def demo(cfg: DictConfig) -> None:
    """The cohorts' summary, the paper's protocol and the report (``subseg-demo``)."""
    from subseg.report import cohort_preview
    from subseg.tasks import protocol

    with io.cli_errors():
        cohort_preview.write_cohort_preview(cfg)
        protocol.run(cfg)
