"""What every dataset offers: metadata attributes, a batch fetch, and the unreadable-file rule.

A dataset is indexed by keys (see `transforms.Key`): a plain index gives the un-augmented item, an
(index, aug_seed) pair from the loader fixes the flip (and the latent posterior sample), so an item is
a pure function of (seed, epoch, index) and a resumed run is bit-exact.

Unreadable images: an image that cannot be decoded is replaced by the next readable index (index + 1,
+ 2, ... modulo the length, same aug_seed), so batches keep their size and stay deterministic. The
skipped file is reported in the batch; `Batches` warns, counts and enforces `max_bad_fraction`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch.utils.data import Dataset

from minsnr.data.transforms import Key

# x float32 [B, C, H, W], labels int64 [B], unreadable files met as (path, error).
Fetched = tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]


class DataSettings(Protocol):
    """What a data source reads of the config (minsnr.config.DataConfig has these fields)."""

    source: str
    path: str | None
    resolution: int | None
    crop: str
    hflip: bool
    conditional: bool
    max_bad_fraction: float


class BadImagesError(RuntimeError):
    """More unreadable images than data.max_bad_fraction allows."""


class UnreadableImage(Exception):
    """One image that Pillow cannot decode."""

    def __init__(self, path: str, error: str) -> None:
        super().__init__(f"{path}: {error}")
        self.path, self.error = path, error


class ImageDataset(Dataset):
    """Base class. Subclasses set the attributes and implement `get_batch`."""

    num_classes: int = 0  # 0 when unconditional (labels are then all 0)
    shape: tuple[int, int, int]  # (C, H, W) of one item
    class_names: list[str]
    max_bad_fraction: float = 0.01

    def __len__(self) -> int:
        raise NotImplementedError

    def get_batch(self, keys: Sequence[Key]) -> Fetched:
        """Items for `keys`, stacked; the loader's one call per batch."""
        raise NotImplementedError

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, _ = self.get_batch([key])
        return x[0], y[0]


def too_many_bad(bad: int, total: int, limit: float) -> bool:
    return bad > limit * total


def tolerated_fraction(bad: int, total: int) -> float:
    """The smallest limit in whole percent that `too_many_bad` lets `bad` of `total` pass."""
    limit = -(-100 * bad // max(total, 1)) / 100
    return limit if not too_many_bad(bad, total, limit) else round(limit + 0.01, 2)  # 0.29 * 100 < 29


def bad_images_message(
    bad: Sequence[str], total: int, limit: float, where: str, setting: str = "data.max_bad_fraction"
) -> str:
    """One line: how many, which (the first 5), and the two fixes; `setting` is the knob's name as the
    user gives it (a config key, or a flag such as --max-bad-fraction)."""
    shown = "; ".join(bad[:5]) + (f" ... ({len(bad) - 5} more)" if len(bad) > 5 else "")
    return (
        f"{where}: {len(bad)} unreadable images out of {total} ({100 * len(bad) / max(total, 1):.2f}%) "
        f"exceed {setting}={limit}: {shown}. Remove or repair these files, or accept this many "
        f"with {setting}={tolerated_fraction(len(bad), total):g}"
    )
