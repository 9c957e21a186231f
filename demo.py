"""make demo: the subseg story on the embedded synthetic cohorts (see conf/demo.yaml)."""

import hydra
from omegaconf import DictConfig

from subseg.core import io
from subseg.report import cohort_preview
from subseg.tasks import protocol


@hydra.main(version_base="1.3", config_path="conf", config_name="demo")
def main(cfg: DictConfig) -> None:
    """Summarise the cohorts, then run the protocol and write the report."""
    with io.cli_errors():
        cohort_preview.write_cohort_preview(cfg)
        protocol.run(cfg)


if __name__ == "__main__":
    main()
