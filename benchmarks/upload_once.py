"""One model upload as the end of `python train.py` makes it, in a fresh process, timed.

    python benchmarks/upload_once.py SQLITE_URI RUN_ID [--no-scan]

torch and torchvision are imported and resnet18 is built first, as at the end of a run; the time
printed (seconds) is `tunelab.tracking.log_pytorch_model`: importing MLflow, the pt2 export and the
files. By default the package scan (`PackageScan`) is started first and waited for, as a run's scan
has finished by its end; `--no-scan` leaves that scan to MLflow, inside the timed call.
"""

from __future__ import annotations

import sys
import time

import torch
import torchvision

from tunelab import tracking


def main() -> None:
    uri, run_id = sys.argv[1], sys.argv[2]
    if "--no-scan" not in sys.argv:
        tracking.PackageScan.start()
        tracking.PackageScan.result(wait_s=60)
    model = torchvision.models.resnet18(num_classes=10).eval()
    example = torch.randn(2, 3, 32, 32).numpy()
    started = time.perf_counter()
    tracking.log_pytorch_model(uri, run_id, model, example)
    print(f"{time.perf_counter() - started:.3f}")


if __name__ == "__main__":
    main()
