"""The comparison's figure, comparison.png: per data set, the LR curves, the mean val/acc per epoch,
a heat map over the two swept keys and the ranking with its intervals."""

from __future__ import annotations

import math
import textwrap

import numpy as np

from tunelab.compare_report import Comparison, Report, others_text, ranked_separately, runs_text
from tunelab.compare_stats import METRIC, NOT_DISTINGUISHABLE, TEST_METRIC, TOO_FEW, Config, Row
from tunelab.plots import pyplot

#: The height of a row of panels, in inches; the ranking's row grows past it with the configurations.
ROW_HEIGHT = 5.25
#: The ranking's height per configuration and for its title and axis, in inches.
RANK_HEIGHT, RANK_MARGIN = 0.34, 1.6


def write_figure(comparison: Comparison) -> None:
    """Save `figure` to comparison.png and close it."""
    fig = figure(comparison)
    fig.savefig(comparison.png, dpi=110)
    pyplot().close(fig)


def figure(comparison: Comparison):
    """comparison.png's figure: the four panels of `draw`, one block of them per data set."""
    plt = pyplot()
    reports = comparison.reports
    heights = [ROW_HEIGHT + _ranking_height(report) for report in reports]
    fig = plt.figure(figsize=(15, sum(heights)), layout="constrained")
    if len(reports) == 1:
        draw(reports[0], fig)
        return fig
    fig.suptitle(f"{ranked_separately(len(reports))}:", fontsize=14, fontweight="bold")
    for i, (report, block) in enumerate(zip(reports, fig.subfigures(len(reports), 1, height_ratios=heights))):
        block.set_facecolor("0.94" if i % 2 else "white")
        draw(report, block, heading=f"{report.data} ({runs_text(report)})")
    return fig


def _ranking_height(report: Report) -> float:
    """The height of the row with the ranking: a row's, or more when it has too many configurations to read."""
    return max(ROW_HEIGHT, RANK_MARGIN + RANK_HEIGHT * len(report.ranked()))


def draw(report: Report, fig, heading: str = "") -> dict:
    """One data set's panels on `fig` (a figure or a subfigure): LR curves, mean val/acc per epoch, the
    heat map over the two swept keys and the ranking; its title says who won, on val and on test, and what
    the others' runs can tell, under `heading` if given. Returns the panels' axes by name: "lr", "accuracy",
    "heat", "ranking"."""
    plt = pyplot()
    swept, configs = report.swept, report.configs
    axes = fig.subplots(2, 2, height_ratios=[ROW_HEIGHT, _ranking_height(report)])
    ax_lr, ax_acc, ax_heat, ax_rank = axes.flat
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
    lines = [*report.summary().splitlines()[0].split("; ", 2), others_text(report.ranked())]
    title = "\n".join(textwrap.fill(line, 150) for line in lines if line)
    fig.suptitle(f"{heading}\n{title}" if heading else title, fontsize=12)
    return {"lr": ax_lr, "accuracy": ax_acc, "heat": ax_heat, "ranking": ax_rank}


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
    """Every ranked configuration's mean best val/acc with its 95 % interval, the runs as dots; below each, thinner
    and gray, its mean test/acc with its interval when its runs logged one."""
    ranked = report.ranked()[::-1]
    if not ranked:
        return
    with_test = any(c.test_acc.n for c in ranked)
    val_y, height = (0.16, 0.5) if with_test else (0.0, 0.8)
    means = [c.best.mean for c in ranked]
    errors = [_half(c.best) for c in ranked]
    bars = ax.barh(np.arange(len(ranked)) + val_y, means, height=height, xerr=errors, capsize=3,
                   color=[color(c) for c in ranked], error_kw={"elinewidth": 1.2})
    marks = {NOT_DISTINGUISHABLE: " ≈", TOO_FEW: " ?"}
    points = [means[0]]
    for y, (c, bar) in enumerate(zip(ranked, bars)):
        if c.verdict in marks:
            bar.set(hatch="//", alpha=0.45)
        dots = [r.best for r in c.finished]
        ax.scatter(dots, [y + val_y] * len(dots), color="black", s=12, zorder=3)
        right = max(c.best.mean + errors[y], *dots)
        ax.text(right, y + val_y, f" {c.best.mean:.4f} ({c.best.mean - report.top:+.4f}){marks.get(c.verdict, '')}"
                + _test_label(c), va="center", fontsize=8)
        points += [*dots, c.best.mean - errors[y], c.best.mean + errors[y]]
    if with_test:
        points += _test_bars(ax, ranked)
    low, high = min(points), max(points)
    left = max(0.0, low - (high - low) * 0.5 - 0.01)
    # the right 25 % of the axis for the numbers after the bars, 40 % when they name the test/acc too
    ax.set_xlim(left, high + (high - left) * (2 / 3 if with_test else 1 / 3))
    ax.set_ylim(-0.6, len(ranked) - 0.4)
    ax.set_yticks(range(len(ranked)), [report.label(c) for c in ranked])
    which = f"All {len(ranked)} configurations" if len(ranked) > 1 else "The one configuration"
    ax.set_title(f"{which} ranked by mean best {METRIC}\n(bars: 95 % CI, dots: runs; "
                 "hatched ≈: not distinguishable\nfrom the winner; ?: too few runs)", fontsize=11)
    ax.set_xlabel(f"best {METRIC}" + (f"; {TEST_METRIC} (gray)" if with_test else ""))
    ax.tick_params(axis="y", labelsize=8)


def _test_bars(ax, ranked: list[Config]) -> list[float]:
    """Each configuration's mean test/acc, a thin gray bar with its 95 % interval below its val/acc bar, and the
    legend; the means, for the axis limits (an interval over two runs is wide and may run off the axis)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    means = []
    for y, c in enumerate(ranked):
        held_out = c.test_acc
        if held_out.n:
            ax.barh(y - 0.26, held_out.mean, height=0.26, xerr=_half(held_out), capsize=2, color="0.55",
                    error_kw={"elinewidth": 1})
            means.append(held_out.mean)
    ax.legend(handles=[Patch(facecolor="white", edgecolor="0.3", label=f"{METRIC} (ranked)"),
                       Patch(facecolor="0.55", label=f"{TEST_METRIC} (not ranked)"),
                       Line2D([], [], color="black", marker="o", linestyle="", markersize=4, label="a run")],
              fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    return means


def _test_label(config: Config) -> str:
    """"; test 0.9750" after the configuration's val/acc, with its n where fewer runs logged a test/acc; "" without."""
    held_out = config.test_acc
    if not held_out.n:
        return ""
    return f"; test {held_out.mean:.4f}" + (f" (n={held_out.n})" if held_out.n != config.best.n else "")


def _half(s) -> float:
    """The interval's half width; 0 where there is none (n=1), so that no error bar is drawn."""
    return 0.0 if math.isnan(s.half_width) else s.half_width


def _sort_key(value: str):
    """Numbers ascending, negative ones (freeze depths counted from the head) after them, then text."""
    try:
        number = float(value)
    except ValueError:
        return (2, 0.0, value)
    return (0 if number >= 0 else 1, number, value)


def _depth_label(key: str | None, value: str) -> str:
    return f"{value} (head)" if key == "freeze.depth" and value == "-1" else value


