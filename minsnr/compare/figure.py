"""compare.png: top row, the score against steps per target (figure 5), each weighting's geometric mean over
the seeds with a band from the best to the worst seed, and the reference's three quality levels as dashed
lines; bottom row, the speed-ups with their intervals at each level (a forest plot, 1 = as fast as the
reference) and figure 6 at the end of training (unweighted x0 MSE per timestep bin over the best run's,
averaged over the seeds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from minsnr.compare.verdict import summary_text

# the reference's quality levels, in grays (the runs have the colours): label, colour, marker
LEVEL_STYLE = {"quarter": ("1/4", "0.65", "^"), "half": ("1/2", "0.4", "s"), "end": ("end", "0.0", "o")}


def _mean_band(seeds: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, geometric mean, min, max) over the seeds at every evaluated step."""
    by_step: dict[float, list[float]] = {}
    for s in seeds:
        for st, v in zip(s["steps"], s["values"]):
            by_step.setdefault(st, []).append(v)
    steps = np.array(sorted(by_step))
    vals = [np.array(by_step[s]) for s in steps]
    return (
        steps,
        np.array([np.exp(np.log(v).mean()) for v in vals]),
        np.array([v.min() for v in vals]),
        np.array([v.max() for v in vals]),
    )


def _label(r: dict[str, Any]) -> str:
    w = r["name"].split("_", 1)[1]
    if r["reference"]:
        return f"{w} (reference)"
    race = r.get("race")
    if not race or not race["headline"]["level"]:
        return w + (f": {race['headline']['verdict']}" if race else "")
    return f"{w} {summary_text(race['levels'][race['headline']['level']])} {race['headline']['verdict']}"


