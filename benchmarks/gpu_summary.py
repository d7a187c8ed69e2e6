"""gpu_suite.sh's last step (issue 24): its parts' results as ONE JSON and ONE Markdown table of targets.

Reads what the parts left in the suite's folder: parts.tsv (one line per part: name, exit status or "-",
seconds, time limit, note; the suite writes it), graph_check.json, train_speed.json (benchmarks/train_speed.py),
vit_b.json and vit_xl.json (benchmarks/models.py), cifar/metrics.jsonl (the CIFAR run), pareto_l0/ and
pareto_l1/pareto.json (`minsnr pareto`) and train_speed_rest.json. Writes gpu_suite.json (every part's
results with its status and seconds, and the machine's name from nvidia-smi where there is one) and prints
the table: each target met or not, "n/a on cpu" where the numbers come from the CPU (SMOKE=1), and
"not run (why)" where a part or a row is missing. No torch: it runs in a second anywhere.

    python benchmarks/gpu_summary.py benchmarks/results/gpu [--budget 450]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

# part: the files it leaves, in the suite's order
PARTS = {
    "graph_check": ("graph_check.json",),
    "train_speed": ("train_speed.json",),
    "backbones": ("vit_b.json", "vit_xl.json"),
    "cifar_data": (),
    "cifar_train": ("cifar/metrics.jsonl",),
    "pareto_l0": ("pareto_l0/pareto.json",),
    "pareto_l1": ("pareto_l1/pareto.json",),
    "speed_rest": ("train_speed_rest.json",),
}
# The README's speed targets (issue 24), on one H100/H200 through the real Trainer loop (train_speed.py)
CIFAR_STEPS_PER_S = 300.0  # the CIFAR-size pixel ViT alone
CONCURRENT_GAIN = 1.5  # four CIFAR runs at once, total steps/s over one alone
VIT_B_MFU = 0.55  # ViT-B/2 at batch 256, against the bf16 matmul peak measured in the same run


def read_parts(folder: Path) -> dict[str, dict[str, Any]]:
    """parts.tsv as {name: {rc, seconds, limit_s, note}}; rc None for a part the suite skipped."""
    path, parts = folder / "parts.tsv", {}
    for line in path.read_text().splitlines() if path.exists() else []:
        name, rc, seconds, limit, note = (line.split("\t") + [""] * 5)[:5]
        rc_value = int(rc) if rc.lstrip("-").isdigit() else None
        parts[name] = {"rc": rc_value, "seconds": float(seconds or 0), "limit_s": float(limit or 0), "note": note}
    return parts


def status(part: dict[str, Any] | None) -> str:
    """ok / exit N / stopped at the limit / not run (why)."""
    if part is None:
        return "not run (no record: the suite did not reach it)"
    if part["rc"] is None:
        return f"not run ({part['note'] or 'skipped'})"
    if part["rc"] == 0:
        return "ok"
    if part["rc"] in (124, 137):
        return f"stopped at its {part['limit_s']:.0f} s limit"
    return f"exit {part['rc']}"


def load(folder: Path, file: str) -> Any:
    """A part's JSON (the last line of a .jsonl); None when absent, {"error": ...} when unreadable."""
    path = folder / file
    if not path.exists():
        return None
    try:
        text = path.read_text()
        return json.loads(text.strip().splitlines()[-1] if file.endswith(".jsonl") else text)
    except (json.JSONDecodeError, IndexError) as err:
        return {"error": f"unreadable {file} ({type(err).__name__})"}


def collect(folder: Path) -> dict[str, dict[str, Any]]:
    """Every part with its status and results ({file: JSON}); parts neither run nor recorded included."""
    recorded = read_parts(folder)
    out = {}
    for name, files in PARTS.items():
        part = recorded.get(name)
        out[name] = {**(part or {}), "status": status(part), "results": {f: load(folder, f) for f in files}}
    return out


def why_missing(parts: dict[str, dict[str, Any]], name: str, file: str) -> str:
    """The reason a part's results are missing, as the table says it."""
    st = parts[name]["status"]
    if st.startswith("not run"):
        return st
    data = parts[name]["results"].get(file)
    if isinstance(data, dict) and "error" in data:
        return f"not run ({name}: {data['error']})"
    return f"not run ({name} {st}, no {file})"


def judge(value: float, threshold: float, on_cpu: bool) -> str:
    return "n/a on cpu" if on_cpu else ("yes" if value >= threshold else "NO")


