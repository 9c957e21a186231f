"""python train.py dataset=<cohort>: train a network from scratch (see conf/train.yaml)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from subseg.core import io, job_threads, start_method
from subseg.tasks import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    """Train on the source cohort, then evaluate on its test split."""
    job_threads.apply(cfg.threads)  # its share of the cores when a sweep runs jobs side by side
    start_method.reset_in_loky_worker()  # lets a joblib job start its N4/registration pools
    with io.cli_errors():
        train.train(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
