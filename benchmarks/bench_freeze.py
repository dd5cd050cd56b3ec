"""Epoch time of feature extraction against full fine-tuning, measured side by side in one process.

    python benchmarks/bench_freeze.py [--epochs 4]

Targets (resnet18 on digits, 2 CPU cores): freeze=head without the feature cache at most 0.4x the
epoch time of full fine-tuning (no autograd graph through the frozen backbone); with the cache,
epochs after the first at most 1/20 of a full fine-tuning epoch.
"""

from __future__ import annotations

import argparse
import statistics

from common import say, train_history


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    base = [f"trainer.max_epochs={args.epochs}", "trainer.progress=false", "logger=none", "trainer.device=cpu", "model=resnet18", "data=digits"]
    cases = {
        "full fine-tuning (freeze=none)": ["freeze=none"],
        "feature extraction, no cache (freeze=head cache_features=false)": ["freeze=head", "freeze.cache_features=false"],
        "feature extraction, cached (freeze=head)": ["freeze=head"],
    }
    times = {}
    for label, extra in cases.items():
        history = train_history([*base, *extra])
        later = [e["seconds"] for e in history.epochs[1:]]  # epoch 0 warms up allocators and caches
        times[label] = statistics.median(later)
        epochs = ", ".join(f"{e['seconds']:.3f}" for e in history.epochs)
        say(f"{label:<66} median epoch {times[label] * 1000:9.1f} ms  (epochs: {epochs} s)")
    full = times["full fine-tuning (freeze=none)"]
    no_cache = times["feature extraction, no cache (freeze=head cache_features=false)"] / full
    cached = times["feature extraction, cached (freeze=head)"] / full
    say()
    say(f"freeze=head / full, no cache : {no_cache:.3f}x   (target <= 0.40)  {'OK' if no_cache <= 0.4 else 'MISSED'}")
    say(f"freeze=head / full, cached   : {cached:.4f}x  (target <= 0.05)  {'OK' if cached <= 0.05 else 'MISSED'}")


if __name__ == "__main__":
    main()
