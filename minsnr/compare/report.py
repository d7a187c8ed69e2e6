"""The comparison's report: per-seed score curves, the speed-up of every run over its target's reference run
(by default the baseline of section 4.2) read at three quality levels and summarised over the seeds with an
interval and a verdict (minsnr.compare.verdict), the score's sanity (minsnr.compare.sanity), the terminal
tables; compare.png is drawn by minsnr.compare.figure.

Example (the cpu preset, x0 target, seed 0): const's smoothed fid_cls is 90 at a quarter of its run (step
750), 16.9 at half (step 1,500) and 5.9 at the end. Min-SNR-5's smoothed curve reaches 90 at step 1,074
(0.70x) and 16.9 at step 1,876 (0.80x); it ends on const's plateau, so the end level is "within noise".
Over seeds 0, 1, 2 the half level reads 0.80x, 0.71x, 0.75x: 0.76x [0.66, 0.87], "slower".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from minsnr.compare import verdict
from minsnr.compare.presets import RunSpec, run_folder
from minsnr.compare.worker import LOSSES, STATUS
from minsnr.evaluate.plots import read_metric
from minsnr.files import read_json

LEVEL_LABELS = {"quarter": "at ref 1/4", "half": "at ref 1/2", "end": "at ref end"}
DONE = ("finished", "diverged")


def seed_run(folder: Path, metric: str, seed: int) -> dict[str, Any]:
    """One seed of one run, from its folder: status, finite (step, score) points, accuracy, figure-6 MSE."""
    has_log = (folder / "metrics.jsonl").is_file()
    steps, values = read_metric(folder, metric) if has_log else (np.zeros(0), np.zeros(0))
    ok = np.isfinite(values) & (values > 0)
    acc_steps, acc = read_metric(folder, "cls_acc") if has_log else (np.zeros(0),) * 2
    status = read_json(folder / STATUS) or {"state": "running" if len(steps) else "not started", "step": None}
    losses = read_json(folder / LOSSES)
    return {
        "seed": seed,
        "status": status["state"],
        "status_step": status["step"],
        "steps": steps[ok].tolist(),
        "values": values[ok].tolist(),
        "dropped": int((~ok).sum()),
        "cls_acc": dict(zip(map(int, acc_steps), map(float, acc))),
        "bin_mse": None if losses is None else losses["mse"],
        "bins": None if losses is None else losses["bins"],
    }


def _curve(s: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    return np.array(s["steps"], dtype=np.float64), np.array(s["values"], dtype=np.float64)


def build(run_dir: Path, specs: list[RunSpec], seeds: list[int], state: dict[str, Any], metric: str) -> dict[str, Any]:
    """The report stored in compare.json: every run with its per-seed curves and, against its target's
    reference, the per-seed readings, per-level summaries and the headline verdict."""
    from minsnr.compare.sanity import warnings

    runs = []
    for spec in specs:
        per_seed = [seed_run(run_folder(run_dir, s, spec.name), metric, s) for s in seeds]
        runs.append(
            {
                "name": spec.name,
                "target": spec.target,
                "weighting": spec.weighting,
                "gamma": spec.gamma,
                "timesteps": spec.timesteps,
                "reference": spec.reference,
                "seeds": per_seed,
            }
        )
    noise: dict[str, float] = {}
    for target in dict.fromkeys(r["target"] for r in runs):
        curves = [
            np.log(s["values"])
            for r in runs
            if r["target"] == target
            for s in r["seeds"]
            if s["status"] in DONE and s["values"]
        ]
        noise[target] = verdict.plateau_noise(curves)
    for r in runs:
        ref = next((b for b in runs if b["target"] == r["target"] and b["reference"]), None)
        r["versus"], r["race"], r["note"] = None if ref is None else ref["name"], None, ""
        if ref is None:
            r["note"] = "no reference run for this target"
            continue
        if r is ref:
            continue
        pairs = [
            (a, b)
            for a, b in zip(ref["seeds"], r["seeds"])
            if a["status"] in DONE and b["status"] in DONE and a["values"]
        ]
        if not pairs:
            r["note"] = "no seed with both runs done yet"
            continue
        r["race"] = verdict.race(
            [_curve(a) for a, _ in pairs],
            [_curve(b) for _, b in pairs],
            state["steps"],
            noise[r["target"]],
            [b["status"] == "diverged" for _, b in pairs],
        )
        r["race"]["paired_seeds"] = [a["seed"] for a, _ in pairs]
        if len(pairs) < len(seeds):
            r["note"] = f"{len(pairs)} of {len(seeds)} seeds done"
        diverged = [a["seed"] for a, _ in pairs if a["status"] == "diverged"]
        if diverged:
            r["note"] += f" reference diverged in seed(s) {', '.join(map(str, diverged))}: levels from its curve before"
    result = {
        "metric": metric,
        "steps": state["steps"],
        "eval_every": state["eval_every"],
        "seeds": seeds,
        "noise": noise,
        "sanity": state.get("sanity"),
        "runs": runs,
    }
    result["warnings"] = warnings(state.get("sanity") or {}, runs, state["steps"])
    return result


def _status(r: dict[str, Any]) -> str:
    """'3 finished', '2 finished, 1 diverged at 1200'."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in r["seeds"]:
        groups.setdefault(s["status"], []).append(s)
    parts = []
    for state, seeds in groups.items():
        where = [str(s["status_step"]) for s in seeds if state == "diverged" and s["status_step"] is not None]
        parts.append(f"{len(seeds)} {state}" + (f" at {', '.join(where)}" if where else ""))
    return ", ".join(parts)


