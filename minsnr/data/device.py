"""Array data resident on the training device: `DeviceBatches` yields the batches `Batches` yields.

For an `ArrayDataset` (digits, npz) the uint8 images and the labels are uploaded once. Each batch is
gathered, scaled to [-1, 1] and mirrored on the device by the host path's own ops (`arrays.to_batch`),
from this rank's keys of `Sharding.order` (their index and flip tensors are uploaded once per epoch). So
the batches are bit-identical to the host loader's for any number of ranks, the state_dict is the same
({"epoch", "batch"}: a run may switch paths and resume), and `next` never waits for the device.

Latent folders stay on the host loader: each item's posterior sample is drawn by a CPU generator seeded
by its aug_seed, which no device generator reproduces, and the large latent models are compute-bound
with the loader's workers keeping up.
"""

from __future__ import annotations

import os

import torch

from minsnr.data.arrays import ArrayDataset, to_batch
from minsnr.data.base import ImageDataset
from minsnr.data.loader import Batches, make_sharding

FIT_FRACTION = 0.25  # auto: keep the data on the GPU when it takes at most this share of this process's memory
PROCS_ENV = "MINSNR_PROCS_PER_GPU"  # processes sharing one GPU; `minsnr compare` sets it for its concurrent runs


class DeviceBatches:
    """Infinite iterator of (x [B, C, H, W] float32, labels [B] int64) on `device`; the interface of `Batches`."""

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        *,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        self.sharding = make_sharding(len(dataset), batch_size, seed, rank, world_size, drop_last)
        self.per_rank, self.batches_per_epoch = self.sharding.per_rank, self.sharding.batches
        self.device, self.levels = device, dataset.levels
        self.images = dataset.images.to(device)  # uint8 [N, H, W, C]
        self.labels = dataset.labels.to(device)
        self.hflip = dataset.hflip
        self.bad_files: dict[str, str] = {}  # arrays have no unreadable files; kept for the Batches interface
        self._epoch, self._batch = 0, 0
        self._order: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (epoch, index, flip) on device

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self._epoch

    def _upload(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._order is None or self._order[0] != epoch:
            index, aug = self.sharding.order(epoch)
            flip = (aug & 1).astype(bool) & self.hflip  # bit 0 of aug_seed, as `transforms.flips`
            pin = self.device.type == "cuda"
            host = [torch.from_numpy(a) for a in (index, flip)]
            host = [t.pin_memory() if pin else t for t in host]  # pinned: the copy does not wait for the device
            self._order = (epoch, *(t.to(self.device, non_blocking=pin) for t in host))
        return self._order[1], self._order[2]

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        index, flip = self._upload(self._epoch)
        lo = self._batch * self.sharding.batch_size
        idx, f = index[lo : lo + self.sharding.batch_size], flip[lo : lo + self.sharding.batch_size]
        x, y = to_batch(self.images[idx], f, self.levels), self.labels[idx]
        self._batch += 1
        if self._batch == self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        return x, y

    def state_dict(self) -> dict[str, int]:
        """Position of the next batch, as `Batches.state_dict`."""
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sharding.check_state(state)
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])

    def close(self) -> None:
        """Nothing to stop (no workers); for the `Batches` interface."""

    def __len__(self) -> int:
        return self.batches_per_epoch


def procs_per_gpu() -> tuple[int, str]:
    """(processes sharing this process's GPU, where that number comes from): MINSNR_PROCS_PER_GPU when set
    (`minsnr compare` sets it to its number of concurrent runs; set it yourself for runs started together by
    hand), else 1: torchrun gives each rank a GPU of its own (cuda:LOCAL_RANK)."""
    value = os.environ.get(PROCS_ENV, "").strip()
    if not value:
        return 1, "1 process"
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{PROCS_ENV}={value!r} must be a whole number >= 1 (processes sharing one GPU)")
    return int(value), f"{value} processes ({PROCS_ENV})"


def choose_path(
    setting: bool | None, dataset: ImageDataset, device: torch.device, total_bytes: int | None = None
) -> tuple[bool, str]:
    """(keep the data on `device`?, why) for train.data_on_device = `setting` (None: auto).

    Auto keeps array data on a CUDA device when it takes at most FIT_FRACTION of the device's total memory
    (`total_bytes`, read from the device when None) divided by the processes sharing it (`procs_per_gpu`).
    Not of its free memory: runs started together each see the memory free and together would run out.
    Explicit true/false is obeyed for array data."""
    if not isinstance(dataset, ArrayDataset):
        if setting:
            raise ValueError(
                f"train.data_on_device=true needs array data (data.source digits or npz); "
                f"{type(dataset).__name__} is read by the host loader: set train.data_on_device=null"
            )
        return False, f"{type(dataset).__name__} is read by the host loader"
    size = dataset.images.nbytes + dataset.labels.nbytes
    if setting is not None:
        return setting, f"train.data_on_device={str(setting).lower()}"
    if device.type != "cuda":
        return False, f"auto on {device.type}: the host loader"
    total = torch.cuda.get_device_properties(device).total_memory if total_bytes is None else total_bytes
    procs, who = procs_per_gpu()
    fits = size <= FIT_FRACTION * total / procs
    verdict = "fits in" if fits else "is over"
    return fits, f"{size / 2**20:.1f} MiB {verdict} {FIT_FRACTION:.0%} of {total / 2**30:.1f} GiB / {who}"


def make_batches(
    dataset: ImageDataset,
    batch_size: int,
    *,
    seed: int,
    rank: int,
    world_size: int,
    device: torch.device,
    num_workers: int,
    setting: bool | None,
) -> tuple[Batches | DeviceBatches, str]:
    """The training batch iterator (device-resident or host loader) and one log phrase saying which and why."""
    on_device, why = choose_path(setting, dataset, device)
    if on_device:
        assert isinstance(dataset, ArrayDataset)
        unused = f"; data.num_workers={num_workers} unused" if num_workers else ""
        return (
            DeviceBatches(dataset, batch_size, seed=seed, device=device, rank=rank, world_size=world_size),
            f"data on {device.type} ({why}{unused})",
        )
    return (
        Batches(
            dataset,
            batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
        ),
        f"data from the host loader ({why})",
    )
