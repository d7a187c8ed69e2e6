"""Latent space through the Stable Diffusion VAE (section 4.1: 256x256x3 -> 32x32x4).

`minsnr encode` stores, for every image and its horizontal flip, the VAE posterior's mean and
standard deviation. A latent folder holds:

    moments.npy   [N, 2 (image, flip), 2 (mean, std), C, h, w], float16 or float32, memory-mapped
    labels.npy    [N] int64
    encode.json   the settings (a resumed run must match them)
    done/         one marker per finished chunk, listing the unreadable images met in it
    meta.json     written when every chunk is done: vae, scale_factor, count, shape, classes, ...

`LatentDataset` draws z = scale_factor * (mean + std * eps) from the image's or the flip's posterior at
every step, the flip bit and eps both fixed by the loader's aug_seed (a plain index gives the mean).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from minsnr.data.base import BadImagesError, Fetched, ImageDataset, bad_images_message, too_many_bad
from minsnr.data.loader import BatchFetch, keep_batch
from minsnr.data.transforms import CROPS, Key, empty_batch, flips, split_key
from minsnr.distributed import barrier, setup, teardown
from minsnr.extras import require
from minsnr.files import write_json

log = logging.getLogger(__name__)

MOMENTS, LABELS, SETTINGS, META, DONE = "moments.npy", "labels.npy", "encode.json", "meta.json", "done"
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"


def _diffusers() -> Any:
    return require("diffusers", "the SD-VAE of the latent path")


def load_vae(name_or_path: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """diffusers AutoencoderKL from a hub id or a local folder; bf16 on GPU, float32 on CPU; frozen."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = _diffusers().AutoencoderKL.from_pretrained(name_or_path, torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, z: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """Scaled latents [B, C, h, w] -> images float32 [B, 3, H, W] in [-1, 1], on z's device."""
    p = next(vae.parameters())
    x = vae.decode((z / scale_factor).to(p.device, p.dtype)).sample  # type: ignore[operator]
    return x.float().clamp(-1, 1).to(z.device)


def read_meta(root: str | Path) -> dict[str, Any]:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"latent folder {root} does not exist")
    if not (root / META).is_file():
        state = (
            "an unfinished encode (rerun minsnr encode with the same arguments)"
            if (root / SETTINGS).is_file()
            else "not a latent folder (make one with minsnr encode)"
        )
        raise FileNotFoundError(f"{root} has no {META}: {state}")
    try:
        return json.loads((root / META).read_text())
    except ValueError:  # not text, or not JSON
        raise ValueError(f"{root / META} is not JSON: a damaged latent folder (encode it again)") from None


