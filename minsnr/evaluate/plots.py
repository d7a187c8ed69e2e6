"""`minsnr plot RUN_DIR [RUN_DIR ...]`: FID (or fid_cls) against training steps for several runs on one
figure, the step at which each first reaches a threshold and the speed-up over the first run, as in
figure 1 ("3.4x faster" to FID 10) and figure 5.

Reads RUN_DIR/metrics.jsonl (one JSON object per line with "step" and the metric). The first step at
the threshold is interpolated linearly between the two evaluations around the first crossing. Default
threshold: the largest of the runs' best values, the lowest level that every run reaches. Speed-up of
a run = (baseline's step) / (run's step); the baseline is the first RUN_DIR. Writes OUT.png, OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from minsnr.evaluate.util import HelpFormatter, run_verb
from minsnr.extras import require
from minsnr.runlog import read_records


def read_metric(run_dir: str | Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `metric` in RUN_DIR/metrics.jsonl, by step (a repeated step keeps its last value)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (is {run_dir} a run folder?)")
    points: dict[int, float] = {}
    try:
        records = read_records(path, lambda msg: print(msg, file=sys.stderr))  # a bad line: error naming file, line
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a metrics file (not text)") from None
    for record in records:
        if metric in record:
            points[int(record["step"])] = float(record[metric])
    steps = np.array(sorted(points), dtype=np.float64)
    return steps, np.array([points[int(s)] for s in steps], dtype=np.float64)


def first_reach(steps: np.ndarray, values: np.ndarray, threshold: float) -> float | None:
    """The first step where the curve (linear between evaluations) is at or below `threshold`."""
    below = np.flatnonzero(values <= threshold)
    if len(below) == 0:
        return None
    i = int(below[0])
    if i == 0:
        return float(steps[0])
    s0, s1, v0, v1 = steps[i - 1], steps[i], values[i - 1], values[i]
    return float(s0 + (v0 - threshold) / (v0 - v1) * (s1 - s0))


def pick_metric(run_dirs: list[str]) -> str:
    """ "fid" if every run logged it, else "fid_cls" if every run did."""
    for metric in ("fid", "fid_cls"):
        if all(len(read_metric(r, metric)[0]) for r in run_dirs):
            return metric
    raise ValueError(f"not every run in {run_dirs} logged fid or fid_cls; choose one with --metric")


def compare(run_dirs: list[str], metric: str, threshold: float | None = None) -> dict[str, Any]:
    """Curves, threshold, first step at the threshold and speed-up over the first run, for each run."""
    curves = {}
    for r in run_dirs:
        steps, values = read_metric(r, metric)
        if len(steps) == 0:
            raise ValueError(f"{r}/metrics.jsonl has no {metric!r} values")
        curves[r] = (steps, values)
    if threshold is None:
        threshold = max(float(v.min()) for _, v in curves.values())
    reach = {r: first_reach(s, v, threshold) for r, (s, v) in curves.items()}
    base = reach[run_dirs[0]]
    runs = [
        {
            "run": r,
            "label": Path(r).name,
            "steps": s.tolist(),
            "values": v.tolist(),
            "best": float(v.min()),
            "reach_step": reach[r],
            "speedup": None if base is None or not reach[r] else base / reach[r],
        }
        for r, (s, v) in curves.items()
    ]
    return {"metric": metric, "threshold": threshold, "baseline": run_dirs[0], "runs": runs}


def table(result: dict[str, Any]) -> str:
    reach_head = f"step at {result['metric']} <= {result['threshold']:.4g}"
    rows = [f"{'run':<28} {'evals':>5} {'best':>9} {reach_head:>24} {'speed-up':>9}"]
    for r in result["runs"]:
        reach = "-" if r["reach_step"] is None else f"{r['reach_step']:.0f}"
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        rows.append(f"{r['label']:<28} {len(r['steps']):>5} {r['best']:>9.4g} {reach:>24} {speed:>9}")
    return "\n".join(rows)


def plot(result: dict[str, Any], path: Path, log_y: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in result["runs"]:
        (line,) = ax.plot(r["steps"], r["values"], marker=".", label=r["label"])
        if r["reach_step"] is not None:
            ax.plot([r["reach_step"]], [result["threshold"]], "o", color=line.get_color(), markersize=8)
            if r["speedup"] is not None and r["run"] != result["baseline"]:
                ax.annotate(
                    f"{r['speedup']:.1f}x faster",
                    (r["reach_step"], result["threshold"]),
                    textcoords="offset points",
                    xytext=(4, 8),
                    color=line.get_color(),
                )
    ax.axhline(result["threshold"], color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel(result["metric"])
    if log_y:
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="minsnr plot", description=__doc__, formatter_class=HelpFormatter)
    path = os.path.expanduser
    p.add_argument("run_dirs", nargs="+", type=path, help="run folders; the first is the baseline for speed-ups")
    p.add_argument("--metric", default=None, help="fid, fid_cls or any logged key (default: fid, else fid_cls)")
    p.add_argument("--threshold", type=float, default=None, help="default: the largest of the runs' best values")
    p.add_argument("--out", default="fid_vs_steps", type=path, help="writes OUT.png and OUT.json")
    p.add_argument("--log-y", action="store_true", help="logarithmic metric axis")
    a = p.parse_args(argv)
    return run_verb("minsnr plot", lambda: _plot(a))


def _plot(a: argparse.Namespace) -> int:
    require("matplotlib", "minsnr plot")
    result = compare(a.run_dirs, a.metric or pick_metric(a.run_dirs), a.threshold)
    print(table(result))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"), a.log_y)
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")
    return 0
