"""Training speed through the real `Trainer` loop (data, step, EMA, logging, hooks), one process and N at once.

Workloads (issue 10):
    quickstart  configs/quickstart.yaml as it is (8x8 digits, vit_tiny, batch 64)
    cifar       pixel ViT patch 4, width 384, depth 8 (~15M params), batch 128, on a synthetic 32x32x3 uint8 npz
    vit_b       configs/imagenet256_vit_b.yaml, ViT-B/2, batch 256, on a synthetic latent folder (32x32x4)
    vit_xl      configs/imagenet256_vit_xl.yaml, ViT-XL/2, batch 64, on the same latent folder
Each run is a fresh process: Trainer set-up, `--warmup` steps (compilation, CUDA graph capture), then a
window of `--seconds` timed between two device syncs; N concurrent runs start their windows together.
Prints img/s, steps/s, TFLOP/s and MFU (model FLOPs of forward+backward counted by
torch.utils.flop_counter, against a matmul peak measured in the same run: bf16 on CUDA, fp32 on the CPU),
peak memory and warm-up time, and writes JSON.

    python benchmarks/train_speed.py                                   # CUDA: all four, 4 concurrent small runs
    python benchmarks/train_speed.py --workloads cifar --concurrent 4 --set train.threads=16   # the old default
    python benchmarks/train_speed.py --set vit_b:train.attention=cudnn --set train.compile_mode=max-autotune-no-cudagraphs
    python benchmarks/train_speed.py --smoke                           # CPU, tiny models, the test suite runs it
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # minsnr, and data.py next to this file

from data import make_latents  # noqa: E402  (benchmarks/data.py)

from minsnr.config import Config, load_config  # noqa: E402
from minsnr.models import build_model  # noqa: E402
from minsnr.train import StopTraining  # noqa: E402

WORKLOADS = ("quickstart", "cifar", "vit_b", "vit_xl")
SMALL = ("quickstart", "cifar")  # the launch-bound ones, run N at once
RESULTS = ROOT / "benchmarks" / "results" / "train_speed.json"


class WindowDone(StopTraining):
    """Raised by the timing hook to leave the training loop after the timed window."""


def workload_config(name: str, data: Path, smoke: bool, device: str, sets: list[str], run_dir: Path) -> Config:
    """The run's config: the workload's preset, then `--set` overrides ([workload:]key=value)."""
    tiny = "{patch_size: %d, depth: 2, width: 32, num_heads: 2}"
    common = [
        f"run_dir={run_dir}",
        "resume=never",
        f"train.device={device}",
        "train.steps=1000000000",
        "log.preview_every=0",
        "log.tensorboard=false",
        "checkpoint.every=0",
        f"train.compile={not smoke}",
    ]
    if name == "quickstart":
        base, extra = "quickstart.yaml", []
    elif name == "cifar":
        args = tiny % 4 if smoke else "{patch_size: 4, depth: 8, width: 384, num_heads: 6}"
        base, extra = (
            "quickstart.yaml",
            [
                "data.source=npz",
                f"data.path={data / 'cifar.npz'}",
                "data.hflip=true",
                "model.input_size=32",
                "model.in_channels=3",
                f"model.args={args}",
                f"train.batch_size={32 if smoke else 128}",
                "optim.warmup_steps=0",
            ],
        )
    else:
        base = f"imagenet256_{name}.yaml"
        extra = [f"data.path={data / 'latents'}", f"train.batch_size={16 if smoke else 256 if name == 'vit_b' else 64}"]
        extra += ["model.input_size=8", f"model.args={tiny % 2}", "data.num_workers=0"] if smoke else []
    mine = [
        s.split(":", 1)[1] if ":" in s.split("=", 1)[0] else s
        for s in sets
        if ":" not in s.split("=", 1)[0] or s.split(":", 1)[0] == name
    ]
    return load_config(ROOT / "configs" / base, [*common, *extra, *mine])


def flops_per_image(cfg: Config) -> float:
    """Forward+backward FLOPs of the model for one image, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    m = cfg.model
    with torch.device("meta"):
        model = build_model(m)
        x = torch.randn(2, m.in_channels, m.input_size, m.input_size)
        labels = torch.zeros(2, dtype=torch.long) if m.num_classes else None
        with FlopCounterMode(display=False) as counter:
            model(x, torch.zeros(2, dtype=torch.long), labels).square().mean().backward()
    return counter.get_total_flops() / 2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wait_for_all(barrier: Path | None, me: int, n: int, timeout: float = 600.0) -> None:
    """Every concurrent run writes its ready file and waits for the others' (after its own warm-up)."""
    if barrier is None:
        return
    (barrier / f"ready_{me}").touch()
    deadline = time.time() + timeout
    while len(list(barrier.glob("ready_*"))) < n:
        if time.time() > deadline:
            raise TimeoutError(f"only {len(list(barrier.glob('ready_*')))} of {n} runs reached the barrier")
        time.sleep(0.01)


