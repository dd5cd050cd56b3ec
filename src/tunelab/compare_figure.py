"""The comparison's figure, comparison.png: per data set, the LR curves, the mean val/acc per epoch,
a heat map over the two swept keys and the ranking with its intervals."""

from __future__ import annotations

import math

import numpy as np

from tunelab.compare_report import Comparison, Report, ranked_separately, runs_text
from tunelab.compare_stats import METRIC, NOT_DISTINGUISHABLE, Config, Row
from tunelab.plots import pyplot


def write_figure(comparison: Comparison) -> None:
    """Save `figure` to comparison.png and close it."""
    fig = figure(comparison)
    fig.savefig(comparison.png, dpi=110)
    pyplot().close(fig)


def figure(comparison: Comparison):
    """comparison.png's figure: the four panels of `draw`, one block of them per data set."""
    plt = pyplot()
    reports = comparison.reports
    fig = plt.figure(figsize=(15, 10.5 * len(reports)), layout="constrained")
    if len(reports) == 1:
        draw(reports[0], fig)
        return fig
    fig.suptitle(f"{ranked_separately(len(reports))}:", fontsize=14, fontweight="bold")
    for i, (report, block) in enumerate(zip(reports, fig.subfigures(len(reports), 1))):
        block.set_facecolor("0.94" if i % 2 else "white")
        draw(report, block, heading=f"{report.data} ({runs_text(report)})")
    return fig


def draw(report: Report, fig, heading: str = ""):
    """One data set's panels on `fig` (a figure or a subfigure): LR curves, mean val/acc per epoch, the
    heat map over the two swept keys and the ranking; its title says who won, under `heading` if given."""
    plt = pyplot()
    swept, configs = report.swept, report.configs
    ax_lr, ax_acc, ax_heat, ax_rank = fig.subplots(2, 2).flat
    key_a = swept[0] if swept else None
    key_b = swept[1] if len(swept) > 1 else None
    values_a = sorted({c.values.get(key_a, "") for c in configs}, key=_sort_key) if key_a else [""]
    values_b = sorted({c.values.get(key_b, "") for c in configs}, key=_sort_key) if key_b else [""]
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(values_a)}

    def color(config: Config):
        return colors[config.values.get(key_a, "")] if key_a else "C0"

    _lr_panel(ax_lr, report.rows, key_a, colors)
    _accuracy_panel(ax_acc, report, key_a, values_a, key_b, values_b, colors, color)
    _heat_panel(fig, ax_heat, configs, key_a, values_a, key_b, values_b)
    _ranking_panel(ax_rank, report, color)
    title = report.summary().splitlines()[0].replace("; ", ";\n", 1)
    fig.suptitle(f"{heading}\n{title}" if heading else title, fontsize=12)
    return fig


STYLES = ["-", "--", ":", "-."]


def _lr_panel(ax, rows: list[Row], key_a: str | None, colors: dict) -> None:
    """One LR curve per value of the first swept key (the scheduler, in a scheduler sweep)."""
    shown = set()
    for r in rows:
        va = r.value(key_a) if key_a else ""
        if r.lrs and va not in shown:
            ax.plot(r.lrs, color=colors[va], label=f"{key_a}={va}" if key_a else r.name)
            shown.add(va)
    ax.set(title="Learning rate per optimizer step", xlabel="optimizer step", ylabel="lr")
    if shown:
        ax.legend(fontsize=8)


def _accuracy_panel(ax, report: Report, key_a: str | None, values_a: list[str], key_b: str | None, values_b: list[str],
                    colors: dict, color) -> None:
    """Mean val/acc per epoch of each configuration: color by the first swept key, line style by the second."""
    for c in report.configs:
        curves = [r.curve for r in c.finished if r.curve]
        if not curves:
            continue
        padded = np.full((len(curves), max(map(len, curves))), np.nan)
        for i, curve in enumerate(curves):
            padded[i, :len(curve)] = curve
        epochs = np.arange(padded.shape[1])
        style = STYLES[values_b.index(c.values.get(key_b, "")) % len(STYLES)] if key_b else "-"
        ax.plot(epochs, np.nanmean(padded, axis=0), color=color(c), linestyle=style, marker="o", markersize=3,
                label=f"{report.label(c)} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(epochs, np.nanmin(padded, axis=0), np.nanmax(padded, axis=0), color=color(c), alpha=0.15)
    ax.set(title=f"Mean {METRIC} per epoch (band: min..max over the repeats)", xlabel="epoch", ylabel=METRIC)
    if len(report.configs) <= 8:  # two columns unless the names are long (a weights path, say)
        ax.legend(fontsize=7, ncol=2 if max((len(line.get_label()) for line in ax.get_lines()), default=0) <= 48 else 1)
    elif key_a:  # many lines: name the colors and the line styles once instead of every line
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=colors[v], label=f"{key_a}={v}") for v in values_a]
        if key_b:
            handles += [Line2D([], [], color="0.3", linestyle=STYLES[i % len(STYLES)], label=f"{key_b}={v}") for i, v in enumerate(values_b)]
        ax.legend(handles=handles, fontsize=7, ncol=2, loc="lower right")


