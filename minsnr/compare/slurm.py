"""The runs of a comparison as Slurm jobs, through submitit (`minsnr compare --executor slurm`; the `slurm` extra).

Each run is one job; the job's function (`RunJob`) runs `python -m minsnr.compare.worker RUN_DIR/config.yaml`
as a child process, its output appended to RUN_DIR/compare.log as under the local executor, and the worker
writes RUN_DIR/compare_status.json as always. The race's state stays in the shared run folder:
RUN_DIR/seed<S>/<run>/slurm_job.json = {"job_id", "submitted", "folder", "executor"}, written atomically at
submission. A rerun of the same command skips finished runs (runner.run_is_done), waits for a recorded job
that is still pending or running (never a second job on one folder), and submits a new job for a run whose
job ended without finishing (failed, stopped, cancelled, timed out, preempted); resume=auto continues it
from its last checkpoint.

Time limit and preemption, through submitit's checkpointing: jobs are submitted with --requeue and submitit's
--signal=USR2@SIGNAL_DELAY_S. On that signal (time limit near, or a preemption) submitit calls
RunJob.checkpoint: the worker gets SIGTERM, saves a checkpoint and stops (minsnr.train), and submitit requeues
the same job id, which resumes. The worker ignores USR2 itself (Slurm signals every process of the step, and
USR2's default action would kill it before it saves). A plain SIGTERM (scancel, or a preemption without USR2)
stops the worker with a checkpoint too.

Ctrl-C or SIGTERM of the comparison does not cancel its jobs: a rerun waits for them. `submitit-local` runs
the same jobs here through submitit's LocalExecutor (job id: its controller's pid), for tests and dry runs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

from minsnr.compare.jobs import JOB, age_s, ended, states
from minsnr.compare.pool import Todo, label, last_step
from minsnr.compare.presets import Settings
from minsnr.compare.worker import STATUS, command, environment
from minsnr.config import ConfigError
from minsnr.extras import require
from minsnr.files import read_json, write_json

EXECUTORS = {
    "local": "subprocesses of this process (minsnr.compare.pool)",
    "slurm": "one Slurm job per run through submitit",
    "submitit-local": "the Slurm path on this machine, through submitit's LocalExecutor (tests, dry runs)",
}
SIGNAL_DELAY_S = 120  # USR2 this long before the time limit: the worker's step, evaluation and save fit in it
STOP_WAIT_S = 100  # how long checkpoint() waits for the worker to save and exit (below SIGNAL_DELAY_S)
USR2_WAIT_S = 10.0  # after a SIGTERM, how long a job waits for the USR2 that follows it on a preemption
MAX_REQUEUES = 20  # time-limit requeues per job (preemptions do not count); then a rerun submits a new job
SLURM_POLL_S = 30.0  # one sacct call for all jobs at most this often (status files are read every second)
MEM = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)  # sbatch --mem: a size, units K, M, G or T (default M)


def load_submitit() -> ModuleType:
    """submitit, or MissingExtra naming the extra that installs it."""
    return require("submitit", "minsnr compare --executor slurm")


def check_options(settings: Settings) -> None:
    """Refuse bad executor settings before anything is trained or submitted (ConfigError, one line); for the
    submitit executors, MissingExtra when submitit is not installed."""
    if settings.executor not in EXECUTORS:
        raise ConfigError(f"--executor {settings.executor!r} is not valid; choose one of: {', '.join(EXECUTORS)}")
    if settings.executor == "local":
        return
    if settings.slurm_time < 1:
        raise ConfigError(f"--slurm-time {settings.slurm_time}: give each job's time limit in minutes, >= 1")
    if settings.slurm_gpus < 0:
        raise ConfigError(f"--slurm-gpus {settings.slurm_gpus}: give the GPUs per job, >= 0")
    if settings.slurm_cpus is not None and settings.slurm_cpus < 1:
        raise ConfigError(f"--slurm-cpus {settings.slurm_cpus}: give the CPU cores per job, >= 1")
    if settings.slurm_mem is not None and not MEM.match(settings.slurm_mem):
        raise ConfigError(
            f"--slurm-mem {settings.slurm_mem!r}: give a size as sbatch --mem takes it, e.g. 32G or 8000M"
        )
    load_submitit()
    if settings.executor == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError(
            "--executor slurm: sbatch not found on this machine; run the comparison on a Slurm login node"
        )


def slurm_parameters(settings: Settings) -> dict[str, Any]:
    """The sbatch options of every job (submitit.SlurmExecutor.update_parameters names)."""
    params: dict[str, Any] = {
        "time": settings.slurm_time,
        "gpus_per_node": settings.slurm_gpus,
        "ntasks_per_node": 1,  # one worker per job; it is not a torchrun launch
        "signal_delay_s": SIGNAL_DELAY_S,
        "additional_parameters": {"requeue": True},  # so that a preempted or timed-out job may be requeued
    }
    optional = {
        "partition": settings.slurm_partition,
        "account": settings.slurm_account,
        "cpus_per_task": settings.slurm_cpus,
        "mem": settings.slurm_mem,
    }
    return params | {k: v for k, v in optional.items() if v is not None}


def make_executor(settings: Settings, folder: Path) -> Any:
    """submitit's executor for settings.executor, its logs and pickles in `folder`."""
    submitit = load_submitit()
    if settings.executor == "submitit-local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=MAX_REQUEUES)
        executor.update_parameters(timeout_min=settings.slurm_time, gpus_per_node=settings.slurm_gpus)
        return executor
    try:
        executor = submitit.SlurmExecutor(folder, max_num_timeout=MAX_REQUEUES)
    except RuntimeError as err:  # no srun on this machine
        raise ConfigError(f"--executor slurm: {err}") from None
    executor.update_parameters(**slurm_parameters(settings))
    return executor