def _load_npy(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    """An array of a latent folder; ValueError naming the file when it is not a complete .npy array."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except OSError:
        raise
    except Exception:  # text, a pickle, a truncated file: numpy's message would advise unsafe loading
        raise ValueError(f"{path} is not a complete .npy array: a damaged latent folder (encode it again)") from None


class LatentDataset(ImageDataset):
    """Scaled VAE latents sampled from the stored posteriors; see the module docstring."""

    def __init__(self, root: str | Path, *, hflip: bool = True, conditional: bool = True) -> None:
        self.root = Path(root)
        self.meta = read_meta(root)
        self.scale_factor = float(self.meta["scale_factor"])
        self.vae = str(self.meta["vae"])
        self.shape = tuple(self.meta["shape"])  # type: ignore[assignment]
        self.hflip = hflip
        use_labels = conditional and self.meta["num_classes"] > 0
        self.labels = (
            torch.from_numpy(_load_npy(self.root / LABELS))
            if use_labels
            else torch.zeros(self.meta["count"], dtype=torch.long)
        )
        self.num_classes = int(self.meta["num_classes"]) if use_labels else 0
        self.class_names = list(self.meta["class_names"]) if use_labels else []
        self._moments: np.ndarray | None = None
        if self.moments.shape != (self.meta["count"], 2, 2, *self.shape):
            raise ValueError(
                f"{self.root / MOMENTS} has shape {self.moments.shape}, {META} says "
                f"{[self.meta['count'], 2, 2, *self.shape]}"
            )

    @property
    def moments(self) -> np.ndarray:
        if self._moments is None:  # opened lazily in each worker process
            self._moments = _load_npy(self.root / MOMENTS, mmap_mode="r")
        return self._moments

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_moments": None}

    def __len__(self) -> int:
        return int(self.meta["count"])

    def get_batch(self, keys: Sequence[Key]) -> Fetched:
        index, aug = zip(*map(split_key, keys))
        idx = np.array(index, dtype=np.intp)
        m = torch.from_numpy(np.asarray(self.moments[idx, flips(aug, self.hflip).astype(np.intp)])).float()
        z = empty_batch(len(idx), *self.shape)
        g = torch.Generator()
        for i, a in enumerate(aug):  # one generator per item: the sample depends on its aug_seed only
            if a is None:
                z[i].zero_()
            else:
                g.manual_seed(a >> 1)
                torch.randn(self.shape, generator=g, out=z[i])
        z.mul_(m[:, 1]).add_(m[:, 0]).mul_(self.scale_factor)  # scale_factor * (mean + std * eps), in place
        return z, self.labels[torch.from_numpy(idx)], []


def _image_dataset(data: str, size: int, crop: str) -> ImageDataset:
    from minsnr.data.arrays import load_npz
    from minsnr.data.folder import FolderDataset

    if Path(data).is_dir():
        return FolderDataset(data, resolution=size, crop=crop, hflip=False)
    return load_npz(data, resolution=size, crop=crop, hflip=False)  # any other file: an .npz, or an error naming it


def _prepare(out: Path, settings: dict[str, Any], labels: np.ndarray) -> None:
    """Create the folder (rank 0) or check that an existing one was started with the same settings."""
    if (out / SETTINGS).is_file():
        old = json.loads((out / SETTINGS).read_text())
        diff = [k for k in settings if k != "data" and old.get(k) != settings[k]]
        if diff:
            was = ", ".join(f"{k}={old.get(k)!r}" for k in diff)
            raise ValueError(
                f"{out} was encoded with other settings ({was}); use a new --out folder or the same arguments"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / DONE).mkdir(exist_ok=True)
    shape = (settings["count"], 2, 2, *settings["shape"])
    np.lib.format.open_memmap(out / MOMENTS, mode="w+", dtype=settings["dtype"], shape=shape).flush()
    np.save(out / LABELS, labels.astype(np.int64))
    write_json(out / SETTINGS, settings, indent=1)  # last: its presence means the folder is ready


def encode(
    data: str,
    out: str | Path,
    vae_name: str = DEFAULT_VAE,
    size: int = 256,
    *,
    batch: int = 32,
    chunk: int = 1024,
    device: str = "auto",
    crop: str = "adm",
    dtype: str = "float16",
    num_workers: int = 0,
    max_chunks: int | None = None,
    max_bad_fraction: float = 0.01,
) -> bool:
    """Encode every image of `data` (folder or .npz) and its flip; True once the folder is complete.

    Chunks of `chunk` images go to ranks round-robin; finished chunks are skipped on a rerun.
    `max_chunks` stops after that many chunks on this rank (to encode in time-limited jobs).
    """
    out = Path(out)
    d = setup(device, backend="gloo")  # gloo: only barriers; the VAE runs on each rank's own device
    rank, world = d.rank, d.world
    dataset = _image_dataset(data, size, crop)
    vae = load_vae(vae_name, d.device)
    cfg = vae.config  # type: ignore[attr-defined]
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    n = len(dataset)
    settings = {
        "data": str(data),
        "vae": vae_name,
        "size": size,
        "crop": crop,
        "count": n,
        "chunk": chunk,
        "dtype": dtype,
        "shape": [cfg.latent_channels, size // factor, size // factor],
        "scale_factor": float(getattr(cfg, "scaling_factor", 0.18215) or 0.18215),
        "num_classes": dataset.num_classes,
        "class_names": dataset.class_names,
    }
    if rank == 0:
        _prepare(out, settings, np.asarray(dataset.labels))
    barrier(world)
    if rank != 0:
        _prepare(out, settings, np.asarray(dataset.labels))  # checks only
    moments = np.load(out / MOMENTS, mmap_mode="r+")
    todo = [k for k in range(rank, math.ceil(n / chunk), world) if not (out / DONE / f"{k:06d}.json").exists()]
    todo = todo[:max_chunks] if max_chunks is not None else todo
    jobs = [
        (k, lo, list(range(lo, min(lo + batch, (k + 1) * chunk, n))))
        for k in todo
        for lo in range(k * chunk, min((k + 1) * chunk, n), batch)
    ]
    loader = DataLoader(
        BatchFetch(dataset), batch_size=None, sampler=jobs, num_workers=num_workers, collate_fn=keep_batch
    )
    chunk_bad: list[list[str]] = []
    with tqdm(
        total=sum(len(keys) for *_, keys in jobs), unit="img", desc=f"encode rank {rank}/{world}", disable=rank != 0
    ) as bar:
        for k, lo, x, _, bad in loader:
            hi = lo + len(x)
            chunk_bad += [[path, err] for path, err in bad]
            param = next(vae.parameters())
            with torch.no_grad():
                both = torch.cat([x, x.flip(-1)]).to(param.device, param.dtype)
                post = vae.encode(both).latent_dist  # type: ignore[operator]
            mean, std = post.mean.float().cpu().numpy(), post.std.float().cpu().numpy()
            b = hi - lo
            moments[lo:hi] = np.stack([np.stack([mean[:b], std[:b]], 1), np.stack([mean[b:], std[b:]], 1)], 1)
            bar.update(b)
            if hi == min((k + 1) * chunk, n):  # chunk finished: flush, then mark it done
                moments.flush()
                write_json(out / DONE / f"{k:06d}.json", {"bad": chunk_bad}, indent=1)
                chunk_bad = []
    del moments
    barrier(world)
    done = [out / DONE / f"{k:06d}.json" for k in range(math.ceil(n / chunk))]
    complete = all(p.exists() for p in done)
    if complete and rank == 0:
        bad = [b for p in done for b in json.loads(p.read_text())["bad"]]
        for path, err in bad:
            log.warning("unreadable image %s (%s) was replaced by its next readable neighbour", path, err)
        if too_many_bad(len(bad), n, max_bad_fraction):
            raise BadImagesError(
                bad_images_message([b[0] for b in bad], n, max_bad_fraction, str(data), "--max-bad-fraction")
            )
        write_json(
            out / META,
            {**settings, "bad_files": bad, "layout": "moments [N, 2 (image, flip), 2 (mean, std), C, h, w]"},
            indent=1,
        )
    if d.started:
        teardown()
    return complete


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="minsnr encode",
        description="Encode an image folder (or .npz) into "
        "SD-VAE posterior moments for latent diffusion training (data.source=latent).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    path = os.path.expanduser
    p.add_argument("--data", required=True, type=path, help="image folder (ImageNet layout or flat) or .npz file")
    p.add_argument("--out", required=True, type=path, help="latent folder to write (resumable)")
    p.add_argument("--vae", default=DEFAULT_VAE, type=path, help="diffusers AutoencoderKL hub id or local folder")
    p.add_argument("--size", type=int, default=256, help="image side length fed to the VAE")
    p.add_argument("--crop", default="adm", choices=CROPS, help="preprocessing recipe (default: ADM center crop)")
    p.add_argument("--batch", type=int, default=32, help="images per VAE call (each also encoded flipped)")
    p.add_argument("--chunk", type=int, default=1024, help="images per resumable chunk")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="storage type of the moments")
    p.add_argument("--workers", type=int, default=4, help="image decoding worker processes")
    p.add_argument(
        "--max-chunks", type=int, default=None, help="stop after this many chunks, None: no limit (rerun to continue)"
    )
    p.add_argument("--max-bad-fraction", type=float, default=0.01, help="fail if more images than this are unreadable")
    a = p.parse_args(argv)
    if min(a.batch, a.chunk, a.size) <= 0:
        p.error("--batch, --chunk and --size must be positive")
    if not Path(a.data).exists():
        p.error(f"--data {a.data} not found; give an image folder or an .npz file")
    try:
        complete = encode(
            a.data,
            a.out,
            a.vae,
            a.size,
            batch=a.batch,
            chunk=a.chunk,
            device=a.device,
            crop=a.crop,
            dtype=a.dtype,
            num_workers=a.workers,
            max_chunks=a.max_chunks,
            max_bad_fraction=a.max_bad_fraction,
        )
    except (OSError, ValueError, KeyError, ImportError, BadImagesError) as err:
        print(f"minsnr encode: error: {err}", file=sys.stderr)
        return 1
    print(f"{a.out}: {'complete' if complete else 'partial; rerun the same command to continue'}")
    return 0
