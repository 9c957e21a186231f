"""python suggest.py source_run=<run> input=<folder of scans> n=<k>: which scans to label first."""

import hydra
from omegaconf import DictConfig

from subseg.core import io, job_threads, start_method
from subseg.tasks import suggest


@hydra.main(version_base="1.3", config_path="conf", config_name="suggest")
def main(cfg: DictConfig) -> None:
    """Rank the scans by how much labelling each would help fine-tuning."""
    job_threads.apply(cfg.threads)
    start_method.reset_in_loky_worker()
    with io.cli_errors():
        suggest.suggest(cfg)


if __name__ == "__main__":
    main()
