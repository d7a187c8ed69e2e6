"""The runs of a comparison as subprocesses (minsnr.compare.worker), `jobs` at a time: each pinned to its own
CPU cores with as many threads (OMP_NUM_THREADS, train.threads), its output in RUN_DIR/seed<S>/<run>/
compare.log, a line when it starts and when it ends, the steps of the running ones every minute. Ctrl-C or
SIGTERM: every running run saves a checkpoint and stops, so a rerun continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from minsnr.compare.presets import RunSpec
from minsnr.compare.worker import STATUS, command, environment
from minsnr.files import read_json

Todo = tuple[RunSpec, int, Path]  # (run, seed, its config.yaml)


def slots(jobs: int, cores: list[int]) -> list[list[int]]:
    """CPU cores of each concurrent slot: disjoint and equal when jobs <= cores, shared round-robin beyond."""
    per = max(1, len(cores) // jobs)
    return [[cores[(i * per + k) % len(cores)] for k in range(per)] for i in range(jobs)]


@dataclass
class Job:
    spec: RunSpec
    seed: int
    config_path: Path
    proc: subprocess.Popen[bytes]
    log: TextIO
    cores: list[int]
    start: float


def _launch(
    spec: RunSpec, seed: int, config_path: Path, cores: list[int], pin: bool, threads: int, bin_images: int, jobs: int
) -> Job:
    env = environment(threads, jobs)  # the runs share one GPU: each keeps data there only if all fit
    cmd = command(config_path, bin_images, os.getpid())
    if pin:
        cmd += ["--cpus", ",".join(map(str, cores))]
    (config_path.parent / STATUS).unlink(missing_ok=True)  # a stale status must not outlive this attempt
    log = (config_path.parent / "compare.log").open("a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return Job(spec, seed, config_path, proc, log, cores, time.perf_counter())


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return int(json.loads(lines[-1])["step"]) if lines else 0


def run_all(
    todo: list[Todo], jobs: int, cores: list[int], pin: bool, bin_images: int, steps: int, progress_every: float = 60.0
) -> bool:
    """Train the runs, `jobs` at a time; returns False if interrupted (Ctrl-C or SIGTERM: every run saves a
    checkpoint and stops, and a rerun continues)."""
    pool = slots(jobs, cores)
    free = list(range(jobs))
    queue, running = list(todo), {}
    t0 = last_report = time.perf_counter()

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop)
    try:
        while queue or running:
            while queue and free:
                slot = free.pop(0)
                spec, seed, path = queue.pop(0)
                running[slot] = _launch(spec, seed, path, pool[slot], pin, len(pool[slot]), bin_images, jobs)
                where = f"cores {pool[slot]}" if pin else "unpinned"
                print(
                    f"[{time.perf_counter() - t0:6.0f} s] started  {label(spec, seed)} ({where}, "
                    f"{len(pool[slot])} thread(s))",
                    flush=True,
                )
            time.sleep(0.2)
            for slot, job in list(running.items()):
                if job.proc.poll() is None:
                    continue
                job.log.close()
                del running[slot]
                free.append(slot)
                status = read_json(job.config_path.parent / STATUS) or {
                    "state": "failed",
                    "step": None,
                    "message": f"exit code {job.proc.returncode}, no status written",
                }
                took = time.perf_counter() - job.start
                extra = f" at step {status['step']}" if status["step"] is not None else ""
                msg = (
                    f": {status['message']} (log: {job.config_path.parent / 'compare.log'})"
                    if status["state"] == "failed"
                    else ""
                )
                print(
                    f"[{time.perf_counter() - t0:6.0f} s] {status['state']:<8} {label(job.spec, job.seed)}{extra} "
                    f"in {took:.0f} s{msg}",
                    flush=True,
                )
            if running and time.perf_counter() - last_report > progress_every:
                last_report = time.perf_counter()
                print(
                    f"[{last_report - t0:6.0f} s] "
                    + "  ".join(
                        f"{label(j.spec, j.seed)} {last_step(j.config_path.parent)}/{steps}" for j in running.values()
                    ),
                    flush=True,
                )
    except KeyboardInterrupt:
        for job in running.values():  # first, so a failing print (a closed pipe) cannot orphan them
            if job.proc.poll() is None:
                job.proc.send_signal(signal.SIGINT)
        try:
            print(
                "interrupted: every running run saves a checkpoint and stops; rerun the same command to continue",
                file=sys.stderr,
                flush=True,
            )
        except OSError:
            pass
        for job in running.values():
            job.proc.wait()
            job.log.close()
        return False
    finally:
        signal.signal(signal.SIGTERM, old)
    return True


def label(spec: RunSpec, seed: int) -> str:
    return f"seed{seed}/{spec.name}"
