"""`minsnr plot RUN_DIR [RUN_DIR ...]`: FID (or fid_cls) against training steps for several runs on one
figure, the step at which each reaches a level and the speed-up over the first run, as in figure 1
("3.4x faster" to FID 10) and figure 5.

Reads RUN_DIR/metrics.jsonl (one JSON object per line with "step" and the metric). Crossings are read on
each curve smoothed as `minsnr compare` smooths it (minsnr.compare.verdict.smooth: a running mean of three
evaluations in log score, then the best-so-far fit), so that no single lucky evaluation sets a step: the
step is interpolated between evaluations in log score. Default level: the first run's smoothed final
score (the `end` level of a race), else --threshold. Speed-up of a run = (first run's step) / (run's step).
One seed is an anecdote: `minsnr compare --seeds 3` gives an interval and a verdict. Writes OUT.png, OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from minsnr.compare.verdict import first_reach, smooth
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


def pick_metric(run_dirs: list[str]) -> str:
    """ "fid" if every run logged it, else "fid_cls" if every run did."""
    for metric in ("fid", "fid_cls"):
        if all(len(read_metric(r, metric)[0]) for r in run_dirs):
            return metric
    raise ValueError(f"not every run in {run_dirs} logged fid or fid_cls; choose one with --metric")


def compare(run_dirs: list[str], metric: str, threshold: float | None = None) -> dict[str, Any]:
    """Curves, their smoothed versions, the level, the first step at the level and the speed-up over the first
    run, for each run (module docstring)."""
    curves = {}
    for r in run_dirs:
        steps, values = read_metric(r, metric)
        if len(steps) == 0:
            raise ValueError(f"{r}/metrics.jsonl has no {metric!r} values")
        if not (values > 0).all():
            raise ValueError(f"{r}: {metric} must be > 0 to be read in log score (a lower score is better)")
        curves[r] = (steps, values, np.exp(smooth(np.log(values))))
    level = float(curves[run_dirs[0]][2][-1]) if threshold is None else threshold
    reach = {r: first_reach(s, np.log(sm), np.log(level)) for r, (s, _, sm) in curves.items()}
    base = reach[run_dirs[0]]
    runs = [
        {
            "run": r,
            "label": Path(r).name,
            "steps": s.tolist(),
            "values": v.tolist(),
            "smoothed": sm.tolist(),
            "best": float(v.min()),
            "reach_step": reach[r],
            "speedup": None if base is None or not reach[r] else base / reach[r],
        }
        for r, (s, v, sm) in curves.items()
    ]
    source = "--threshold" if threshold is not None else f"{Path(run_dirs[0]).name}'s smoothed final score"
    return {"metric": metric, "threshold": level, "level_from": source, "baseline": run_dirs[0], "runs": runs}


def table(result: dict[str, Any]) -> str:
    reach_head = f"step at {result['metric']} <= {result['threshold']:.4g} (smoothed)"
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
    labelled = 0  # annotations stacked upwards, so that nearby crossings stay readable
    for r in result["runs"]:
        (line,) = ax.plot(r["steps"], r["values"], marker=".", alpha=0.35)
        ax.plot(r["steps"], r["smoothed"], color=line.get_color(), label=r["label"])
        if r["reach_step"] is not None:
            ax.plot([r["reach_step"]], [result["threshold"]], "o", color=line.get_color(), markersize=8)
            if r["speedup"] is not None and r["run"] != result["baseline"]:
                ax.annotate(
                    f"{r['speedup']:.1f}x faster",
                    (r["reach_step"], result["threshold"]),
                    textcoords="offset points",
                    xytext=(4, 8 + 13 * labelled),
                    color=line.get_color(),
                )
                labelled += 1
    ax.axhline(result["threshold"], color="gray", linestyle="--", linewidth=1, label=f"level: {result['level_from']}")
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
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="the level to read (default: the first run's smoothed final score)",
    )
    p.add_argument("--out", default="fid_vs_steps", type=path, help="writes OUT.png and OUT.json")
    p.add_argument("--log-y", action="store_true", help="logarithmic metric axis")
    a = p.parse_args(argv)
    return run_verb("minsnr plot", lambda: _plot(a))


def _plot(a: argparse.Namespace) -> int:
    require("matplotlib", "minsnr plot")
    result = compare(a.run_dirs, a.metric or pick_metric(a.run_dirs), a.threshold)
    print(table(result))
    print(f"level: {result['level_from']}; one seed per run: race with `minsnr compare --seeds 3` for an interval")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"), a.log_y)
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")
    return 0
