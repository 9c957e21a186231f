"""python evaluate.py …: see conf/evaluate.yaml."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from subseg import tasks


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Prepare the run folder; the evaluation stage itself lands with issue #5."""
    with tasks.cli_errors():
        tasks.not_built_yet(cfg, HydraConfig.get().runtime.output_dir, "evaluation", 5)


if __name__ == "__main__":
    main()
