"""python predict.py run_dir=<run> input=<file|folder>: segment new T1 scans."""

import hydra
from omegaconf import DictConfig

from subseg import io, prediction


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    """Segment every input T1 and report structure volumes."""
    with io.cli_errors():
        prediction.predict(cfg)


if __name__ == "__main__":
    main()
