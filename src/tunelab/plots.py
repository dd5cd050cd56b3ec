"""Figures a person would rather look at than read: learning-rate curves, and the pyplot every figure is drawn with."""

from __future__ import annotations

from typing import Mapping, Sequence


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no window), loaded on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt




def lr_curves(curves: Mapping[str, Sequence[float]], steps_per_epoch: int | None = None, title: str = "Learning rate",
              end_together: bool = False):
    """One line per curve (a param group, or a scheduler in a preview), x = optimizer step.

    `end_together`: the curves are the param groups of one run, which all last to its end; a
    shorter one belongs to a stage that gradual unfreezing added later, and starts that late.
    Otherwise every curve starts at step 0 (schedules of different lengths in a preview).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    longest = max((len(v) for v in curves.values()), default=0)
    colors = plt.cm.tab20.colors if len(curves) > 10 else plt.cm.tab10.colors
    for (name, values), color in zip(curves.items(), colors * (len(curves) // len(colors) + 1)):
        first = longest - len(values) if end_together else 0
        ax.plot(range(first, first + len(values)), values, label=name, linewidth=1.6, color=color)
    if steps_per_epoch and longest and longest / steps_per_epoch <= 60:
        for boundary in range(steps_per_epoch, longest, steps_per_epoch):
            ax.axvline(boundary, color="0.88", linewidth=0.8, zorder=0)
    ax.set_xlabel("optimizer step" + (f" ({steps_per_epoch} per epoch)" if steps_per_epoch else ""))
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    return fig
