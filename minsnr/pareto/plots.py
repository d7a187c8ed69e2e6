"""Figures of the Pareto analysis: objectives (figure 4), gradient cosines, UGD instability (figure 3) and
the conflict heat map (figure 2). Matplotlib with the Agg backend; every function writes one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minsnr.extras import require

matplotlib = require("matplotlib", "the Pareto figures")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from numpy.typing import ArrayLike  # noqa: E402

from minsnr.gram import Range  # noqa: E402
from minsnr.weighting import STRATEGIES  # noqa: E402

# Display names in the paper's spelling, with the default gamma (Max-SNR-1, Min-SNR-5, ...).
LABELS = {
    **{
        name: name.replace("_", "-").title().replace("Snr", "SNR") + ("" if g is None else f"-{g:g}")
        for name, g in ((n, w.default) for n, w in STRATEGIES.items())
    },
    "ugd": "UGD",
    "frank_wolfe": "Frank-Wolfe",
}


def _range_labels(ranges: list[Range]) -> list[str]:
    return [f"{lo}" if hi == lo + 1 else f"{lo}-{hi}" for lo, hi in ranges]


def plot_objectives(results: dict[str, dict[str, Any]], ranges: list[Range], path: Path, title: str = "") -> None:
    """Left: equation 11 per weighting (figure 4). Right: the task weights of each."""
    names = list(results)
    values = np.array([results[n]["objective"] for n in names])
    fig, (ax, ax_w) = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = [
        "tab:red" if n == "min_snr" else "tab:green" if n in ("ugd", "frank_wolfe") else "tab:blue" for n in names
    ]
    ax.bar([LABELS.get(n, n) for n in names], values, color=colors)
    ax.set_ylabel("objective of eq. 11 (lower is better)")
    ax.tick_params(axis="x", rotation=30)
    if values.min() > 0 and values.max() / values.min() > 50:
        ax.set_yscale("log")
    ax.set_title(title or "Pareto objective of each weighting")
    x = np.arange(len(ranges))
    for n in names:
        ax_w.plot(x, np.maximum(results[n]["weights"], 1e-12), marker=".", label=LABELS.get(n, n))
    ax_w.set_yscale("log")
    ax_w.set_xticks(x, _range_labels(ranges), rotation=90, fontsize=7)
    ax_w.set_xlabel("task (timesteps)")
    ax_w.set_ylabel("weight on the simplex")
    ax_w.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_matrix(
    matrix: ArrayLike,
    rows: list[str],
    cols: list[str],
    path: Path,
    *,
    title: str,
    label: str,
    limit: float | None = None,
    annotate: bool = False,
) -> None:
    """Heat map on a diverging scale centred at 0 (negative cells blue)."""
    m = np.asarray(matrix, dtype=np.float64)
    lim = limit if limit is not None else max(float(np.abs(m).max()), 1e-12)
    fig, ax = plt.subplots(figsize=(1.2 + 0.42 * len(cols), 1.2 + 0.42 * len(rows)))
    im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    if annotate:
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cosines(cos: ArrayLike, ranges: list[Range], path: Path) -> None:
    labels = _range_labels(ranges)
    plot_matrix(
        cos,
        labels,
        labels,
        path,
        title="cosine between task gradients (negative = conflict)",
        label="cosine",
        limit=1.0,
    )


def plot_instability(entries: list[dict[str, Any]], ranges: list[Range], path: Path) -> None:
    """Left: UGD weights (mean and spread over repeats) per sample count. Right: spread against samples."""
    fig, (ax, ax_s) = plt.subplots(1, 2, figsize=(12, 4.2))
    x = np.arange(len(ranges))
    for e in entries:
        mean, std = np.array(e["mean"]), np.array(e["std"])
        ax.errorbar(x, mean, yerr=std, marker=".", capsize=2, label=f"{e['samples_per_task']} / task")
    ax.set_xticks(x, _range_labels(ranges), rotation=90, fontsize=7)
    ax.set_xlabel("task (timesteps)")
    ax.set_ylabel("UGD weight (mean +- std over repeats)")
    ax.legend(fontsize=7)
    n = [e["samples_per_task"] for e in entries]
    ax_s.plot(n, [e["spread"] for e in entries], marker="o")
    ax_s.set_xscale("log", base=2)
    ax_s.set_xlabel("samples per task")
    ax_s.set_ylabel("mean std of the weights")
    ax_s.set_title("instability of optimised weights (figure 3)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