def worker(a: argparse.Namespace) -> dict[str, Any]:
    """One training run: set-up, warm-up, barrier, timed window; returns its measurements."""
    from minsnr.train import Hook, HookContext, Trainer

    run_dir = Path(a.scratch) / f"run_{a.worker}_{a.index}"
    cfg = workload_config(a.worker, Path(a.scratch), a.smoke, a.device, a.set, run_dir)
    start = time.perf_counter()
    trainer = Trainer(cfg)
    setup_s = time.perf_counter() - start
    marks: dict[str, float] = {}
    barrier = Path(a.barrier) if a.barrier else None

    def timer(ctx: HookContext) -> None:
        if ctx.step == a.warmup:
            sync(ctx.device)
            marks["warm"] = time.perf_counter()
            wait_for_all(barrier, a.index, a.ranks)
            if ctx.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(ctx.device)
            marks["t0"], marks["c0"], marks["s0"] = time.perf_counter(), time.process_time(), ctx.step
        elif "t0" in marks and time.perf_counter() - marks["t0"] >= a.seconds:
            sync(ctx.device)
            marks["t1"], marks["c1"], marks["s1"] = time.perf_counter(), time.process_time(), ctx.step
            raise WindowDone

    trainer.hooks = (Hook(1, timer),)
    try:
        trainer.run()
    except WindowDone:
        pass
    seconds, steps = marks["t1"] - marks["t0"], marks["s1"] - marks["s0"]
    device = trainer.device
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    static = getattr(trainer, "static", None)  # None also on code before the static step (for comparisons)
    return {
        "workload": a.worker,
        "index": a.index,
        "batch": cfg.train.batch_size,
        "steps": steps,
        "seconds": seconds,
        "steps_per_s": steps / seconds,
        "img_per_s": steps * cfg.train.batch_size / seconds,
        "steps_per_cpu_s": steps / max(marks["c1"] - marks["c0"], 1e-9),
        "setup_s": setup_s,
        "warmup_s": marks["warm"] - start - setup_s,
        "peak_mib": peak / 2**20,
        "flops_per_image": flops_per_image(cfg),
        "threads": torch.get_num_threads(),
        "data": type(trainer.batches).__name__,
        "graph": bool(static is not None and static.graph is not None),
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "compile": cfg.train.compile,
        "compile_mode": getattr(cfg.train, "compile_mode", "default"),
        "attention": getattr(cfg.train, "attention", "auto"),
    }  # getattr: also runs on code before issue 10


