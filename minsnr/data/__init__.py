"""Datasets (embedded digits, .npz, image folders, SD-VAE latents) and the training batch iterator.

    dataset = build_dataset(cfg.data)                       # items: (x [C, H, W] in [-1, 1], label)
    batches = Batches(dataset, batch_size, seed=seed, rank=rank, world_size=world)
    x, labels = next(batches)                               # state_dict() goes into the checkpoint
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from minsnr.data.arrays import ArrayDataset, load_digits, load_npz
from minsnr.data.base import BadImagesError, ImageDataset
from minsnr.data.folder import FolderDataset
from minsnr.data.latent import LatentDataset
from minsnr.data.loader import Batches
from minsnr.data.transforms import CROPS

if TYPE_CHECKING:
    from minsnr.config import DataConfig

SOURCES = ("digits", "npz", "folder", "latent")
SPLITS = ("train", "test")


def build_dataset(cfg: "DataConfig", *, split: str = "train") -> ImageDataset:
    """The dataset `cfg` describes. Image folders and latent folders have only a train split."""
    if cfg.source not in SOURCES:
        raise ValueError(f"data.source={cfg.source!r} is not valid; choose one of: {', '.join(SOURCES)}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; choose one of: {', '.join(SPLITS)}")
    if cfg.source != "digits" and not cfg.path:
        raise ValueError(f"data.source={cfg.source} needs data.path")
    if cfg.source in ("folder", "latent") and split != "train":
        raise ValueError(f"data.source={cfg.source} has no {split} split; point data.path at the held-out data")
    images = dict(hflip=cfg.hflip, conditional=cfg.conditional, crop=cfg.crop, resolution=cfg.resolution)
    dataset: ImageDataset
    if cfg.source == "digits":
        dataset = load_digits(split, **images)
    elif cfg.source == "npz":
        dataset = load_npz(cfg.path, split, **images)  # type: ignore[arg-type]
    elif cfg.source == "folder":
        dataset = FolderDataset(cfg.path, max_bad_fraction=cfg.max_bad_fraction, **images)  # type: ignore[arg-type]
    else:
        dataset = LatentDataset(cfg.path, hflip=cfg.hflip, conditional=cfg.conditional)  # type: ignore[arg-type]
        sides = (None, dataset.meta["size"], dataset.shape[-1])
        if cfg.resolution not in sides or cfg.crop not in ("none", dataset.meta["crop"]):
            side = dataset.shape[-1]
            raise ValueError(f"{Path(cfg.path)} holds {side}x{side} latents of "  # type: ignore[arg-type]
                             f"{dataset.meta['size']}px images ({dataset.meta['crop']} crop); data.resolution="
                             f"{cfg.resolution}, data.crop={cfg.crop} do not match (set them to null/none)")
    dataset.max_bad_fraction = cfg.max_bad_fraction
    return dataset


__all__ = ["build_dataset", "Batches", "BadImagesError", "ImageDataset", "ArrayDataset", "FolderDataset",
           "LatentDataset", "load_digits", "load_npz", "CROPS", "SOURCES"]