def _ignore_preempt_signal() -> None:
    """In the worker, before exec: ignore submitit's USR2 (inherited through exec); the job's function
    stops the worker with SIGTERM instead, after which it saves."""
    signal.signal(getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")), signal.SIG_IGN)


@dataclass
class RunJob:
    """The function of one job: train one run with the worker as a child process, as the local pool does.

    --parent is this job's own process, not the comparison's: the comparison may end while its jobs train,
    but a worker must not outlive its job. `checkpoint` is submitit's hook (see the module docstring)."""

    config: str
    bin_images: int
    threads: int
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    _terminated: bool = field(default=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_proc": None, "_terminated": False}  # a child process does not travel in a pickle

    def __call__(self) -> str:
        run_dir = Path(self.config).parent
        old = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            with (run_dir / "compare.log").open("a") as log:
                self._proc = subprocess.Popen(
                    command(self.config, self.bin_images, os.getpid()),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=environment(self.threads, 1),  # each job has its own GPUs
                    preexec_fn=_ignore_preempt_signal,
                )
                while self._proc.poll() is None:  # a poll loop, not wait(): checkpoint() may poll from a handler
                    time.sleep(0.5)
            if self._terminated:  # a preemption: submitit's USR2 follows and requeues this job (checkpoint)
                time.sleep(USR2_WAIT_S)
        finally:
            self._stop(wait=True)  # an exception here (KeyboardInterrupt) leaves no worker behind
            signal.signal(signal.SIGTERM, old)
        status = read_json(run_dir / STATUS)
        return status["state"] if status else f"exit code {self._proc.returncode}, no status written"

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        """scancel or a preemption: pass it on to the worker (under Slurm it has it already; twice is harmless)."""
        self._terminated = True
        self._stop(wait=False)

    def _stop(self, wait: bool) -> None:
        """SIGTERM to a running worker (it saves a checkpoint and stops); wait up to STOP_WAIT_S for it."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        while wait and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)

    def checkpoint(self) -> Any:
        """submitit, on the time-limit or preemption signal: let the worker save and stop, then requeue this
        same run; resume=auto continues it from the checkpoint."""
        from submitit.helpers import DelayedSubmission

        self._stop(wait=True)
        return DelayedSubmission(replace(self, _proc=None))


@contextmanager
def _importable_here() -> Iterator[None]:
    """PYTHONPATH with this minsnr's source root while submitting: the job unpickles RunJob (sbatch exports
    the environment; the local executor copies it)."""
    root, before = str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, before]))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


@dataclass
class Tracked:
    todo: Todo
    record: dict[str, Any]  # its slurm_job.json
    start: float
    job: Any = None  # submitit's Job when submitted by this process
    started: bool = False


def _wait(seconds: float) -> None:
    time.sleep(seconds)  # one place, so that a test can interrupt the loop


def _submit(
    executor: Any, todo: Todo, settings: Settings, threads: int, bin_images: int, folder: Path
) -> tuple[Any, dict[str, Any]]:
    spec, seed, path = todo
    (path.parent / STATUS).unlink(missing_ok=True)  # a stale status must not outlive this attempt
    if settings.executor == "slurm":
        executor.update_parameters(job_name=f"minsnr:{label(spec, seed)}")
    with _importable_here():
        job = executor.submit(RunJob(str(path.resolve()), bin_images, threads))
    record = {
        "job_id": str(job.job_id),
        "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "folder": str(folder),
        "executor": settings.executor,
    }
    write_json(path.parent / JOB, record)
    return job, record


def run_slurm(
    todo: list[Todo],
    settings: Settings,
    run_dir: Path,
    threads: int,
    bin_images: int,
    steps: int,
    progress_every: float = 60.0,
) -> bool:
    """Train the runs as jobs, settings.jobs in the queue at a time (0: all), with pool.run_all's contract and
    lines; returns False if interrupted (the jobs keep training: a rerun waits for them)."""
    check_options(settings)
    folder = Path(settings.slurm_folder or run_dir / "slurm").resolve()
    executor = make_executor(settings, folder)
    limit = settings.jobs or len(todo)
    queue, running = list(todo), {}
    t0 = last_report = last_poll = time.perf_counter()
    found: dict[str, str] = {}

    def say(text: str, **kw: Any) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {text}", flush=True, **kw)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop)
    try:
        earlier = {label(s, seed): r for s, seed, p in queue if (r := read_json(p.parent / JOB)) is not None}
        now = states(earlier) if earlier else {}
        found = dict(now)
        for item in list(queue):
            key, record = label(item[0], item[1]), earlier.get(label(item[0], item[1]))
            if record is not None and not ended(now[key], age_s(record)):
                queue.remove(item)  # never a second job on one run folder
                running[key] = Tracked(item, record, time.perf_counter(), started=now[key].startswith("RUNNING"))
                say(f"waiting  {key} (job {record['job_id']} of an earlier session, {now[key]})")
        while queue or running:
            while queue and len(running) < limit:
                item = queue.pop(0)
                key, before = label(item[0], item[1]), earlier.get(label(item[0], item[1]))
                job, record = _submit(executor, item, settings, threads, bin_images, folder)
                running[key] = Tracked(item, record, time.perf_counter(), job)
                again = (
                    f", after job {before['job_id']} ended ({now[key]}): it resumes from its checkpoint"
                    if before
                    else ""
                )
                say(f"submitted {key} as job {record['job_id']}{again}")
            _wait(1.0)
            local = settings.executor == "submitit-local"
            if local or time.perf_counter() - last_poll > SLURM_POLL_S:
                last_poll = time.perf_counter()
                try:
                    found = states({k: t.record for k, t in running.items()})
                except RuntimeError as err:  # slurmdbd busy or down: the jobs go on; ask again later
                    say(f"warning: {err}; keeping the states last read")
            for key, tracked in list(running.items()):
                spec, seed, path = tracked.todo
                status = read_json(path.parent / STATUS)
                state = found.get(key, "UNKNOWN")
                if state.startswith("RUNNING") and not tracked.started:
                    tracked.started = True
                    say(f"started  {key} (job {tracked.record['job_id']})")
                over = status is not None and status["state"] != "stopped"  # stopped: maybe requeued, ask Slurm
                if not over and not ended(state, age_s(tracked.record)):
                    continue
                del running[key]
                if settings.executor == "submitit-local" and tracked.job is not None:
                    tracked.job.done()  # reaps the controller process when it has exited
                if status is None:  # killed (node failure, out of memory, cancelled while pending): say so
                    err = Path(tracked.record["folder"]) / f"{tracked.record['job_id']}_0_log.err"
                    status = {
                        "state": "failed",
                        "step": None,
                        "message": f"job {tracked.record['job_id']} ended ({state}) without writing a status "
                        f"(submitit's log: {err})",
                    }
                    write_json(path.parent / STATUS, status)  # the job has ended: the report reads it
                extra = f" at step {status['step']}" if status["step"] is not None else ""
                log = path.parent / "compare.log"
                msg = f": {status['message']} (log: {log})" if status["state"] in ("failed", "stopped") else ""
                took = time.perf_counter() - tracked.start
                say(f"{status['state']:<8} {key}{extra} in {took:.0f} s (job {tracked.record['job_id']}){msg}")
            if running and time.perf_counter() - last_report > progress_every:
                last_report = time.perf_counter()
                say(
                    "  ".join(
                        f"{k} {last_step(t.todo[2].parent)}/{steps}" if t.started else f"{k} {found.get(k, 'queued')}"
                        for k, t in running.items()
                    )
                )
    except KeyboardInterrupt:
        ids = " ".join(t.record["job_id"] for t in running.values())
        cancel = "scancel" if settings.executor == "slurm" else "kill"
        try:
            print(
                f"interrupted: the {len(running)} submitted job(s) keep training; rerun the same command to wait "
                f"for them again" + (f", or stop them: {cancel} {ids}" if ids else ""),
                file=sys.stderr,
                flush=True,
            )
        except OSError:
            pass
        return False
    finally:
        signal.signal(signal.SIGTERM, old)
    return True