def _heat_panel(fig, ax, configs: list[Config], key_a: str | None, values_a: list[str], key_b: str | None,
                values_b: list[str]) -> None:
    """The mean best val/acc (± its 95 % half width) over the first swept key x the second; the best cell in bold."""
    grid = np.full((len(values_a), len(values_b)), np.nan)
    half = np.full_like(grid, np.nan)
    failed = np.zeros_like(grid, dtype=bool)
    for c in configs:
        i = values_a.index(c.values.get(key_a, "")) if key_a else 0
        j = values_b.index(c.values.get(key_b, "")) if key_b else 0
        best = c.best
        if best.n and (np.isnan(grid[i, j]) or best.mean > grid[i, j]):  # the better one where several share a cell
            grid[i, j], half[i, j] = best.mean, best.half_width
        failed[i, j] |= not best.n
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label=f"mean best {METRIC}")
    ax.set_xticks(range(len(values_b)), [_depth_label(key_b, v) for v in values_b],
                  rotation=15 if max(map(len, values_b)) > 12 else 0)  # long values (paths) would overlap
    ax.set_yticks(range(len(values_a)), values_a)
    ax.set(xlabel=key_b or "", ylabel=key_a or "", title=f"Mean best {METRIC} (± 95 % CI)" + (f": {key_a} x {key_b}" if key_b else ""))
    finite = grid[np.isfinite(grid)]
    best_cell = finite.max() if finite.size else None
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(grid[i, j]):
                weight = "bold" if grid[i, j] == best_cell else "normal"
                text_color = "black" if grid[i, j] > middle else "white"
                text = f"{grid[i, j]:.3f}" + (f"\n±{half[i, j]:.3f}" if np.isfinite(half[i, j]) else "")
                ax.text(j, i, text, ha="center", va="center", color=text_color, fontweight=weight, fontsize=9)
            elif failed[i, j]:
                ax.text(j, i, "failed", ha="center", va="center", color="red")


def _ranking_panel(ax, report: Report, color) -> None:
    """The 15 best configurations' mean best val/acc with its 95 % interval, the runs as dots."""
    ranked = report.ranked()[:15][::-1]
    if ranked:
        means = [c.best.mean for c in ranked]
        errors = [0.0 if math.isnan(c.best.half_width) else c.best.half_width for c in ranked]
        bars = ax.barh(range(len(ranked)), means, xerr=errors, capsize=3, color=[color(c) for c in ranked],
                       error_kw={"elinewidth": 1.2})
        marks = {NOT_DISTINGUISHABLE: " ≈", "too few runs to tell": " ?"}
        points = [means[0]]
        for y, (c, bar) in enumerate(zip(ranked, bars)):
            if c.verdict in marks:
                bar.set(hatch="//", alpha=0.45)
            dots = [r.best for r in c.finished]
            ax.scatter(dots, [y] * len(dots), color="black", s=12, zorder=3)
            right = max(c.best.mean + errors[y], *dots)
            ax.text(right, y, f" {c.best.mean:.4f} ({c.best.mean - report.top:+.4f}){marks.get(c.verdict, '')}", va="center", fontsize=8)
            points += [*dots, c.best.mean - errors[y], c.best.mean + errors[y]]
        low, high = min(points), max(points)
        ax.set_xlim(max(0.0, low - (high - low) * 0.5 - 0.01), high + (high - low) * 0.5 + 0.01)
        ax.set_yticks(range(len(ranked)), [report.label(c) for c in ranked])
    ax.set_title(f"Ranking by mean best {METRIC} (bars: 95 % CI, dots: runs)\n"
                 "hatched ≈: not distinguishable from the winner; ?: too few runs", fontsize=11)
    ax.set_xlabel(f"best {METRIC}")
    ax.tick_params(axis="y", labelsize=8)


def _sort_key(value: str):
    """Numbers ascending, negative ones (freeze depths counted from the head) after them, then text."""
    try:
        number = float(value)
    except ValueError:
        return (2, 0.0, value)
    return (0 if number >= 0 else 1, number, value)


def _depth_label(key: str | None, value: str) -> str:
    return f"{value} (head)" if key == "freeze.depth" and value == "-1" else value


