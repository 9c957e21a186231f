"""python finetune.py …: see conf/finetune.yaml."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from subseg import tasks


@hydra.main(version_base="1.3", config_path="conf", config_name="finetune")
def main(cfg: DictConfig) -> None:
    """Prepare the run folder; the transfer learning stage itself lands with issue #5."""
    with tasks.cli_errors():
        tasks.not_built_yet(cfg, HydraConfig.get().runtime.output_dir, "transfer learning", 5)


if __name__ == "__main__":
    main()
