"""`minsnr compare --executor slurm` through submitit, on the CPU with submitit's LocalExecutor (--executor
submitit-local, the same jobs and job records): the same numbers as the local executor, the race's state in the
run folder (a rerun waits for live jobs, skips finished runs, resubmits ended ones that continue from their
checkpoint), the checkpoint-and-requeue path, the sbatch options, and the refusals."""

import json
import os
import signal
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from submitit.slurm.slurm import _make_sbatch_string
from test_compare_runs import CPU
from test_compare_runs import TINY as RACE_TINY

from minsnr.compare import cli, jobs, runner, slurm, worker
from minsnr.compare.presets import RunSpec, Settings, run_config, run_folder, run_matrix
from minsnr.config import ConfigError, dump_yaml, load_config

# the local tests' tiny race, scored by --eval-every / --eval-num here; both executors train with one thread
TINY = [*(o for o in RACE_TINY if not o.startswith("log.eval_")), "train.threads=1"]
NAMES = ["x0_const", "x0_min_snr"]
SUBMITIT_LOCAL = ["--executor", "submitit-local", "--slurm-gpus", "0"]


def _args(run_dir: Path, classifier: str, *extra: str) -> list[str]:
    return [
        str(CPU),
        *TINY,
        f"run_dir={run_dir}",
        "train.steps=20",
        "--targets",
        "x0",
        "--classifier",
        classifier,
        "--eval-every",
        "10",
        "--eval-num",
        "20",
        "--bin-images",
        "50",
        *extra,
    ]


def _metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the one timing key."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "img_per_s"} for row in rows]


def _report(run_dir: Path) -> dict:
    return {r["name"]: r for r in json.loads((run_dir / "compare.json").read_text())["report"]["runs"]}


