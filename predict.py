"""python predict.py run_dir=<run> input=<file|folder>: segment new T1 scans."""

import hydra
from omegaconf import DictConfig

from subseg.core import io, job_threads, start_method
from subseg.tasks import predict


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    """Segment every input T1 and report structure volumes."""
    job_threads.apply(cfg.threads)  # its share of the cores when a sweep runs jobs side by side
    start_method.reset_in_loky_worker()  # lets a joblib job start its N4/registration pools
    with io.cli_errors():
        predict.predict(cfg)


if __name__ == "__main__":
    main()
