"""Datasets (embedded digits, .npz, image folders, SD-VAE latents) and the training batch iterator.

    dataset = build_dataset(cfg.data)                       # items: (x [C, H, W] in [-1, 1], label)
    batches = Batches(dataset, batch_size, seed=seed, rank=rank, world_size=world)
    x, labels = next(batches)                               # state_dict() goes into the checkpoint

A new data source is a builder `(cfg: DataSettings, split, image options) -> ImageDataset` added to SOURCES
(DataSettings: the fields of minsnr.config.DataConfig a source reads; data does not import config).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from minsnr.data.arrays import ArrayDataset, load_digits, load_npz
from minsnr.data.base import BadImagesError, DataSettings, ImageDataset
from minsnr.data.folder import FolderDataset
from minsnr.data.latent import LatentDataset
from minsnr.data.loader import Batches
from minsnr.data.transforms import CROPS
from minsnr.registry import lookup

SPLITS = ("train", "test")


def _digits(cfg: DataSettings, split: str, images: dict[str, Any]) -> ImageDataset:
    return load_digits(split, **images)


def _npz(cfg: DataSettings, split: str, images: dict[str, Any]) -> ImageDataset:
    return load_npz(_path(cfg), split, **images)


def _folder(cfg: DataSettings, split: str, images: dict[str, Any]) -> ImageDataset:
    _train_only(cfg, split)
    return FolderDataset(_path(cfg), max_bad_fraction=cfg.max_bad_fraction, **images)


def _latent(cfg: DataSettings, split: str, images: dict[str, Any]) -> ImageDataset:
    _train_only(cfg, split)
    dataset = LatentDataset(_path(cfg), hflip=cfg.hflip, conditional=cfg.conditional)
    sides = (None, dataset.meta["size"], dataset.shape[-1])
    if cfg.resolution not in sides or cfg.crop not in ("none", dataset.meta["crop"]):
        side = dataset.shape[-1]
        raise ValueError(
            f"{Path(_path(cfg))} holds {side}x{side} latents of "
            f"{dataset.meta['size']}px images ({dataset.meta['crop']} crop); data.resolution="
            f"{cfg.resolution}, data.crop={cfg.crop} do not match (set them to null/none)"
        )
    return dataset


def _path(cfg: DataSettings) -> str:
    if not cfg.path:
        raise ValueError(f"data.source={cfg.source} needs data.path")
    return cfg.path


def _train_only(cfg: DataSettings, split: str) -> None:
    if split != "train":
        raise ValueError(f"data.source={cfg.source} has no {split} split; point data.path at the held-out data")


# name -> builder; `data.source` chooses one.
SOURCES: dict[str, Callable[[DataSettings, str, dict[str, Any]], ImageDataset]] = {
    "digits": _digits,
    "npz": _npz,
    "folder": _folder,
    "latent": _latent,
}


def source_of(path: str, what: str = "data") -> str:
    """The data source a path names: digits (the word itself), npz (an .npz file) or folder (a directory);
    FileNotFoundError naming `what` otherwise."""
    if path == "digits":
        return "digits"
    p = Path(path)
    if p.is_dir():
        return "folder"
    if p.suffix == ".npz" and p.is_file():
        return "npz"
    why = "not found" if not p.exists() else "is neither an .npz file nor a folder"
    raise FileNotFoundError(f"{what} {path} {why}; give digits, an .npz file or an image folder")


def labels_for(num_classes: int, dataset: ImageDataset, labels: torch.Tensor) -> torch.Tensor | None:
    """The labels a model with `num_classes` class rows takes for these images: None for an unconditional
    model (num_classes 0), the null label (index num_classes) when the data has no classes."""
    if num_classes == 0:
        return None
    return labels if dataset.num_classes > 0 else torch.full_like(labels, num_classes)


def build_dataset(cfg: DataSettings, *, split: str = "train") -> ImageDataset:
    """The dataset `cfg` describes. Image folders and latent folders have only a train split."""
    build = lookup(SOURCES, cfg.source, "data.source")
    lookup(dict.fromkeys(SPLITS), split, "split")
    images = dict(hflip=cfg.hflip, conditional=cfg.conditional, crop=cfg.crop, resolution=cfg.resolution)
    dataset = build(cfg, split, images)
    dataset.max_bad_fraction = cfg.max_bad_fraction
    return dataset


__all__ = [
    "build_dataset",
    "Batches",
    "BadImagesError",
    "ImageDataset",
    "ArrayDataset",
    "FolderDataset",
    "LatentDataset",
    "load_digits",
    "load_npz",
    "CROPS",
    "SOURCES",
    "labels_for",
    "source_of",
]
