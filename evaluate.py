"""python evaluate.py …: see conf/evaluate.yaml."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from subseg.core import io, job_threads, start_method
from subseg.tasks import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Evaluate a run's model on its cohort's test subjects (or another cohort's)."""
    job_threads.apply(cfg.threads)  # its share of the cores when a sweep runs jobs side by side
    start_method.reset_in_loky_worker()  # lets a joblib job start its N4/registration pools
    with io.cli_errors():
        evaluate.evaluate(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
