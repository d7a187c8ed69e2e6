"""The comparison's report: score curves, the speed-up over each target's reference run (by default its
baseline, section 4.2), the terminal table
and compare.png (figure 5: score against steps, one panel per target; figure 6: unweighted x0 MSE per
timestep bin at the end).

Speed-up (figure 1's "3.4x faster", read at the baseline's best): best = the baseline's lowest score,
reached at the step of that evaluation; the run's step is the first step at which its curve, linear
between evaluations (`minsnr.evaluate.plots.first_reach`), is at or below `best`; speed-up = baseline
step / run step. A run that never gets there has no speed-up, only the bound (baseline step / its last
evaluated step) it stays under. A diverged baseline is scored by its best before it diverged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from minsnr.compare.presets import RunSpec
from minsnr.compare.worker import LOSSES, STATUS, read_json
from minsnr.evaluate.plots import first_reach, read_metric

Curve = tuple[np.ndarray, np.ndarray]


def speedup(baseline: Curve, run: Curve, run_diverged: bool = False) -> dict[str, Any]:
    """Speed-up of `run` over `baseline` (steps, scores; lower is better): see the module docstring."""
    (bs, bv), (rs, rv) = baseline, run
    if len(bv) == 0:
        return {"threshold": None, "baseline_step": None, "step": None, "speedup": None, "below": None}
    best = float(bv.min())
    base_step = first_reach(bs, bv, best)
    step = first_reach(rs, rv, best) if len(rv) else None
    out: dict[str, Any] = {"threshold": best, "baseline_step": base_step, "step": step, "speedup": None, "below": None}
    if step is not None and step > 0:
        out["speedup"] = base_step / step  # type: ignore[operator]
    elif step is None and len(rs) and not run_diverged:
        out["below"] = base_step / float(rs[-1])  # type: ignore[operator]
    return out


def curve(run_dir: Path, metric: str) -> tuple[Curve, int]:
    """The run's finite (step, score) points, and how many non-finite scores were left out."""
    if not (run_dir / "metrics.jsonl").is_file():
        return (np.zeros(0), np.zeros(0)), 0
    steps, values = read_metric(run_dir, metric)
    ok = np.isfinite(values)
    return (steps[ok], values[ok]), int((~ok).sum())


def build(run_dir: Path, specs: list[RunSpec], state: dict[str, Any], metric: str) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for spec in specs:
        folder = run_dir / spec.name
        (steps, values), dropped = curve(folder, metric)
        acc_steps, acc = read_metric(folder, "cls_acc") if (folder / "metrics.jsonl").is_file() else (np.zeros(0),) * 2
        status = read_json(folder / STATUS) or {"state": "running" if len(steps) else "not started", "step": None}
        losses = read_json(folder / LOSSES)
        best = int(np.argmin(values)) if len(values) else None
        runs.append({"name": spec.name, "target": spec.target, "weighting": spec.weighting, "gamma": spec.gamma,
                     "reference": spec.reference, "status": status["state"], "status_step": status["step"],
                     "steps": steps.tolist(), "values": values.tolist(), "non_finite_scores": dropped,
                     "cls_acc": dict(zip(map(int, acc_steps), map(float, acc))),
                     "best": None if best is None else float(values[best]),
                     "best_step": None if best is None else int(steps[best]),
                     "final": float(values[-1]) if len(values) else None,
                     "final_step": int(steps[-1]) if len(steps) else None,
                     "bin_mse": None if losses is None else losses["mse"],
                     "bins": None if losses is None else losses["bins"]})
    by_name = {r["name"]: r for r in runs}
    for r in runs:
        base = next((b for b in runs if b["target"] == r["target"] and b["reference"]), None)
        r["versus"] = None if base is None else base["name"]
        r["note"] = ""
        if base is None:
            r["speed"] = None
            r["note"] = "no reference run for this target"
            continue
        r["speed"] = speedup((np.array(base["steps"]), np.array(base["values"])),
                             (np.array(r["steps"]), np.array(r["values"])), r["status"] == "diverged")
        if base["status"] == "diverged" and r is not base:
            r["note"] = f"reference diverged at step {base['status_step']}: its best before that"
        if r["non_finite_scores"]:
            r["note"] += f" {r['non_finite_scores']} non-finite score(s) left out"
    return {"metric": metric, "steps": state["steps"], "eval_every": state["eval_every"],
            "runs": [by_name[s.name] for s in specs]}


def _status(r: dict[str, Any]) -> str:
    step = r["status_step"] if r["status_step"] is not None else r["final_step"]
    return r["status"] if step is None else f"{r['status']} {'at ' if r['status'] == 'diverged' else ''}{step}"


