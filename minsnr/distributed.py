"""Devices and process groups for every verb (train, encode, sample, pareto, fid, losses, classifier).

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK. With WORLD_SIZE > 1, `setup` starts the process group
(NCCL on GPUs, gloo on the CPU, or the backend asked for) and gives each rank the GPU of its LOCAL_RANK;
with one process it starts nothing. `teardown` ends what `setup` started. `wait_for_rank0` runs work that
rank 0 does alone (previews, evaluations) while the other ranks wait without a timeout.
"""

from __future__ import annotations

import datetime
import gc
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

# The backends a device offers, as config choices (train.compile_mode, train.attention); minsnr.step uses them.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPHING_MODES = ("reduce-overhead", "max-autotune")  # inductor captures its own CUDA graphs of the model
ATTENTION = ("auto", "flash", "efficient", "cudnn", "math")  # scaled_dot_product_attention backends; auto = torch's
CPU_ATTENTION = ("auto", "flash", "math")
# Signals that stop a run with a checkpoint after the current step (minsnr.train; StopVote agrees on the step
# under DDP); SIGUSR1 is Slurm's time-limit notice (examples/slurm/minsnr.sbatch)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))
POLL_MAX_S = 0.5  # wait_for_rank0: the longest sleep between two looks at the store

T = TypeVar("T")


class DeviceError(ValueError):
    """A device that this machine does not have."""


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device
    started: bool  # this call started the process group; the caller should `teardown(...)` it


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda if available, else cpu; 'cpu', 'cuda', 'cuda:N' as given, if this machine has it."""
    want = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    if want.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device} asked for, but no CUDA device is available (use cpu or auto)")
    return want


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str = "auto", backend: str | None = None, timeout_min: float | None = None) -> Dist:
    """Rank, world size and this rank's device; starts the process group under torchrun. `timeout_min`: how long
    a collective waits for the other ranks before it fails the job (train.dist_timeout_min; None: torch's
    default, 10 minutes for NCCL)."""
    want = resolve_device(device)
    world, started = world_size(), False
    if world > 1 and not dist.is_initialized():
        timeout = None if timeout_min is None else datetime.timedelta(minutes=timeout_min)
        dist.init_process_group(backend or ("nccl" if want.type == "cuda" else "gloo"), timeout=timeout)
        started = True
    rank = dist.get_rank() if world > 1 else 0
    note = restart_store_note()
    if note and rank == 0 and started:
        print(note, file=sys.stderr, flush=True)
    if want.type == "cuda":
        want = torch.device("cuda", int(os.environ["LOCAL_RANK"]) if world > 1 else (want.index or 0))
        torch.cuda.set_device(want)
    return Dist(rank, world, want, started)


def restart_store_note() -> str | None:
    """A warning when torchrun would restart a failed group on the rendezvous store it shares with the process
    group: the restarted ranks then read their peers' addresses from the failed attempt and cannot connect
    (seen with gloo on torch 2.14; pytorch issue 135712), so the restart that --max-restarts promises fails."""
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if not shared or int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0:
        return None
    return (
        "warning: torchrun shares its rendezvous store with the training processes, and a restart after a failure "
        "then cannot connect (pytorch issue 135712); set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 where torchrun starts "
        "(examples/slurm/minsnr.sbatch does)"
    )


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def wait_for_rank0(work: Callable[[], T], rank: int, world: int, tag: str) -> T | None:
    """Run `work` on rank 0 alone (its result there, None on the other ranks) while the other ranks wait for
    it as long as it takes.

    Left alone, the other ranks would wait in their next collective, which fails the whole job after the
    process group's timeout (train.dist_timeout_min): an evaluation longer than that killed the run. So they
    wait here instead, with no collective pending: rank 0 sets a key of the process group's own store when
    `work` ends (also when it raises), and the others look for the key, sleeping between looks (from 1 ms up
    to POLL_MAX_S). A sleep loop rather than the store's blocking `wait`, which has a timeout of its own and
    holds off Ctrl-C and SIGTERM; `monitored_barrier` times out too. If rank 0 dies, torchrun stops the
    others. `tag` names this wait and must be the same on every rank; the key also carries torchrun's restart
    count, so a restarted job never finds the key of an earlier attempt."""
    if world == 1:
        return work()
    store = dist.distributed_c10d._get_default_store()
    key = f"minsnr/rank0_done/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{tag}"
    if rank == 0:
        try:
            return work()
        finally:
            store.set(key, "1")
    pause = 0.001
    while not store.check([key]):
        time.sleep(pause)
        pause = min(2 * pause, POLL_MAX_S)
    return None


class StopVote:
    """Agree on stopping. A signal (Ctrl-C, SIGTERM, Slurm's time-limit notice SIGUSR1) reaches each rank at its
    own moment, yet every rank must stop after the same step, since saving a checkpoint is a collective. Each
    call all-reduces (MAX) this rank's signal number (0: none) without waiting and returns the value reduced by
    the previous call: every rank reads the same value at the same call, and the host waits only for a reduction
    that the previous step has finished, not for the step in flight. One process: the signal itself, at once."""

    def __init__(self, world: int, device: torch.device) -> None:
        self.world, self.device = world, device
        self.pending: tuple[Any, torch.Tensor] | None = None

    def __call__(self, signum: int) -> int:
        if self.world == 1:
            return signum
        decided = self.close()
        flag = torch.full((), signum, dtype=torch.long, device=self.device)
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True), flag)
        return decided

    def close(self) -> int:
        """Wait for the reduction in flight; its value (0 when none)."""
        if self.pending is None:
            return 0
        (work, flag), self.pending = self.pending, None
        work.wait()
        return int(flag.item())


def teardown() -> None:
    """End the process group if one is running (also after a failure on one rank).

    Whatever still holds the group is collected first: a finished Trainer sits in reference cycles (bound
    methods it hands to its parts) with its DDP wrapper, which keeps the group's C++ object alive past
    `destroy_process_group`. Left to the interpreter's exit, gloo's worker threads are torn down during
    finalization, and that aborted a finished rank now and then ('terminate called without an active
    exception', exit 134) under torchrun and ckpt-chaos --ranks 2."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()
