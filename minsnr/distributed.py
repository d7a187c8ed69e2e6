"""Devices and process groups for every verb (train, encode, sample, pareto, fid, losses, classifier).

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK. With WORLD_SIZE > 1, `setup` starts the process group
(NCCL on GPUs, gloo on the CPU, or the backend asked for) and gives each rank the GPU of its LOCAL_RANK;
with one process it starts nothing. `teardown` ends what `setup` started.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# The backends a device offers, as config choices (train.compile_mode, train.attention); minsnr.step uses them.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPHING_MODES = ("reduce-overhead", "max-autotune")  # inductor captures its own CUDA graphs of the model
ATTENTION = ("auto", "flash", "efficient", "cudnn", "math")  # scaled_dot_product_attention backends; auto = torch's
CPU_ATTENTION = ("auto", "flash", "math")


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


def setup(device: str = "auto", backend: str | None = None) -> Dist:
    """Rank, world size and this rank's device; starts the process group under torchrun."""
    want = resolve_device(device)
    world, started = world_size(), False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if want.type == "cuda" else "gloo"))
        started = True
    rank = dist.get_rank() if world > 1 else 0
    if want.type == "cuda":
        want = torch.device("cuda", int(os.environ["LOCAL_RANK"]) if world > 1 else (want.index or 0))
        torch.cuda.set_device(want)
    return Dist(rank, world, want, started)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def teardown() -> None:
    """End the process group if one is running (also after a failure on one rank)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
