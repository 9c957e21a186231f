"""python finetune.py …: see conf/finetune.yaml."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from subseg import finetuning, io


@hydra.main(version_base="1.3", config_path="conf", config_name="finetune")
def main(cfg: DictConfig) -> None:
    """Fine-tune a source model on k target images and evaluate it on the rest."""
    with io.cli_errors():
        finetuning.finetune(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