def matmul_peak(device: str, smoke: bool) -> dict[str, Any]:
    """Best TFLOP/s of square matmuls: bf16 on CUDA, fp32 on the CPU."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    best = 0.0
    for n in (256, 512) if smoke or dev.type != "cuda" else (4096, 8192, 16384):
        a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
        for _ in range(3):
            a @ b
        sync(dev)
        reps, start = 10, time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(dev)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e12)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"peak_tflops": best, "peak_dtype": str(dtype).replace("torch.", ""), "device_name": name}


def make_data(folder: Path, smoke: bool, workloads: list[str]) -> None:
    rng = np.random.default_rng(0)
    if "cifar" in workloads:
        n = 256 if smoke else 50_000
        np.savez(
            folder / "cifar.npz",
            x_train=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            y_train=rng.integers(0, 10, n),
        )
    if {"vit_b", "vit_xl"} & set(workloads):
        make_latents(folder / "latents", 256 if smoke else 4096, (4, 8, 8) if smoke else (4, 32, 32))


def launch(a: argparse.Namespace, kind: str, n: int, scratch: Path, out: Path, timeout: float) -> list[dict[str, Any]]:
    """Run `n` worker processes of `kind` at once; their results (or an error row each)."""
    barrier = Path(tempfile.mkdtemp(dir=scratch)) if n > 1 else None
    procs, started = [], time.perf_counter()
    for i in range(n):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            kind,
            "--index",
            str(i),
            "--ranks",
            str(n),
            "--scratch",
            str(scratch),
            "--device",
            a.device,
            "--warmup",
            str(a.warmup),
            "--seconds",
            str(a.seconds),
            "--json",
            str(out / f"{kind}_{n}_{i}.json"),
            *(["--smoke"] if a.smoke else []),
            *(["--barrier", str(barrier)] if barrier else []),
            *[f"--set={s}" for s in a.set],
        ]
        log = (out / f"{kind}_{n}_{i}.log").open("w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log, i))
    rows = []
    for proc, log, i in procs:
        try:
            proc.wait(timeout=max(timeout - (time.perf_counter() - started), 1.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        result = out / f"{kind}_{n}_{i}.json"
        text = (out / f"{kind}_{n}_{i}.log").read_text(errors="replace")
        speed = next((line for line in text.splitlines() if line.startswith("speed: ")), "")
        if proc.returncode == 0 and result.exists():
            rows.append({**json.loads(result.read_text()), "speed_log": speed})
        else:
            tail = text.strip().splitlines()[-5:]
            rows.append({"workload": kind, "index": i, "error": f"exit {proc.returncode}: " + " | ".join(tail)})
            print(
                f"{kind} x{n} run {i} failed (exit {proc.returncode}, time limit {timeout:.0f} s):\n  "
                + "\n  ".join(tail)
            )
    return rows


def summarise(kind: str, rows: list[dict[str, Any]], peak: float) -> dict[str, Any]:
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return {"workload": kind, "procs": len(rows), "error": rows[0]["error"]}
    tflops = sum(r["img_per_s"] * r["flops_per_image"] for r in ok) / 1e12
    steady = sum(r["steps_per_s"] for r in ok) / len(ok)
    per_cpu = sum(r["steps_per_cpu_s"] for r in ok) / len(ok)
    return {
        "workload": kind,
        "procs": len(rows),
        "ok": len(ok),
        "steps_per_s_each": steady,
        "steps_per_cpu_s": per_cpu,
        "steps_per_s_total": sum(r["steps_per_s"] for r in ok),
        "img_per_s_total": sum(r["img_per_s"] for r in ok),
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_mib": max(r["peak_mib"] for r in ok),
        "warmup_s": max(r["warmup_s"] for r in ok),
        "setup_s": max(r["setup_s"] for r in ok),
        "params": ok[0]["params"],
        "threads": ok[0]["threads"],
        "data": ok[0]["data"],
        "graph": ok[0]["graph"],
        "speed_log": ok[0].get("speed_log", ""),
        "runs": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny models, short windows (tests the benchmark)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated of {', '.join(WORKLOADS)}")
    p.add_argument(
        "--concurrent", type=int, default=None, help="also run the small workloads N at once (default 4; smoke 2)"
    )
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 30; smoke 3)")
    p.add_argument("--seconds", type=float, default=None, help="timed window per run (default 10; smoke 1)")
    p.add_argument(
        "--timeout", type=float, default=None, help="seconds before a run is killed (default 300; smoke 120)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for everything: runs that would not fit are "
        "skipped or cut (say so in the table); the JSON is rewritten after every row",
    )
    p.add_argument("--set", action="append", default=[], help="[workload:]key=value config override; repeatable")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", choices=WORKLOADS, help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ranks", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    p.add_argument("--barrier", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.device = a.device or ("cpu" if a.smoke or not torch.cuda.is_available() else "cuda")
    a.concurrent = a.concurrent if a.concurrent is not None else (2 if a.smoke else 4)
    a.warmup = a.warmup if a.warmup is not None else (3 if a.smoke else 30)
    a.seconds = a.seconds if a.seconds is not None else (1.0 if a.smoke else 10.0)
    a.timeout = a.timeout if a.timeout is not None else (120.0 if a.smoke else 300.0)
    if a.worker:
        Path(a.json).write_text(json.dumps(worker(a)))
        return 0
    kinds = [k for k in a.workloads.split(",") if k]
    bad = [k for k in kinds if k not in WORKLOADS]
    if bad:
        p.error(f"unknown workload(s) {bad}; valid: {', '.join(WORKLOADS)}")
    begin, out = time.perf_counter(), Path(a.out)
    logs = out.with_suffix("")
    logs.mkdir(parents=True, exist_ok=True)
    peak = matmul_peak(a.device, a.smoke)
    print(
        f"{peak['device_name']}: {peak['peak_dtype']} matmul peak {peak['peak_tflops']:.3g} TFLOP/s; torch "
        f"{torch.__version__}; load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    print(
        f"{'workload':<11} {'procs':>5} {'steps/s':>9} {'total':>9} {'img/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
        f"{'peak MiB':>9} {'warm-up s':>9}  path",
        flush=True,
    )
    table: list[dict[str, Any]] = []
    meta = {
        **peak,
        "device": a.device,
        "torch": torch.__version__,
        "smoke": a.smoke,
        "cpus": os.cpu_count(),
        "sets": a.set,
        "warmup_steps": a.warmup,
        "seconds": a.seconds,
    }
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        make_data(scratch, a.smoke, kinds)
        for kind in kinds:
            for n in sorted({1, a.concurrent} if kind in SMALL and a.concurrent > 1 else {1}):
                left = a.budget - (time.perf_counter() - begin) if a.budget else a.timeout
                if left < 30:
                    row = {"workload": kind, "procs": n, "error": f"skipped: {a.budget:.0f} s budget spent"}
                else:
                    row = summarise(
                        kind, launch(a, kind, n, scratch, logs, min(a.timeout, left - 5)), peak["peak_tflops"]
                    )
                table.append(row)
                out.write_text(json.dumps({**meta, "load_avg_1min": os.getloadavg()[0], "results": table}, indent=1))
                if "error" in row:
                    print(f"{kind:<11} {n:>5}  failed: {row['error'][:150]}", flush=True)
                    continue
                mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
                path = f"{row['data']}, {'graph' if row['graph'] else 'eager'}, {row['threads']} thr"
                print(
                    f"{kind:<11} {n:>5} {row['steps_per_s_each']:>9.1f} {row['steps_per_s_total']:>9.1f} "
                    f"{row['img_per_s_total']:>10.0f} {row['tflops']:>8.2f} {mfu:>6} {row['peak_mib']:>9.0f} "
                    f"{row['warmup_s']:>9.1f}  {path}",
                    flush=True,
                )
    print(
        "steps/s: per process (mean); total: summed over the processes; warm-up: set-up excluded, compilation "
        "and graph capture included; peak MiB: CUDA allocator peak in the window (CPU: resident peak); JSON also "
        "holds steps per process CPU-second (steps_per_cpu_s), steadier than wall time on a shared machine"
    )
    print(f"wrote {out} (worker logs in {logs}/)")
    return 0 if all("error" not in r for r in table) else 1


if __name__ == "__main__":
    raise SystemExit(main())