def table(result: dict[str, Any]) -> str:
    m = result["metric"]
    head = (f"{m} every {result['eval_every']} steps (lower is better). speed-up = step at which the target's "
            f"reference (*) reaches its best {m} / first step at which the run does")
    rows = [head, f"{'run':<26} {'status':<18} {'best (step)':>16} {'final':>8} {'acc':>5} "
                  f"{'reaches ref best':>18} {'speed-up':>9}  note"]
    for r in result["runs"]:
        best = "-" if r["best"] is None else f"{r['best']:.4g} ({r['best_step']})"
        final = "-" if r["final"] is None else f"{r['final']:.4g}"
        acc = r["cls_acc"].get(r["final_step"]) if r["final_step"] is not None else None
        s = r["speed"] or {}
        reach = "-" if s.get("step") is None else f"{s['step']:.0f}"
        speed = (f"{s['speedup']:.2f}x" if s.get("speedup") is not None
                 else f"<{s['below']:.2f}x" if s.get("below") is not None else "-")
        name = r["name"] + (" *" if r["reference"] else "")
        rows.append(f"{name:<26} {_status(r):<18} {best:>16} {final:>8} {'-' if acc is None else f'{acc:.2f}':>5} "
                    f"{reach:>18} {speed:>9}  {r['note'].strip()}")
    rows.append("* the target's reference: by default its baseline (section 4.2: const for x0, the plain eps MSE for "
                "eps, the plain v MSE for v); --reference chooses another")
    return "\n".join(rows)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    targets = list(dict.fromkeys(r["target"] for r in runs))
    weightings = list(dict.fromkeys(r["name"].split("_", 1)[1] for r in runs))
    palette = plt.get_cmap("tab20").colors if len(weightings) > 10 else [f"C{i}" for i in range(10)]
    color = {w: palette[i % len(palette)] for i, w in enumerate(weightings)}
    fig, axes = plt.subplots(1, len(targets) + 1, figsize=(4.2 * len(targets) + 5.5, 3.8), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * len(targets) + [1.4]})
    for ax, target in zip(axes[0], targets):
        panel = [r for r in runs if r["target"] == target and r["steps"]]  # runs not started yet have no line
        for r in panel:
            w = r["name"].split("_", 1)[1]
            s = r["speed"] or {}
            label = w + (" (reference)" if r["reference"] else f" {s['speedup']:.2f}x" if s.get("speedup") else "")
            if r["status"] == "diverged":
                label += f", diverged at {r['status_step']}"
            ax.plot(r["steps"], r["values"], marker=".", color=color[w], label=label)
            if r["status"] == "diverged":
                ax.plot(r["steps"][-1:], r["values"][-1:], "x", color=color[w], markersize=10)
            if r["reference"] and s.get("threshold") is not None:
                ax.axhline(s["threshold"], color="gray", linestyle="--", linewidth=0.8)
            elif s.get("speedup") is not None:
                ax.plot([s["step"]], [s["threshold"]], "o", color=color[w])
                if len(panel) <= 4:  # with more runs the speed-ups are in the legend only (labels would overlap)
                    ax.annotate(f"{s['speedup']:.2f}x", (s["step"], s["threshold"]), textcoords="offset points",
                                xytext=(4, -12), color=color[w])
        ax.set_title(f"target {target}")
        ax.set_xlabel("training step")
        ax.set_ylabel(result["metric"])
        values = [v for r in panel for v in r["values"]]
        if values:
            if max(values) > 5 * min(values) > 0:
                ax.set_yscale("log")
            ax.legend(fontsize=8 if len(panel) <= 6 else 6.5)
    _bin_panel(axes[0, -1], [r for r in runs if r["bin_mse"]])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bin_panel(ax: Any, runs: list[dict[str, Any]]) -> None:
    """Figure 6 at the end of training as a table: each run's unweighted x0 MSE per timestep bin over the
    best run's in that bin (1 = best; the MSE spans orders of magnitude across bins, so ratios, not values)."""
    ax.set_title("end of training: unweighted x0 MSE / best run's", fontsize=10)
    if not runs:
        ax.axis("off")
        return
    from matplotlib.colors import LogNorm

    mse = np.array([r["bin_mse"] for r in runs])
    ratio = mse / mse.min(axis=0, keepdims=True)
    ax.imshow(ratio, cmap="Reds", norm=LogNorm(1.0, 4.0), aspect="auto")  # 4x and worse: the darkest red
    for (i, j), v in np.ndenumerate(ratio):
        ax.text(j, i, f"{v:.2f}" if v < 10 else f"{v:.0e}", ha="center", va="center", fontsize=6.5,
                color="white" if v > 2.5 else "black")
    ax.set_yticks(range(len(runs)), [r["name"] for r in runs], fontsize=8)
    ax.set_xticks(range(mse.shape[1]), [str(lo) for lo, _ in runs[0]["bins"]], fontsize=8)
    ax.set_xlabel("timestep bin (start)")
