"""Fine-tune one image classifier as configured in conf/ (python train.py --help lists the options)."""

from tunelab.quick_exit import skip_teardown  # first: its exit hook must be the last one to run

import sys  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from tunelab import folders  # noqa: E402, F401  (registers ${tunelab.new_folder:...}, the run folders of conf/config.yaml)
from tunelab.cli import report_errors  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@report_errors
def main(cfg: DictConfig) -> float:
    from tunelab.checks import check_config

    check_config(cfg)  # bad values end here, in about a second: before torch is imported and MLflow's helper starts
    from tunelab.tracking import start_helper_early

    start_helper_early(cfg.logger)  # MLflow's helper process imports MLflow while this one imports torch
    from tunelab.run import train

    return train(cfg)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside training (which stops, saves and reports on its own): e.g. in the imports
        print("\nInterrupted.", file=sys.stderr)
        raise SystemExit(130) from None
    from tunelab.sweep import failed_jobs

    if failed_jobs():  # a sweep went on past its failed jobs (each is a FAILED run): say so in the exit status
        raise SystemExit(1)
    skip_teardown()  # everything is stored: end without freeing torch's and MLflow's modules (1-3 s)