def _pids(match: bytes) -> list[int]:
    """Processes whose command line contains `match`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and match in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def _children(pid: int) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                out.append(int(proc.name))
        except (OSError, IndexError, ValueError):
            pass
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, classifier) -> Path:
    """The same race with the local executor (subprocesses of this process)."""
    run_dir = tmp_path_factory.mktemp("local")
    assert cli.main(_args(run_dir, classifier, "--jobs", "2")) == 0
    return run_dir


def test_race_on_submitit_matches_the_local_one_and_a_rerun_reattaches(tmp_path, classifier, reference, monkeypatch):
    run_dir = tmp_path / "race"
    args = _args(run_dir, classifier, *SUBMITIT_LOCAL)
    submitted = []
    real_submit, real_wait = slurm._submit, slurm._wait
    monkeypatch.setattr(slurm, "_submit", lambda *a: submitted.append(a[1]) or real_submit(*a))

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt  # Ctrl-C of the comparison right after it submitted its jobs

    monkeypatch.setattr(slurm, "_wait", interrupt)
    assert cli.main(args) == 130
    assert len(submitted) == 2
    records = {n: json.loads((run_folder(run_dir, 0, n) / jobs.JOB).read_text()) for n in NAMES}
    assert len({r["job_id"] for r in records.values()}) == 2
    assert all(r["executor"] == "submitit-local" and Path(r["folder"]) == run_dir / "slurm" for r in records.values())
    assert all(jobs.local_alive(r["job_id"], r["folder"]) for r in records.values()), "the jobs did not keep training"

    monkeypatch.setattr(slurm, "_wait", real_wait)
    lines = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert cli.main(args) == 0  # the same command: waits for the two live jobs, submits nothing
    out = "\n".join(lines)
    assert len(submitted) == 2, out
    for name, record in records.items():
        assert f"waiting  seed0/{name} (job {record['job_id']} of an earlier session, RUNNING)" in out
        assert f"finished seed0/{name} at step 20" in out
        assert json.loads((run_folder(run_dir, 0, name) / jobs.JOB).read_text()) == record
        assert _metrics(run_folder(run_dir, 0, name)) == _metrics(run_folder(reference, 0, name)), name
    mine, theirs = _report(run_dir), _report(reference)
    for name in NAMES:
        a, b = mine[name]["seeds"][0], theirs[name]["seeds"][0]
        assert a["steps"] == b["steps"] == [10, 20]
        assert a["values"] == b["values"] and a["bin_mse"] == b["bin_mse"] and a["status"] == "finished"

    lines.clear()
    assert cli.main(args) == 0  # finished runs: nothing submitted, nothing waited for
    out = "\n".join(lines)
    assert len(submitted) == 2 and "waiting" not in out
    assert all(f"seed0/{n}: finished earlier, reused" in out for n in NAMES)


def test_a_failed_job_is_resubmitted_and_continues_from_its_checkpoint(tmp_path, classifier, reference, monkeypatch):
    run_dir = tmp_path / "race"
    args = _args(run_dir, classifier, "--weightings", "baseline", *SUBMITIT_LOCAL)
    folder = run_folder(run_dir, 0, "x0_const")
    killed: list[int] = []

    def kill_after_the_first_checkpoint(seconds: float) -> None:
        time.sleep(0.05)
        if not killed and (folder / "checkpoints" / "step_000000010.pt").exists():
            (pid,) = _pids(b"minsnr.compare.worker\x00" + os.fsencode(folder / "config.yaml"))
            os.kill(pid, signal.SIGKILL)  # the node died: no status, no last save
            killed.append(pid)

    monkeypatch.setattr(slurm, "_wait", kill_after_the_first_checkpoint)
    lines = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert cli.main(args) == 1  # a run failed
    first = json.loads((folder / jobs.JOB).read_text())
    assert killed and "failed   seed0/x0_const in" in "\n".join(lines)
    assert f"job {first['job_id']} ended (ENDED) without writing a status" in "\n".join(lines)
    status = json.loads((folder / worker.STATUS).read_text())  # written for it, so that the report says so
    assert status["state"] == "failed" and f"job {first['job_id']} ended" in status["message"]

    monkeypatch.undo()
    lines = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert cli.main(args) == 0
    out = "\n".join(lines)
    second = json.loads((folder / jobs.JOB).read_text())
    assert second["job_id"] != first["job_id"]
    assert f"submitted seed0/x0_const as job {second['job_id']}, after job {first['job_id']} ended (ENDED)" in out
    log = (folder / "compare.log").read_text()
    assert "resumed from" in log and log.split("resumed from")[-1].splitlines()[0].endswith("at step 10")
    assert _metrics(folder) == _metrics(run_folder(reference, 0, "x0_const"))  # and to the same numbers


def test_the_requeue_signal_saves_a_checkpoint_and_the_requeued_job_resumes(tmp_path, classifier):
    """submitit's USR2 (time limit near, or preemption) reaches every process of the job, as under Slurm:
    the worker ignores it, RunJob.checkpoint stops it with a save, and the job, requeued under the same id,
    continues from that checkpoint."""
    no_periodic = "checkpoint.every=100000"  # a checkpoint before step 200 is the one saved on the signal
    base = load_config(CPU, [*TINY, f"run_dir={tmp_path}", "train.steps=200", "log.eval_every=0", no_periodic])
    spec = run_matrix(Settings(targets=["x0"]), None)[0]
    folder = run_folder(tmp_path, 0, spec.name)
    folder.mkdir(parents=True)
    dump_yaml(run_config(base, spec, tmp_path, classifier, threads=1), folder / "config.yaml")
    settings = Settings(executor="submitit-local", slurm_gpus=0)
    executor = slurm.make_executor(settings, tmp_path / "slurm")
    job, record = slurm._submit(executor, (spec, 0, folder / "config.yaml"), settings, 1, 0, tmp_path / "slurm")
    metrics = folder / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    (task,) = _children(int(job.job_id))  # submitit's process, running RunJob
    (run,) = _children(task)  # the worker
    for pid in (run, task):
        os.kill(pid, signal.SIGUSR2)
    assert job.result() == "finished"  # the same job, requeued by submitit, trained to the end
    log = (folder / "compare.log").read_text()
    assert "resumed from" in log, "the requeued job started over: nothing was saved on the signal"
    step = int(log.split("resumed from")[-1].splitlines()[0].rpartition("at step ")[2])
    assert 2 <= step < 200  # from the checkpoint saved on the signal, not from scratch
    assert json.loads((folder / worker.STATUS).read_text())["step"] == 200
    assert json.loads((folder / jobs.JOB).read_text()) == record


class FakeSlurm:
    """sbatch and sacct stand-ins: submissions are recorded; states are what the test sets."""

    def __init__(self) -> None:
        self.submitted: list[slurm.RunJob] = []
        self.state: dict[str, str] = {}
        self.sacct_down = False

    def update_parameters(self, **kw: object) -> None:
        pass

    def submit(self, fn: slurm.RunJob) -> SimpleNamespace:
        self.submitted.append(fn)
        job_id = str(900 + len(self.submitted))
        self.state[job_id] = "PENDING"
        return SimpleNamespace(job_id=job_id)

    def states(self, job_ids: list[str]) -> dict[str, str]:
        if self.sacct_down:
            raise RuntimeError("sacct could not tell the state of job(s) 777 (slurmdbd down)")
        return {j: self.state.get(j, "UNKNOWN") for j in job_ids}


def _status(folder: Path, state: str, step: int) -> None:
    (folder / worker.STATUS).write_text(json.dumps({"state": state, "step": step, "message": ""}))


def test_a_live_slurm_job_is_waited_for_and_an_ended_one_resubmitted(tmp_path, monkeypatch, capsys):
    fake = FakeSlurm()
    monkeypatch.setattr(slurm, "make_executor", lambda settings, folder: fake)
    monkeypatch.setattr(jobs, "slurm_states", fake.states)
    monkeypatch.setattr(slurm, "SLURM_POLL_S", 0.0)
    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")  # a login node
    hours_ago = (datetime.now(timezone.utc) - timedelta(hours=3)).isoformat()  # long listed by sacct
    todo = []
    for name, job_id in (("x0_const", "777"), ("x0_min_snr", "778")):
        folder = tmp_path / "seed0" / name
        folder.mkdir(parents=True)
        record = {"job_id": job_id, "submitted": hours_ago, "folder": str(tmp_path / "slurm"), "executor": "slurm"}
        (folder / jobs.JOB).write_text(json.dumps(record))
        todo.append((RunSpec("x0", name.removeprefix("x0_"), None), 0, folder / "config.yaml"))
    fake.state |= {"777": "PENDING", "778": "TIMEOUT"}
    _status(tmp_path / "seed0" / "x0_min_snr", "stopped", 12)  # 778 stopped at its time limit
    with pytest.raises(ConfigError, match=r"seed0/x0_const \(job 777, PENDING\)"):
        runner.train_runs(todo, Settings(), tmp_path, 1, [0], 1, 0, 20)  # never two trainers on one folder
    assert not fake.submitted

    ticks = {"n": 0}

    def cluster(seconds: float) -> None:  # what the cluster does between two looks of the comparison
        ticks["n"] += 1
        if ticks["n"] == 1:
            assert not (tmp_path / "seed0" / "x0_min_snr" / worker.STATUS).exists(), "a stale status survived"
            fake.state["777"] = "RUNNING"
        elif ticks["n"] == 2:
            fake.sacct_down = True  # no answer must not read as "ended"
        elif ticks["n"] == 3:
            fake.sacct_down = False
            fake.state["777"] = "COMPLETED"
            _status(tmp_path / "seed0" / "x0_const", "finished", 20)
        elif ticks["n"] == 4:
            fake.state["901"] = "RUNNING"
        elif ticks["n"] == 6:
            fake.state["901"] = "FAILED"  # ended without a status: reported as failed, naming the job

    monkeypatch.setattr(slurm, "_wait", cluster)
    assert slurm.run_slurm(todo, Settings(executor="slurm"), tmp_path, 3, 50, 20)
    out = capsys.readouterr().out
    assert [(Path(j.config), j.bin_images, j.threads) for j in fake.submitted] == [(todo[1][2].resolve(), 50, 3)]
    assert "waiting  seed0/x0_const (job 777 of an earlier session, PENDING)" in out
    assert "started  seed0/x0_const (job 777)" in out and "finished seed0/x0_const at step 20" in out
    assert "submitted seed0/x0_min_snr as job 901, after job 778 ended (TIMEOUT)" in out
    assert "warning: sacct could not tell the state of job(s) 777 (slurmdbd down); keeping the states" in out
    assert "failed   seed0/x0_min_snr" in out and "job 901 ended (FAILED) without writing a status" in out
    assert json.loads((tmp_path / "seed0" / "x0_min_snr" / jobs.JOB).read_text())["job_id"] == "901"
    assert json.loads((tmp_path / "seed0" / "x0_const" / jobs.JOB).read_text())["job_id"] == "777"


def test_which_slurm_states_have_ended():
    # https://slurm.schedmd.com/squeue.html#SECTION_JOB-STATE-CODES: a job in these may still train
    for state in ["PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "COMPLETING", "CONFIGURING", "SUSPENDED"]:
        assert not jobs.ended(state, age_s=1e6), state
    for state in ["COMPLETED", "FAILED", "CANCELLED by 1234", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY"]:
        assert jobs.ended(state, age_s=0.0), state
    # sacct lists a job a little after sbatch: unlisted is alive at first, ended once it should be listed
    assert not jobs.ended("UNKNOWN", age_s=10.0) and jobs.ended("UNKNOWN", age_s=jobs.UNKNOWN_GRACE_S + 1)
    assert jobs.ended("", age_s=jobs.UNKNOWN_GRACE_S + 1)
    old = (datetime.now(timezone.utc) - timedelta(seconds=jobs.UNKNOWN_GRACE_S + 5)).isoformat()
    assert jobs.age_s({"submitted": old}) > jobs.UNKNOWN_GRACE_S


def test_sacct_is_read_for_all_jobs_at_once_and_its_failure_is_an_error(tmp_path, monkeypatch):
    sacct = tmp_path / "sacct"
    sacct.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args'}\nprintf '777|RUNNING\\n778|CANCELLED by 1000\\n'\n")
    sacct.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert jobs.slurm_states(["777", "778", "779"]) == {"777": "RUNNING", "778": "CANCELLED by 1000", "779": "UNKNOWN"}
    assert "--jobs=777,778,779" in (tmp_path / "args").read_text()
    sacct.write_text("#!/bin/sh\necho 'slurmdbd: connection refused' >&2\nexit 1\n")
    with pytest.raises(RuntimeError, match="sacct could not tell the state of job"):
        jobs.slurm_states(["777"])


def test_the_sbatch_script_carries_the_options(tmp_path):
    settings = Settings(
        executor="slurm",
        slurm_partition="gpu",
        slurm_account="proj7",
        slurm_time=90,
        slurm_gpus=2,
        slurm_cpus=8,
        slurm_mem="32G",
    )
    script = _make_sbatch_string(command="true", folder=tmp_path, **slurm.slurm_parameters(settings)).splitlines()
    for flag in [
        "--partition=gpu",
        "--account=proj7",
        "--time=90",
        "--gpus-per-node=2",
        "--cpus-per-task=8",
        "--mem=32G",
        "--ntasks-per-node=1",
        "--requeue",  # a preempted or timed-out job may be requeued
        f"--signal=USR2@{slurm.SIGNAL_DELAY_S}",
    ]:
        assert f"#SBATCH {flag}" in script, flag
    assert slurm.STOP_WAIT_S < slurm.SIGNAL_DELAY_S  # the worker's save fits before Slurm's kill
    plain = _make_sbatch_string(command="true", folder=tmp_path, **slurm.slurm_parameters(Settings(executor="slurm")))
    assert "--time=1440" in plain and "--gpus-per-node=1" in plain  # the documented defaults
    assert not any(f"--{k}=" in plain for k in ("partition", "account", "mem", "cpus-per-task"))  # the cluster's


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--executor", "slurmm"], "--executor 'slurmm' is not valid; choose one of: local, slurm, submitit-local"),
        (["--executor", "slurm", "--slurm-time", "0"], "--slurm-time 0: give each job's time limit in minutes"),
        (["--executor", "slurm", "--slurm-gpus", "-1"], "--slurm-gpus -1: give the GPUs per job, >= 0"),
        (["--executor", "slurm", "--slurm-cpus", "0"], "--slurm-cpus 0: give the CPU cores per job, >= 1"),
        (["--executor", "slurm", "--slurm-mem", "lots"], "--slurm-mem 'lots': give a size as sbatch --mem takes it"),
        (["--slurm-partition", "gpu"], "--slurm-partition is for --executor slurm or submitit-local, not local"),
        (["--executor", "slurm", "--no-pin"], "--pin is for --executor local"),
    ],
)
def test_bad_executor_settings_are_refused_before_anything_runs(tmp_path, capsys, extra, message):
    run_dir = tmp_path / "race"
    assert cli.main([str(CPU), f"run_dir={run_dir}", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("minsnr compare: error: ") and message in err, err
    assert not run_dir.exists()  # nothing trained, nothing submitted


def test_slurm_without_sbatch_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)  # not a Slurm login node
    assert cli.main([str(CPU), f"run_dir={tmp_path / 'race'}", "--executor", "slurm"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "minsnr compare: error: --executor slurm: sbatch not found on this machine; run the comparison on a Slurm login node\n"
    )
    assert not (tmp_path / "race").exists()


def test_without_submitit_one_line_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    run_dir = tmp_path / "race"
    assert cli.main([str(CPU), f"run_dir={run_dir}", "--executor", "slurm"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "minsnr compare: error: submitit not installed: pip install 'minsnr[slurm]' "
        "(needed for minsnr compare --executor slurm)\n"
    )
    assert not run_dir.exists()


def test_a_search_submits_its_rounds_as_jobs(tmp_path, classifier):
    """--search under the job executor: every round's runs go through the same jobs and job records, and the
    plan and rankings are those of the local test's search (tests/test_compare_search.py)."""
    from test_compare_search import _args as search_args

    assert cli.main([*search_args(tmp_path, classifier), *SUBMITIT_LOCAL]) == 0
    t = json.loads((tmp_path / "search.json").read_text())["targets"]["x0"]
    assert t["plan"]["horizons"] == [16, 32] and [len(r["ranking"]) for r in t["rounds"]] == [3, 2]
    records = list((tmp_path / "search").glob(f"seed0/*/{jobs.JOB}"))
    assert len(records) == 4, records  # the reference and the 3 candidates of round 1, continued in round 2
    assert all(json.loads(r.read_text())["executor"] == "submitit-local" for r in records)
