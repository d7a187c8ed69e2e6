"""Multi-process runs as launchers start them (issue 24, items 6 and 7), two gloo ranks on the CPU:

- 20 consecutive two-rank runs started with RANK / WORLD_SIZE / MASTER_* (as Slurm scripts and ckpt-chaos do)
  all exit 0 on every rank (the flaky SIGABRT at exit);
- a stop signal that reaches one rank only stops both after the same step, with a checkpoint there;
- torchrun --max-restarts: one rank killed mid-run, the restarted group resumes and ends with the weights of a
  run that never stopped;
- examples/slurm/minsnr.sbatch under stand-ins for srun, scontrol and scancel (two "nodes" on this machine):
  it trains, a time-limit notice (USR1 to the batch script) saves a checkpoint and requeues, and the
  requeued job ends with the uninterrupted run's weights.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from minsnr.checkpoint import load_checkpoint
from minsnr.distributed import teardown

ROOT = Path(__file__).resolve().parents[1]
STEPS = 300  # about 6 s of two-rank training here: long enough to interrupt after step 100
ARGS = [
    f"train.steps={STEPS}",
    "train.batch_size=16",
    "train.device=cpu",
    "train.threads=1",
    "checkpoint.every=50",
    "checkpoint.keep=10",
    "log.every=50",
    "log.preview_every=0",
    "log.tensorboard=false",
]
TRAIN = [sys.executable, "-m", "minsnr", "train", "configs/quickstart.yaml"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **extra,
    }


def start_ranks(run_dir: Path, *extra: str, world: int = 2) -> list[subprocess.Popen[str]]:
    port = str(free_port())
    return [
        subprocess.Popen(
            [*TRAIN, f"run_dir={run_dir}", *ARGS, *extra],
            cwd=ROOT,
            env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]


def finish(procs: list[subprocess.Popen[str]], timeout: float = 300) -> list[tuple[int, str]]:
    return [(p.wait(timeout=timeout), p.stdout.read() if p.stdout else "") for p in procs]


def wait_for(path: Path, procs: list[subprocess.Popen[str]], timeout: float = 120) -> None:
    """Until `path` exists; fails if the run ended first (it would be too fast to interrupt mid-run)."""
    end = time.monotonic() + timeout
    while not path.exists():
        assert all(p.poll() is None for p in procs), f"the run ended before {path.name} appeared"
        assert time.monotonic() < end, f"{path} did not appear in {timeout} s"
        time.sleep(0.01)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert ckpt["step"] == STEPS
    return {f"{part}.{k}": v for part in ("model", "ema") for k, v in ckpt[part].items()}


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    got, want = weights(run_dir), weights(reference)
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two ranks that never stop."""
    run = tmp_path_factory.mktemp("reference") / "run"
    for code, out in finish(start_ranks(run)):
        assert code == 0, out
    return run


def test_teardown_frees_a_process_group_held_in_a_reference_cycle(tmp_path: Path) -> None:
    """A finished Trainer sits in reference cycles with its DDP wrapper, which holds the process group; teardown
    collects it before the group ends, not the interpreter at exit (where gloo's threads abort the process)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)

    class Holder:
        def __init__(self) -> None:
            self.ddp = nn.parallel.DistributedDataParallel(nn.Linear(4, 4))
            self.me = self  # the cycle

    holder = Holder()
    holder.ddp(torch.ones(2, 4)).sum().backward()
    alive = weakref.ref(holder.ddp)
    del holder
    was = gc.isenabled()
    gc.disable()  # only teardown may collect the cycle
    try:
        assert alive() is not None
        teardown()
        assert not dist.is_initialized()
        assert alive() is None, "the DDP wrapper (and its process group) outlived teardown"
    finally:
        if was:
            gc.enable()


def test_twenty_two_rank_runs_exit_cleanly(tmp_path: Path) -> None:
    """Issue 24 item 6: a finished rank must not abort at exit (it did in 1 of 4 runs: SIGABRT, exit 134)."""
    short = ["train.steps=2", "checkpoint.every=0", "log.every=1"]
    for i in range(20):
        results = finish(start_ranks(tmp_path / f"run{i}", *short))
        for rank, (code, out) in enumerate(results):
            assert code == 0, f"run {i}, rank {rank}: exit {code}\n{out[-2000:]}"
            assert "terminate called" not in out, f"run {i}, rank {rank}\n{out[-2000:]}"
        assert "trained to step 2" in results[0][1]


def test_a_signal_to_one_rank_stops_both_after_the_same_step(tmp_path: Path, reference: Path) -> None:
    """A notice that reaches one rank only (signals arrive at each rank at its own moment): both ranks stop after
    the same step with one checkpoint there, exit 143, and a rerun ends with the uninterrupted run's weights."""
    run = tmp_path / "run"
    procs = start_ranks(run)
    wait_for(run / "checkpoints" / "step_000000100.pt", procs)
    procs[1].send_signal(signal.SIGTERM)
    results = finish(procs)
    assert [code for code, _ in results] == [128 + signal.SIGTERM] * 2, results
    assert "SIGTERM on another rank" in results[0][1]
    stopped = load_checkpoint(run / "checkpoints" / "latest.pt")["step"]
    assert 100 <= stopped < STEPS
    again = finish(start_ranks(run))
    assert [code for code, _ in again] == [0, 0], again
    assert f"at step {stopped}" in again[0][1]
    assert_same_weights(run, reference)


