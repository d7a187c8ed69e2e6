"""`Batches`: the training loop's infinite, deterministic, sharded, resumable batch iterator.

Epoch e's order is a permutation drawn from (seed, e), with one aug_seed per image (flip bit, latent
posterior sample), so every item is a function of (seed, epoch, index) alone. Like DistributedSampler,
each rank takes every world_size-th position of that order, after cutting it to a multiple of
world_size (drop_last) or padding it by wrapping around; ranks thus get equal, disjoint shares.
`state_dict()` counts the batches the caller has received (not what workers prefetched).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from minsnr.data.base import BadImagesError, ImageDataset, bad_images_message, too_many_bad
from minsnr.data.transforms import Key

log = logging.getLogger(__name__)

# One work item: (tag, tag, keys), e.g. (epoch, batch index, keys); answered by (tag, tag, x, labels, bad files).
Job = tuple[int, int, list[Key]]


def keep_batch(x: Any) -> Any:
    return x


class BatchFetch(Dataset):
    """Turns a job into a whole batch inside a worker: one `get_batch` call, no per-item collation."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __getitem__(self, job: Job) -> tuple[int, int, torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
        a, b, keys = job
        x, y, bad = self.dataset.get_batch(keys)
        return a, b, x, y, bad


def epoch_order(n: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(permutation of range(n), aug_seed per image index) for one epoch."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(n), rng.integers(0, 2**62, size=n, dtype=np.int64)


@dataclass(frozen=True)
class Sharding:
    """Which keys each batch of a rank holds; the job generator refers to this, not to `Batches`."""

    n: int
    seed: int
    rank: int
    world_size: int
    batch_size: int
    drop_last: bool

    @property
    def per_rank(self) -> int:
        return self.n // self.world_size if self.drop_last else math.ceil(self.n / self.world_size)

    @property
    def batches(self) -> int:
        """Batches per epoch on each rank."""
        return self.per_rank // self.batch_size if self.drop_last else math.ceil(self.per_rank / self.batch_size)

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (image indices, aug_seeds) for `epoch`, in order: int64 arrays of length per_rank."""
        perm, aug = epoch_order(self.n, self.seed, epoch)
        order = np.resize(perm, self.per_rank * self.world_size)  # cut (drop_last) or wrap around (pad)
        mine = order[self.rank :: self.world_size]
        return mine, aug[mine]

    def keys(self, epoch: int) -> list[Key]:
        """This rank's keys for `epoch`, in order."""
        index, aug = self.order(epoch)
        return list(zip(index.tolist(), aug.tolist()))

    def check_state(self, state: dict[str, int]) -> None:
        if not 0 <= state["batch"] < self.batches:
            raise ValueError(
                f"data state batch={state['batch']} is outside this epoch's {self.batches} "
                "batches; was batch_size or the number of ranks changed?"
            )

    def jobs(self, epoch: int, batch: int) -> Iterator[Job]:
        """Batches from (epoch, batch) on, forever."""
        while True:
            keys = self.keys(epoch)
            for b in range(batch, self.batches):
                yield epoch, b, keys[b * self.batch_size : (b + 1) * self.batch_size]
            epoch, batch = epoch + 1, 0


def make_sharding(n: int, batch_size: int, seed: int, rank: int, world_size: int, drop_last: bool) -> Sharding:
    """A checked `Sharding`: a valid rank and at least one full batch per epoch on each rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if batch_size <= 0 or seed < 0:
        raise ValueError(f"need batch_size > 0, seed >= 0; got {batch_size}, {seed}")
    sharding = Sharding(n, seed, rank, world_size, batch_size, drop_last)
    if sharding.batches == 0:
        raise ValueError(
            f"{n} items over {world_size} rank(s) give no full batch of {batch_size}; "
            "lower train.batch_size or use more data"
        )
    return sharding


class Batches:
    """Infinite iterator of (x [B, C, H, W], labels [B]) over epochs; see the module docstring."""

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        drop_last: bool = True,
        pin_memory: bool = False,
        max_bad_fraction: float | None = None,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"need num_workers >= 0; got {num_workers}")
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory
        self.sharding = make_sharding(len(dataset), batch_size, seed, rank, world_size, drop_last)
        self.max_bad_fraction = dataset.max_bad_fraction if max_bad_fraction is None else max_bad_fraction
        self.per_rank, self.batches_per_epoch = self.sharding.per_rank, self.sharding.batches
        self._epoch, self._batch = 0, 0
        self._it: Iterator[Any] | None = None
        self.bad_files: dict[str, str] = {}  # every unreadable file this rank met: path -> error
        self.epoch_bad: set[str] = set()  # those met in the current epoch

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self._epoch

    def _start(self) -> Iterator[Any]:
        jobs = self.sharding.jobs(self._epoch, self._batch)
        loader = DataLoader(
            BatchFetch(self.dataset),
            batch_size=None,
            sampler=jobs,
            num_workers=self.num_workers,
            collate_fn=keep_batch,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.sharding.seed),
        )  # not the global RNG
        return iter(loader)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = self._start()
        epoch, batch, x, y, bad = next(self._it)
        self._record(bad)
        if batch + 1 < self.batches_per_epoch:
            self._epoch, self._batch = epoch, batch + 1
        else:
            self._end_epoch(epoch)
            self._epoch, self._batch = epoch + 1, 0
        return x, y

    def _record(self, bad: list[tuple[str, str]]) -> None:
        for path, err in bad:
            if path not in self.bad_files:
                log.warning("skipping unreadable image %s (%s)", path, err)
                self.bad_files[path] = err
            self.epoch_bad.add(path)
        if bad and too_many_bad(len(self.epoch_bad), self.per_rank, self.max_bad_fraction):
            self.close()
            raise BadImagesError(
                bad_images_message(
                    sorted(self.epoch_bad),
                    self.per_rank,
                    self.max_bad_fraction,
                    f"epoch {self._epoch}, rank {self.sharding.rank}",
                )
            )

    def _end_epoch(self, epoch: int) -> None:
        if self.epoch_bad:
            log.warning(
                "epoch %d: skipped %d unreadable images of %d on rank %d (limit %.2f%%)",
                epoch,
                len(self.epoch_bad),
                self.per_rank,
                self.sharding.rank,
                100 * self.max_bad_fraction,
            )
        self.epoch_bad = set()

    def state_dict(self) -> dict[str, int]:
        """Position of the next batch: {"epoch", "batch"}; store it in the checkpoint."""
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sharding.check_state(state)
        self.close()
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])
        self.epoch_bad = set()

    def close(self) -> None:
        """Stop the workers (a later `next` starts them again from the current position)."""
        self._it = None

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.batches_per_epoch
