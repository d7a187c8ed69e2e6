"""Datasets (embedded digits, .npz, image folders, SD-VAE latents) and the training batch iterator.

    dataset = build_dataset(cfg.data)                       # items: (x [C, H, W] in [-1, 1], label)
    batches = Batches(dataset, batch_size, seed=seed, rank=rank, world_size=world)
    x, labels = next(batches)                               # state_dict() goes into the checkpoint

A new data source is a builder `(cfg: DataConfig, split, image options) -> ImageDataset` added to SOURCES.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from minsnr.data.arrays import ArrayDataset, load_digits, load_npz
from minsnr.data.base import BadImagesError, ImageDataset
from minsnr.data.folder import FolderDataset
from minsnr.data.latent import LatentDataset
from minsnr.data.loader import Batches
from minsnr.data.transforms import CROPS
from minsnr.registry import lookup

if TYPE_CHECKING:
    from minsnr.config import DataConfig

SPLITS = ("train", "test")


def _digits(cfg: "DataConfig", split: str, images: dict[str, Any]) -> ImageDataset:
    return load_digits(split, **images)


def _npz(cfg: "DataConfig", split: str, images: dict[str, Any]) -> ImageDataset:
    return load_npz(_path(cfg), split, **images)


def _folder(cfg: "DataConfig", split: str, images: dict[str, Any]) -> ImageDataset:
    _train_only(cfg, split)
    return FolderDataset(_path(cfg), max_bad_fraction=cfg.max_bad_fraction, **images)


def _latent(cfg: "DataConfig", split: str, images: dict[str, Any]) -> ImageDataset:
    _train_only(cfg, split)
    dataset = LatentDataset(_path(cfg), hflip=cfg.hflip, conditional=cfg.conditional)
    sides = (None, dataset.meta["size"], dataset.shape[-1])
    if cfg.resolution not in sides or cfg.crop not in ("none", dataset.meta["crop"]):
        side = dataset.shape[-1]
        raise ValueError(f"{Path(_path(cfg))} holds {side}x{side} latents of "
                         f"{dataset.meta['size']}px images ({dataset.meta['crop']} crop); data.resolution="
                         f"{cfg.resolution}, data.crop={cfg.crop} do not match (set them to null/none)")
    return dataset


def _path(cfg: "DataConfig") -> str:
    if not cfg.path:
        raise ValueError(f"data.source={cfg.source} needs data.path")
    return cfg.path


def _train_only(cfg: "DataConfig", split: str) -> None:
    if split != "train":
        raise ValueError(f"data.source={cfg.source} has no {split} split; point data.path at the held-out data")


# name -> builder; `data.source` chooses one.
SOURCES: dict[str, Callable[["DataConfig", str, dict[str, Any]], ImageDataset]] = {
    "digits": _digits, "npz": _npz, "folder": _folder, "latent": _latent}


def labels_for(num_classes: int, dataset: ImageDataset, labels: torch.Tensor) -> torch.Tensor | None:
    """The labels a model with `num_classes` class rows takes for these images: None for an unconditional
    model (num_classes 0), the null label (index num_classes) when the data has no classes."""
    if num_classes == 0:
        return None
    return labels if dataset.num_classes > 0 else torch.full_like(labels, num_classes)


def build_dataset(cfg: "DataConfig", *, split: str = "train") -> ImageDataset:
    """The dataset `cfg` describes. Image folders and latent folders have only a train split."""
    build = lookup(SOURCES, cfg.source, "data.source")
    lookup(dict.fromkeys(SPLITS), split, "split")
    images = dict(hflip=cfg.hflip, conditional=cfg.conditional, crop=cfg.crop, resolution=cfg.resolution)
    dataset = build(cfg, split, images)
    dataset.max_bad_fraction = cfg.max_bad_fraction
    return dataset


__all__ = ["build_dataset", "Batches", "BadImagesError", "ImageDataset", "ArrayDataset", "FolderDataset",
           "LatentDataset", "load_digits", "load_npz", "CROPS", "SOURCES", "labels_for"]
