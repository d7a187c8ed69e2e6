"""Is the job of a run still training? The job records of `minsnr compare --executor slurm` (RUN_DIR/seed<S>/
<run>/slurm_job.json, written by minsnr.compare.slurm) read against Slurm (one sacct call) or, for submitit's
local executor, against /proc; the local executor uses `live_jobs` to refuse a run folder a job still writes.
"""

from __future__ import annotations

import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from minsnr.compare.pool import Todo, label
from minsnr.files import read_json

JOB = "slurm_job.json"
UNKNOWN_GRACE_S = 300.0  # sacct may not list a job for a while after sbatch; past this an unlisted job ended
# Slurm job states (https://slurm.schedmd.com/squeue.html#SECTION_JOB-STATE-CODES) in which the job may still
# train; every other state is an end (COMPLETED, FAILED, CANCELLED, TIMEOUT, PREEMPTED, NODE_FAIL, ...)
ALIVE = set(
    "PENDING CONFIGURING RUNNING COMPLETING SUSPENDED STOPPED RESIZING REQUEUED REQUEUE_FED REQUEUE_HOLD "
    "SIGNALING STAGE_OUT RESV_DEL_HOLD".split()
)


def age_s(record: dict[str, Any]) -> float:
    return (datetime.now(timezone.utc) - datetime.fromisoformat(record["submitted"])).total_seconds()


def ended(state: str, age_s: float) -> bool:
    """Has a Slurm job with sacct state `state`, submitted `age_s` seconds ago, ended? UNKNOWN (sacct does
    not list it) counts as alive for UNKNOWN_GRACE_S after submission, then as ended."""
    state = state.split()[0] if state.strip() else "UNKNOWN"  # "CANCELLED by 1234"
    if state == "UNKNOWN":
        return age_s > UNKNOWN_GRACE_S
    return state not in ALIVE


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """sacct's state of each job, one call for all of them; UNKNOWN where sacct does not list it (yet).
    RuntimeError when sacct cannot answer: an unanswered query must never read as an ended job."""
    cmd = ["sacct", "--allocations", "--noheader", "--parsable2", "--format=JobID,State", f"--jobs={','.join(job_ids)}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"sacct could not tell the state of job(s) {', '.join(job_ids)} ({err})") from None
    found = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
    return {j: found.get(j, "UNKNOWN") for j in job_ids}


def local_alive(job_id: str, folder: str) -> bool:
    """A LocalExecutor job's id is its controller's pid: alive while that pid runs submitit's controller for
    `folder` (not a zombie, not a reused pid)."""
    proc = Path("/proc") / job_id
    try:
        stat, cmdline = (proc / "stat").read_text(), (proc / "cmdline").read_bytes()
    except OSError:
        return False
    zombie = stat.rpartition(")")[2].split()[:1] == ["Z"]
    return not zombie and b"submitit.local._local" in cmdline and os.fsencode(folder) in cmdline


def states(records: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The state of each recorded job (key -> its slurm_job.json): Slurm's (sacct) for slurm jobs, RUNNING or
    ENDED for submitit-local ones."""
    out = {
        k: ("RUNNING" if local_alive(r["job_id"], r["folder"]) else "ENDED")
        for k, r in records.items()
        if r.get("executor") == "submitit-local"
    }
    slurm = {k: r["job_id"] for k, r in records.items() if k not in out}
    if slurm:
        found = slurm_states(sorted(set(slurm.values())))
        out |= {k: found[j] for k, j in slurm.items()}
    return out


def live_jobs(todo: list[Todo]) -> list[str]:
    """'seed0/x0_const (job 123, RUNNING)' for each run of `todo` whose recorded job still trains."""
    records = {label(s, seed): r for s, seed, path in todo if (r := read_json(path.parent / JOB)) is not None}
    if not records:
        return []
    found = states(records)
    return [f"{k} (job {records[k]['job_id']}, {found[k]})" for k in records if not ended(found[k], age_s(records[k]))]