def draw(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    targets = list(dict.fromkeys(r["target"] for r in runs))
    weightings = list(dict.fromkeys(r["name"].split("_", 1)[1] for r in runs))
    palette = plt.get_cmap("tab20").colors if len(weightings) > 10 else [f"C{i}" for i in range(10)]
    color = {w: palette[i % len(palette)] for i, w in enumerate(weightings)}
    raced = [r for r in runs if r.get("race")]
    most = max(sum(r["target"] == t for r in runs) for t in targets)
    legend = 0.13 * most if most > 4 else 0.0  # inches of legend under each top panel
    fig = plt.figure(figsize=(max(11.0, 4.6 * len(targets)), 8.2 + 0.12 * len(raced) + legend), layout="constrained")
    grid = fig.add_gridspec(2, 2 * len(targets), height_ratios=[1 + legend / 4, 1 + 0.04 * len(raced)])
    for k, target in enumerate(targets):
        ax = fig.add_subplot(grid[0, 2 * k : 2 * k + 2])
        panel = [r for r in runs if r["target"] == target and any(s["steps"] for s in r["seeds"])]
        for r in panel:
            c = color[r["name"].split("_", 1)[1]]
            steps, mean, low, high = _mean_band(r["seeds"])
            ax.plot(steps, mean, marker=".", color=c, label=_label(r), linewidth=2 if r["reference"] else 1.2)
            if len(r["seeds"]) > 1:
                ax.fill_between(steps, low, high, color=c, alpha=0.15, linewidth=0)
            for s in r["seeds"]:
                if s["status"] == "diverged" and s["steps"]:
                    ax.plot(s["steps"][-1:], s["values"][-1:], "x", color=c, markersize=10)
        _level_lines(ax, [r for r in runs if r["target"] == target])
        ax.set_title(f"target {target}")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{result['metric']} (mean over seeds; band: min-max)")
        values = [v for r in panel for s in r["seeds"] for v in s["values"]]
        if values:
            if max(values) > 5 * min(values) > 0:
                ax.set_yscale("log")
            if len(panel) <= 4:
                ax.legend(fontsize=7.5)
            else:  # many runs: below the panel, where it hides no curve
                ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    half = len(targets)
    _forest(fig.add_subplot(grid[1, :half]), raced)
    _bin_panel(fig.add_subplot(grid[1, half:]), [r for r in runs if any(s["bin_mse"] for s in r["seeds"])])
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _level_lines(ax: Any, panel: list[dict[str, Any]]) -> None:
    race = next((r["race"] for r in panel if r.get("race")), None)
    if race is None:
        return
    for name, (label, c, _) in LEVEL_STYLE.items():
        level = float(np.exp(np.mean([np.log(s[name]["level"]) for s in race["seeds"]])))
        ax.axhline(level, color=c, linestyle="--", linewidth=0.8)
        ax.annotate(
            f"ref {label}",
            (1.0, level),
            xycoords=("axes fraction", "data"),
            fontsize=7,
            color=c,
            ha="right",
            va="bottom",
        )


def _forest(ax: Any, raced: list[dict[str, Any]]) -> None:
    """Speed-up at each level with its 95% interval; hollow markers and faint lines: within noise."""
    ax.set_title("speed-up over the reference (geometric mean over seeds, 95% interval)", fontsize=10)
    if not raced:
        ax.axis("off")
        return
    for i, r in enumerate(raced):
        for j, (name, (label, c, marker)) in enumerate(LEVEL_STYLE.items()):
            lv = r["race"]["levels"][name]
            y = i + (j - 1) * 0.22
            noisy = lv["verdict"] == "within noise"
            if lv["low"] is not None:
                ax.plot([lv["low"], lv["high"]], [y, y], color=c, alpha=0.4 if noisy else 1, linewidth=1.5)
            ax.plot(
                [lv["geomean"]],
                [y],
                marker,
                color=c,
                mfc="white" if noisy else c,
                label=f"at ref {label}" if i == 0 else None,
            )
            if lv["low"] is None:  # one seed: its single reading
                ax.plot(lv["speedups"], [y] * len(lv["speedups"]), "|", color=c)
            kinds = set(lv["bounds"])
            if len(kinds) == 1 and None not in kinds:  # every seed a bound: say which way the truth lies
                ax.annotate(
                    "<" if kinds == {"<"} else ">",
                    (lv["geomean"], y),
                    textcoords="offset points",
                    xytext=(-12 if kinds == {"<"} else 6, -4),
                    color=c,
                    fontsize=9,
                )
    ax.axvline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    lo, hi = ax.get_xlim()
    ticks = [v for v in (0.125, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 8) if lo <= v <= hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}x")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks(range(len(raced)), [r["name"] for r in raced], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up (x, log scale; > 1: faster than the reference)")
    ax.legend(fontsize=7.5, loc="best")


def _bin_panel(ax: Any, runs: list[dict[str, Any]]) -> None:
    """Figure 6 at the end of training as a table: each run's unweighted x0 MSE per timestep bin (geometric
    mean over its seeds) over the best run's in that bin (1 = best)."""
    ax.set_title("end of training: unweighted x0 MSE / best run's", fontsize=10)
    if not runs:
        ax.axis("off")
        return
    from matplotlib.colors import LogNorm

    mse = np.array([np.exp(np.mean(np.log([s["bin_mse"] for s in r["seeds"] if s["bin_mse"]]), axis=0)) for r in runs])
    ratio = mse / mse.min(axis=0, keepdims=True)
    ax.imshow(ratio, cmap="Reds", norm=LogNorm(1.0, 4.0), aspect="auto")  # 4x and worse: the darkest red
    for (i, j), v in np.ndenumerate(ratio):
        ax.text(
            j,
            i,
            f"{v:.2f}" if v < 10 else f"{v:.0e}",
            ha="center",
            va="center",
            fontsize=6.5,
            color="white" if v > 2.5 else "black",
        )
    ax.set_yticks(range(len(runs)), [r["name"] for r in runs], fontsize=8)
    bins = next(s["bins"] for s in runs[0]["seeds"] if s["bins"])
    ax.set_xticks(range(mse.shape[1]), [str(lo) for lo, _ in bins], fontsize=8)
    ax.set_xlabel("timestep bin (start)")