def _final(r: dict[str, Any]) -> str:
    ends = [s["values"][-1] for s in r["seeds"] if s["values"]]
    if not ends:
        return "-"
    mean = float(np.exp(np.mean(np.log(ends))))
    return f"{mean:.4g}" if len(ends) == 1 else f"{mean:.4g} ({min(ends):.3g}-{max(ends):.3g})"


def _reference_cell(ref: dict[str, Any], runs: list[dict[str, Any]], name: str) -> str:
    """The reference's own level: its mean score there and the mean step at which it reaches it."""
    race = next((r["race"] for r in runs if r.get("versus") == ref["name"] and r["race"]), None)
    if race is None:
        return "-"
    levels = [s[name]["level"] for s in race["seeds"]]
    steps = [s[name]["ref_step"] for s in race["seeds"]]
    return f"({float(np.exp(np.mean(np.log(levels)))):.3g} at {np.mean(steps):.0f})"


def _sanity_lines(result: dict[str, Any]) -> list[str]:
    m, sanity = result["metric"], result.get("sanity") or {}
    parts = []
    if sanity.get("floor") is not None:
        parts.append(f"real held-out images {sanity['floor']:.4g} (floor)")
    if sanity.get("ceiling") is not None:
        parts.append(f"untrained model {sanity['ceiling']:.4g} (ceiling)")
    nz = sanity.get("noise")
    if nz:
        run = Path(nz["checkpoint"]).parents[1]
        parts.append(
            f"{run.parent.name}/{run.name} at step {nz.get('step')} under {len(nz['scores'])} evaluation "
            f"seeds {min(nz['scores']):.4g}-{max(nz['scores']):.4g} (noise {100 * nz['sd_log']:.1f}%)"
        )
    lines = [f"score check ({m}): " + ("; ".join(parts) if parts else "not measured yet")]
    clf = sanity.get("classifier")
    if clf:
        acc = clf.get("test_accuracy")
        lines.append(
            f"  fid_cls classifier: {clf['num_classes']} classes, "
            + ("held-out accuracy not recorded" if acc is None else f"{100 * acc:.1f}% right on held-out images")
        )
    lines.append(
        "  curve noise per evaluation on the plateaus: "
        + ", ".join(f"{t} {100 * v:.1f}%" for t, v in result["noise"].items())
    )
    return lines + [f"warning: {w}" for w in result.get("warnings", [])]


def table(result: dict[str, Any]) -> str:
    m, seeds = result["metric"], result["seeds"]
    head = (
        f"{m} every {result['eval_every']} steps, lower is better; {len(seeds)} seed(s): train.seed "
        f"{', '.join(map(str, seeds))}"
    )
    rows = [
        head,
        *_sanity_lines(result),
        "",
        "speed-up over the target's reference (*) in reaching its smoothed score at 1/4, 1/2 and the end of its "
        "run: geometric mean over seeds [95% t-interval]; ~ within noise",
        f"{'run':<26} {'seeds':<16} {'final':>20}  {LEVEL_LABELS['quarter']:<24}{LEVEL_LABELS['half']:<24}"
        f"{LEVEL_LABELS['end']:<24}verdict",
    ]
    runs = result["runs"]
    for r in runs:
        name = r["name"] + (" *" if r["reference"] else "")
        if r["reference"]:
            cells = [_reference_cell(r, runs, lv) for lv in verdict.LEVELS]
            last = "reference"
        elif r["race"]:
            cells = [verdict.summary_text(r["race"]["levels"][lv]) for lv in verdict.LEVELS]
            h = r["race"]["headline"]
            said = "one seed: no verdict (--seeds 3)" if h["verdict"] == "one seed" else h["verdict"]
            last = said + (f" (at {LEVEL_LABELS[h['level']][3:]})" if h["level"] else "")
        else:
            cells, last = ["-"] * 3, ""
        note = f"  {r['note'].strip()}" if r["note"].strip() else ""
        rows.append(
            f"{name:<26} {_status(r):<16} {_final(r):>20}  " + "".join(f"{c:<23} " for c in cells) + last + note
        )
    rows += [
        "",
        "per seed, at 1/4, 1/2, end (>= reached before the second evaluation; < never reached; "
        "~ within noise in that seed)",
    ]
    raced = [r for r in runs if r["race"]]
    if raced:
        rows.append(f"{'run':<26} " + "".join(f"{'seed' + str(s):<24}" for s in seeds))
    for r in raced:
        by_seed = dict(zip(r["race"]["paired_seeds"], r["race"]["seeds"]))
        cells = []
        for s in seeds:
            reading = by_seed.get(s)
            cells.append("-" if reading is None else " ".join(_seed_cell(reading[lv]) for lv in verdict.LEVELS))
        rows.append(f"{r['name']:<26} " + "".join(f"{c:<24}" for c in cells))
    rows.append(
        "* the target's reference: by default its baseline (section 4.2: const for x0, the plain eps MSE for "
        "eps, the plain v MSE for v); --reference chooses another"
    )
    return "\n".join(rows)


def _seed_cell(reading: dict[str, Any]) -> str:
    mark = ("" if reading["informative"] else "~") + (reading["bound"] or "")
    return f"{mark}{reading['speedup']:.2f}"


def plot(result: dict[str, Any], path: Path) -> bool:
    """compare.png, or a one-line warning and False without matplotlib (the table and compare.json stand)."""
    from minsnr.extras import optional

    if optional("matplotlib", f"no {path.name}; the table and compare.json have every number") is None:
        return False
    from minsnr.compare.figure import draw

    draw(result, path)
    return True
