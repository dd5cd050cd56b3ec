"""How long the LR preview takes to step a schedule through 100,000 optimizer steps (target < 1 s).

    python benchmarks/bench_preview.py

The first schedule built in a process also pays one-time imports (torch.optim's machinery, Hydra's
instantiate); it is timed separately.
"""

from __future__ import annotations

import time

from common import compose, say

from tunelab.preview import lr_series

STEPS_PER_EPOCH, EPOCHS = 1000, 100


def main() -> None:
    timings = []
    for name in ["cosine", "cosine", "step", "multistep", "exponential", "onecycle", "cyclic", "cosine_restarts", "plateau", "lambda", "step_decay"]:
        cfg = compose([f"scheduler={name}", f"trainer.max_epochs={EPOCHS}", "scheduler.warmup_epochs=1"])
        started = time.perf_counter()
        values = lr_series(cfg, STEPS_PER_EPOCH)
        timings.append((name, len(values), time.perf_counter() - started))
    first, *rest = timings
    say(f"first schedule of the process ({first[0]}, one-time imports included): {first[2]:.3f} s")
    for name, steps, seconds in rest:
        say(f"{name:>16}: {steps} steps in {seconds:.3f} s  {'OK' if seconds < 1 else 'MISSED'} (target < 1 s)")


if __name__ == "__main__":
    main()
