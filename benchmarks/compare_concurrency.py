"""How well do several `minsnr compare` runs share one machine? Wall time of four runs against one run alone.

    python benchmarks/compare_concurrency.py                 # CPU: the cpu preset's model, 600 steps per run
    python benchmarks/compare_concurrency.py --steps 2000 --device cuda --scenarios one_alone,four_all_at_once

Each scenario is a fresh `minsnr compare cpu` (x0 and eps x baseline/min_snr = 4 runs, or x0 const alone),
one evaluation at the end on 100 samples with a shared classifier, so training dominates. Scenarios:
    one_alone          1 run, the whole machine (threads = cores)
    one_alone_1thread  1 run, 1 thread
    four_pinned        4 runs, one per core at a time, 1 pinned thread each (the CPU default)
    four_all_at_once   4 runs at once, each pinned to cores/4 (or 1) core(s)
    four_naive         4 runs at once, unpinned, threads = cores each (four `minsnr train` in parallel)
Prints wall seconds, the runs' CPU seconds, the ratio to one_alone, and the load average before and after; writes OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOUR = ["--targets", "x0,eps", "--weightings", "baseline,min_snr"]
SCENARIOS = {
    "one_alone": ["--targets", "x0", "--weightings", "const", "--jobs", "1"],
    "one_alone_1thread": ["--targets", "x0", "--weightings", "const", "--jobs", "1", "train.threads=1"],
    "four_pinned": [*FOUR],
    "four_all_at_once": [*FOUR, "--jobs", "4"],
    "four_naive": [*FOUR, "--jobs", "4", "--no-pin", f"train.threads={len(os.sched_getaffinity(0))}"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--device", default="cpu")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--out", default="compare_concurrency")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="compare_concurrency_"))
    common = [
        f"train.steps={a.steps}",
        f"log.eval_every={a.steps}",
        "log.eval_num=100",
        "log.every=50",
        f"checkpoint.every={a.steps}",
        "log.preview_every=0",
        f"train.device={a.device}",
    ]
    # one classifier for every scenario, trained once (not part of any timing)
    subprocess.run(
        [sys.executable, "-m", "minsnr", "train-classifier", "digits", "--out", str(work / "clf"), "--epochs", "2"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    results = {}
    for name in a.scenarios.split(","):
        load_before = os.getloadavg()
        start = time.perf_counter()
        cmd = [
            sys.executable,
            "-m",
            "minsnr",
            "compare",
            "cpu",
            *common,
            f"run_dir={work / name}",
            "--classifier",
            str(work / "clf"),
            "--bin-images",
            "100",
            *SCENARIOS[name],
        ]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if res.returncode != 0:
            raise SystemExit(f"{name} failed:\n{res.stderr[-2000:]}")
        cpu = json.loads((work / name / "compare.json").read_text())["sessions"][-1]["cpu_s"]
        results[name] = {"wall_s": wall, "cpu_s": cpu, "load_before": load_before, "load_after": os.getloadavg()}
        print(
            f"{name:<18} {wall:7.1f} s wall {cpu:7.1f} CPU-s   load {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    if "one_alone" in results:
        base = results["one_alone"]["wall_s"]
        for name, r in results.items():
            r["ratio_to_one_alone"] = r["wall_s"] / base
            print(f"{name:<18} {r['ratio_to_one_alone']:.2f}x one run alone")
    info = {"steps": a.steps, "device": a.device, "cores": len(os.sched_getaffinity(0)), "results": results}
    Path(a.out).with_suffix(".json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
