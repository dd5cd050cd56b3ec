"""Fine-tune one image classifier as configured in conf/ (python train.py --help lists the options)."""

import hydra
from omegaconf import DictConfig

from tunelab.errors import report_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@report_errors
def main(cfg: DictConfig) -> float:
    from tunelab.tracking import start_helper_early

    start_helper_early(cfg.logger)  # MLflow's helper process imports MLflow while this one imports torch
    from tunelab.run import train

    return train(cfg)


if __name__ == "__main__":
    main()
