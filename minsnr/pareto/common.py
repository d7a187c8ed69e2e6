"""What `minsnr pareto` and `minsnr conflict` share: loading a checkpoint with its data, drawing images.

Data: by default the data section stored in the checkpoint's config (a quickstart checkpoint with
data.source=digits needs nothing more). `--data PATH` replaces data.path and positional `data.key=value`
overrides change any other data field, e.g. `data.source=npz data.conditional=false`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from minsnr.checkpoint import load_model
from minsnr.config import Config, ConfigError, apply_overrides
from minsnr.data import build_dataset, labels_for
from minsnr.data.base import ImageDataset
from minsnr.distributed import resolve_device
from minsnr.schedule import Schedule, schedule_of


@dataclass
class Loaded:
    model: nn.Module
    cfg: Config
    schedule: Schedule  # on the model's device
    dataset: ImageDataset
    device: torch.device


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=os.path.expanduser, help="a .pt checkpoint or exported .safetensors file")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="data.key=value",
        help="changes to the checkpoint's data config, e.g. data.source=npz",
    )
    parser.add_argument(
        "--data",
        type=os.path.expanduser,
        help="data path (sets data.path; the source comes from the checkpoint config)",
    )
    parser.add_argument("--split", default="train", choices=("train", "test"), help="dataset split (default train)")
    parser.add_argument(
        "--no-ema", action="store_true", help="use the raw weights instead of the EMA weights (.pt checkpoints only)"
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda if available")
    parser.add_argument("--seed", type=int, default=0, help="seed of images, timesteps and noise")
    parser.add_argument("--out", type=os.path.expanduser, help="output folder (default: next to the checkpoint)")


def with_data_overrides(cfg: Config, data_path: str | None, overrides: list[str]) -> Config:
    """The config with `data.*` overrides and `--data` applied, validated."""
    out = apply_overrides(cfg, list(overrides) + ([f"data.path={data_path}"] if data_path else []), only="data.")
    if data_path and out.data.source == "digits":
        raise ConfigError(
            "the checkpoint's data.source is digits, which takes no path; "
            "add data.source=npz, data.source=folder or data.source=latent"
        )
    return out


def load(args: argparse.Namespace) -> Loaded:
    device = resolve_device(args.device)
    model, cfg = load_model(args.checkpoint, ema=not args.no_ema, map_location=device)
    cfg = with_data_overrides(cfg, args.data, args.overrides)
    dataset = build_dataset(cfg.data, split=args.split)
    if tuple(dataset.shape) != (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size):
        raise ConfigError(
            f"data items have shape {tuple(dataset.shape)} but the model takes "
            f"{(cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)}"
        )
    schedule = schedule_of(cfg.schedule).to(device)
    return Loaded(model, cfg, schedule, dataset, device)


def draw(loaded: Loaded, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """n images drawn uniformly with replacement (un-augmented) and their labels, on the CPU."""
    idx = torch.randint(0, len(loaded.dataset), (n,), generator=generator).tolist()
    x, labels, _ = loaded.dataset.get_batch(idx)
    return x, labels_for(getattr(loaded.model, "num_classes", 0), loaded.dataset, labels)


def out_dir(args: argparse.Namespace, name: str) -> Path:
    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else ckpt.resolve().parent / f"{ckpt.stem}_{name}"
    out.mkdir(parents=True, exist_ok=True)
    return out