def _children(pid: int) -> dict[int, int]:
    """{RANK: pid} of the processes whose parent is `pid` (Linux /proc)."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != pid:
                continue
            environ = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in environ:
            out[int(environ["RANK"])] = int(proc.name)
    return out


def test_a_shared_rendezvous_store_is_warned_about(monkeypatch: pytest.MonkeyPatch) -> None:
    from minsnr.distributed import restart_store_note

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in (restart_store_note() or "")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # no restart: nothing to warn about
    assert restart_store_note() is None
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # torchrun started with the variable set
    assert restart_store_note() is None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_torchrun_restarts_after_a_rank_is_killed_and_loses_nothing(tmp_path: Path, reference: Path) -> None:
    """Issue 24 item 7: torchrun --max-restarts 1, rank 1 killed (SIGKILL) mid-run: the restarted group resumes
    from the newest checkpoint and ends with the weights of the run that never stopped."""
    run = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    agent = subprocess.Popen(
        [*torchrun, "--max-restarts", "1", "-m", "minsnr", "train", "configs/quickstart.yaml", f"run_dir={run}", *ARGS],
        cwd=ROOT,
        env=env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"),  # restarts need it (minsnr.distributed.restart_store_note)
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(run / "checkpoints" / "step_000000100.pt", [agent])
    ranks = _children(agent.pid)
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGKILL)
    code, out = finish([agent])[0]
    assert code == 0, out[-3000:]
    resumed = [line for line in out.splitlines() if "resumed from" in line]
    assert resumed, out[-3000:]
    assert int(resumed[-1].rsplit("at step", 1)[1].split()[0]) >= 100
    assert_same_weights(run, reference)


STUBS = {
    # srun: one task per node, in the background, each with its node's number; their pids for scancel
    "srun": """#!/usr/bin/env bash
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
pids=()
for ((n = 0; n < SLURM_NNODES; n++)); do
    SLURM_NODEID=$n SLURM_PROCID=$n SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
printf '%s\\n' "${pids[@]}" > "$FAKE_SLURM/tasks"
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
""",
    "scontrol": """#!/usr/bin/env bash
case "$1 $2" in
    "show hostnames") echo 127.0.0.1 ;;
    requeue*) echo "$2" >> "$FAKE_SLURM/requeued" ;;
    *) echo "scontrol stand-in: $*" >&2; exit 1 ;;
esac
""",
    "scancel": """#!/usr/bin/env bash
[[ $1 == --signal=USR1 ]] || { echo "scancel stand-in: $*" >&2; exit 1; }
while read -r p; do kill -USR1 "$p"; done < "$FAKE_SLURM/tasks"
""",
}


def fake_slurm(tmp_path: Path, job: str) -> dict[str, str]:
    bin_dir = tmp_path / "fake_slurm"
    bin_dir.mkdir(exist_ok=True)
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return env(
        PATH=path,
        FAKE_SLURM=str(bin_dir),
        SLURM_JOB_ID=job,
        SLURM_JOB_NAME="minsnr-test",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="node[1-2]",
        GPUS_PER_NODE="1",
        MASTER_PORT=str(free_port()),
        CONFIG="configs/quickstart.yaml",
        RUN_DIR=str(tmp_path / "run"),
    )


@pytest.mark.skipif(shutil.which("bash") is None, reason="runs the sbatch script with bash")
def test_slurm_example_requeues_on_notice_and_resumes(tmp_path: Path, reference: Path) -> None:
    """Issue 24 item 7: the README's sbatch script with srun + torchrun (c10d rendezvous from the Slurm variables)
    on two stand-in nodes; USR1 to the batch script (Slurm's --signal=B:USR1@120) saves a checkpoint on every
    rank and requeues the job; the requeued job resumes and ends with the uninterrupted run's weights."""
    script, run = ROOT / "examples" / "slurm" / "minsnr.sbatch", tmp_path / "run"
    job_env = fake_slurm(tmp_path, "4242")
    batch = subprocess.Popen(
        ["bash", str(script), *ARGS], cwd=ROOT, env=job_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for(run / "checkpoints" / "step_000000100.pt", [batch])
    batch.send_signal(signal.SIGUSR1)
    code, out = finish([batch])[0]
    assert code == 0, out[-3000:]
    assert "time-limit notice" in out
    assert (tmp_path / "fake_slurm" / "requeued").read_text().split() == ["4242"]
    stopped = load_checkpoint(run / "checkpoints" / "latest.pt")["step"]
    assert 100 <= stopped < STEPS, out[-3000:]
    again = subprocess.run(
        ["bash", str(script), *ARGS],
        cwd=ROOT,
        env={**job_env, "SLURM_RESTART_COUNT": "1", "MASTER_PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"at step {stopped}" in again.stdout
    assert_same_weights(run, reference)