def speed_rows(data: dict[str, Any], workload: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """train_speed.py's row for `workload` alone and for the most processes at once (None where absent)."""
    rows = [r for r in data.get("results", []) if r.get("workload") == workload]
    alone = next((r for r in rows if r.get("procs") == 1), None)
    many = max((r for r in rows if r.get("procs", 1) > 1), key=lambda r: r["procs"], default=None)
    return alone, many


def row_missing(row: dict[str, Any] | None, what: str) -> str | None:
    """None when `row` has results; else "not run (...)" or "failed (...)" from its error."""
    if row is None:
        return f"not run (no {what} row in train_speed.json)"
    if "error" in row:
        err = row["error"]
        return f"not run ({err})" if err.startswith("skipped") else f"failed ({err[:120]})"
    return None


def graph_check_row(parts: dict[str, dict[str, Any]]) -> dict[str, str]:
    target = "every graph variant replays a CUDA graph; states within 1e-4 of eager"
    name = "CUDA graph path (graph_check: quickstart, CIFAR ViT, ViT-B/2)"
    data = parts["graph_check"]["results"]["graph_check.json"]
    if not data or "error" in data:
        return {
            "check": name,
            "target": target,
            "measured": "-",
            "met": why_missing(parts, "graph_check", "graph_check.json"),
        }
    rows = data.get("results", [])
    graphs = [r for r in rows if r.get("expects_graph")]
    replayed = [r for r in graphs if r.get("replays", 0) >= 1]
    rel = max((r.get("max_rel_diff", 0.0) for r in rows), default=0.0)
    workloads = sorted({r["workload"] for r in rows})
    measured = f"{len(replayed)}/{len(graphs)} graph variants replayed ({', '.join(workloads)}); max rel diff {rel:.2g}"
    findings = [f for f in data.get("findings", []) if "allowed" not in f]
    if findings or len(replayed) < len(graphs):
        measured += "; " + (findings or data.get("findings", []) or ["?"])[0]
    good = bool(data.get("ok")) and len(replayed) == len(graphs) > 0
    met = "n/a on cpu" if data.get("device") == "cpu" else ("yes" if good else "NO")
    return {"check": name, "target": target, "measured": measured, "met": met}


def speed_checks(parts: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    names = (
        ("CIFAR pixel ViT alone (train loop)", f">= {CIFAR_STEPS_PER_S:g} steps/s"),
        ("CIFAR pixel ViT, several at once", f"total >= {CONCURRENT_GAIN:g}x alone"),
        ("ViT-B/2 MFU (train loop)", f">= {100 * VIT_B_MFU:g}%"),
        ("train_speed runs replay the CUDA graph", "graph in every run"),
    )
    data = parts["train_speed"]["results"]["train_speed.json"]
    if not data or "error" in data:
        why = why_missing(parts, "train_speed", "train_speed.json")
        return [{"check": c, "target": t, "measured": "-", "met": why} for c, t in names]
    on_cpu = data.get("device") == "cpu"
    alone, many = speed_rows(data, "cifar")
    vit_b, _ = speed_rows(data, "vit_b")
    out = []
    miss = row_missing(alone, "cifar")
    value = alone["steps_per_s_each"] if miss is None else 0.0
    out.append((f"{value:.1f} steps/s", judge(value, CIFAR_STEPS_PER_S, on_cpu)) if miss is None else ("-", miss))
    miss = miss or row_missing(many, "cifar several-at-once")
    if miss is None:
        gain = many["steps_per_s_total"] / alone["steps_per_s_total"]
        text = f"{many['procs']} at once: {many['steps_per_s_total']:.1f} steps/s in all = {gain:.2f}x alone"
        out.append((text, judge(gain, CONCURRENT_GAIN, on_cpu)))
    else:
        out.append(("-", miss))
    miss = row_missing(vit_b, "vit_b")
    if miss is None and vit_b.get("mfu") is not None:
        text = (
            f"{100 * vit_b['mfu']:.1f}% ({vit_b['img_per_s_total']:.0f} img/s, peak {data['peak_tflops']:.3g} TFLOP/s)"
        )
        out.append((text, judge(vit_b["mfu"], VIT_B_MFU, on_cpu)))
    else:
        out.append(("-", miss or "not run (no matmul peak measured)"))
    ran = [r for r in data.get("results", []) if "error" not in r]
    if ran:
        eager = [f"{r['workload']} x{r['procs']}" for r in ran if not r.get("graph")]
        text = f"{len(ran) - len(eager)}/{len(ran)} rows" + (f"; eager: {', '.join(eager)}" if eager else "")
        out.append((text, "n/a on cpu" if on_cpu else ("NO" if eager else "yes")))
    else:
        out.append(("-", "not run (no train_speed row finished)"))
    return [{"check": c, "target": t, "measured": m, "met": met} for (c, t), (m, met) in zip(names, out)]


def info_rows(parts: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """The rest, without targets: backbones alone, the CIFAR run, the Pareto objective, other workloads."""
    rows = []
    for file in PARTS["backbones"]:
        data = parts["backbones"]["results"][file]
        if data and "error" not in data and data.get("results"):
            r = data["results"][0]
            mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
            text = f"{r['images_per_s']:.0f} img/s at batch {data['batch']} ({data['dtype']}){mfu}"
        else:
            text = why_missing(parts, "backbones", file)
        rows.append((f"backbone alone, eager: {file.removesuffix('.json')}", text))
    last = parts["cifar_train"]["results"]["cifar/metrics.jsonl"]
    if last and "error" not in last:
        text = f"step {last['step']}: loss {last['loss']:.4f}, {last['img_per_s']:.0f} img/s"
    else:
        text = why_missing(parts, "cifar_train", "cifar/metrics.jsonl")
    rows.append(("CIFAR-10 run, then `minsnr pareto` on it", text))
    for name in ("pareto_l0", "pareto_l1"):
        file = PARTS[name][0]
        data = parts[name]["results"][file]
        if data and "error" not in data and data.get("results"):
            objective = {k: v["objective"] for k, v in data["results"].items()}
            best = min(objective.values())
            order = " < ".join(sorted(objective, key=objective.get))
            ratio = objective.get("min_snr", float("nan")) / best if best > 0 else float("nan")
            text = f"min_snr at {ratio:.3g}x the optimum; {order}"
        else:
            text = why_missing(parts, name, file)
        lam = "lambda 0" if name == "pareto_l0" else "relative lambda 1"
        rows.append((f"Pareto objective (eq. 11, {lam})", text))
    data = parts["speed_rest"]["results"]["train_speed_rest.json"]
    if data and "error" not in data:
        for r in data.get("results", []):
            miss = row_missing(r, r.get("workload", "?"))
            text = miss or f"{r['steps_per_s_each']:.1f} steps/s each, {r['img_per_s_total']:.0f} img/s in all"
            rows.append((f"train loop: {r.get('workload')} x{r.get('procs')}", text))
    else:
        rows.append(("train loop: vit_xl, quickstart", why_missing(parts, "speed_rest", "train_speed_rest.json")))
    return [{"check": c, "target": "-", "measured": m, "met": "info"} for c, m in rows]


def machine() -> str:
    """The GPU's name, memory and driver from nvidia-smi; where there is none, says so."""
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi on this machine"
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        res = subprocess.run(query, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"nvidia-smi failed ({type(err).__name__})"
    lines = [line.strip() for line in res.stdout.splitlines() if line.strip()]
    return "; ".join(lines) if res.returncode == 0 and lines else f"nvidia-smi failed (exit {res.returncode})"


def markdown(checks: list[dict[str, str]], parts: dict[str, dict[str, Any]], head: str) -> str:
    def esc(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = [head, "", "| check | target | measured | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {esc(c['check'])} | {esc(c['target'])} | {esc(c['measured'])} | {esc(c['met'])} |" for c in checks]
    lines += ["", "| part | status | seconds | limit s |", "| --- | --- | ---: | ---: |"]
    for name, p in parts.items():
        seconds = f"{p['seconds']:.0f}" if "seconds" in p else "-"
        limit = f"{p['limit_s']:.0f}" if p.get("limit_s") else "-"
        lines.append(f"| {name} | {esc(p['status'])} | {seconds} | {limit} |")
    return "\n".join(lines)


def summarise(folder: Path, budget: float | None = None) -> tuple[dict[str, Any], str]:
    """(the combined JSON, the Markdown table) for the suite's folder."""
    parts = collect(folder)
    checks = [graph_check_row(parts), *speed_checks(parts), *info_rows(parts)]
    total = sum(p.get("seconds", 0.0) for p in parts.values())
    name = machine()
    head = f"GPU suite on {name}: {total:.0f} s of parts" + (f" (budget {budget:.0f} s)" if budget else "")
    report = {"machine": name, "budget_s": budget, "total_s": total, "checks": checks, "parts": parts}
    return report, markdown(checks, parts, head)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="the suite's $OUT")
    p.add_argument("--budget", type=float, default=None, help="the suite's time budget in seconds (for the table)")
    a = p.parse_args(argv)
    folder = Path(a.folder)
    if not folder.is_dir():
        p.error(f"{folder} is not a folder (the suite's $OUT)")
    report, table = summarise(folder, a.budget)
    (folder / "gpu_suite.json").write_text(json.dumps(report, indent=1))
    (folder / "gpu_suite.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {folder / 'gpu_suite.json'} and {folder / 'gpu_suite.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
