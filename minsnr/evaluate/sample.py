"""`minsnr sample CHECKPOINT --num 50000 --out samples.npz`: class-balanced samples for FID (section 4.1,
appendix C.3: EMA model, EDM Heun sampler, classifier-free guidance).

Output: ADM's format, `arr_0` uint8 [N, H, W, C] and, for class-conditional models, `arr_1` int64 labels
(unconditional models: no `arr_1`). Labels are balanced (class counts differ by at most one), shuffled
by --seed, and cover the classes of the training data (the checkpoint's class_names; an old checkpoint
may have more class rows than its data had classes). --grid lays samples out one row per class.

Image j starts from noise seeded by (seed, j), so --batch, the number of ranks and resuming never change
which images are drawn. Work is split into chunks of --batch images written to OUT.chunks/; a rerun after
an interruption skips the finished chunks and gives exactly the output of an uninterrupted run. Under torchrun, rank r draws chunks r, r + world, ...; rank 0 assembles
OUT and removes the chunk folder. Latent models (data.source=latent) are decoded through the VAE named
in the latent folder's meta.json (--latents DIR if the training path is not on this machine).

    torchrun --nproc_per_node 8 -m minsnr sample ckpt.pt --num-images 50000 --cfg-scale 1.5 --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from minsnr.config import Config
from minsnr.distributed import barrier, teardown
from minsnr.evaluate.images import ImageSet, to_uint8, write_npz
from minsnr.evaluate.util import HelpFormatter, check_ema_choice, progress, run_verb
from minsnr.sampling import SAMPLERS, SPACINGS, generate
from minsnr.schedule import schedule_of
from minsnr.seeds import derive_seed

Decode = Callable[[torch.Tensor], torch.Tensor]


def balanced_labels(num: int, num_classes: int, seed: int) -> np.ndarray:
    """num labels, each class num // K or num // K + 1 times, in a seeded random order."""
    return np.random.default_rng(seed).permutation(np.arange(num) % num_classes).astype(np.int64)


def image_noise(seed: int, first: int, num: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The starting noise of images first .. first + num - 1, float32 [num, *shape] on the CPU: image j's from
    torch.Generator(derive_seed(seed, j)), so batching, ranks and resuming never change which image is drawn."""
    return torch.stack(
        [
            torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(seed, j)))
            for j in range(first, first + num)
        ]
    )


def trained_class_names(checkpoint: str | Path) -> list[str]:
    """The training data's class names stored with the weights ([] when the file does not say)."""
    p = Path(checkpoint)
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            return list(json.loads((f.metadata() or {}).get("class_names", "[]")))
    from minsnr.checkpoint import load_checkpoint

    return list(load_checkpoint(p, mmap=True).get("class_names", []))  # mapped: the weights are not read


def sampled_classes(checkpoint: str | Path, num_classes: int, say: bool = True) -> int:
    """How many classes to draw labels from: the model's, or only the first K that the data had when the
    model has more class rows than its data had classes (those rows were never trained); says so."""
    names = trained_class_names(checkpoint)
    if 0 < len(names) < num_classes and say:
        shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
        print(
            f"note: {checkpoint} has {num_classes} class rows but was trained on {len(names)} classes "
            f"({shown}); drawing labels 0..{len(names) - 1} only",
            file=sys.stderr,
        )
    return len(names) if 0 < len(names) < num_classes else num_classes


def latent_decoder(cfg: Config, device: torch.device, latents: str | None = None) -> Decode | None:
    """None for pixel models; else scaled latents -> images in [-1, 1] through the run's VAE."""
    if cfg.data.source != "latent":
        return None
    from minsnr.data.latent import decode_latents, load_vae, read_meta

    root = latents or cfg.data.path
    if not root:
        raise FileNotFoundError("latent model without a latent folder: pass --latents DIR (with meta.json)")
    meta = read_meta(root)
    vae = load_vae(meta["vae"], device)
    return lambda z: torch.cat([decode_latents(vae, part, meta["scale_factor"]) for part in z.split(32)])


def sample_images(
    model: nn.Module,
    cfg: Config,
    labels: np.ndarray | None,
    num: int,
    seed: int,
    *,
    device: torch.device,
    decode: Decode | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    first: int = 0,
    spacing: str | None = None,
) -> np.ndarray:
    """`num` uint8 [N, H, W, C] images from `model`: images first .. first + num - 1 of the sequence that
    `seed` defines (`image_noise`); sampler settings default to cfg.sample."""
    m, s = cfg.model, cfg.sample
    shape = (m.in_channels, m.input_size, m.input_size)
    y = None if labels is None else torch.as_tensor(labels, device=device)
    x = generate(
        model,
        schedule_of(cfg.schedule),
        cfg.loss.target,
        y,
        shape=(num, *shape),
        sampler=sampler or s.sampler,
        steps=steps or s.steps,
        cfg_scale=s.cfg_scale if cfg_scale is None else cfg_scale,
        num_classes=m.num_classes,
        sigma_max=s.sigma_max,
        spacing=spacing or s.spacing,
        device=device,
        noise=image_noise(seed, first, num, shape),
    )
    return to_uint8(decode(x) if decode is not None else x)


def _chunks(folder: Path, n: int) -> Iterator[np.ndarray]:
    for i in range(n):
        with np.load(folder / f"{i:06d}.npz") as z:
            yield z["images"]


def run(args: argparse.Namespace) -> Path | None:
    """Draw the missing chunks of this rank, then (rank 0) assemble; None when stopped by --max-chunks."""
    from minsnr.checkpoint import load_model
    from minsnr.distributed import setup

    check_ema_choice(args.checkpoint, args.ema)
    d = setup(args.device)
    rank, world, device = d.rank, d.world, d.device
    model, cfg = load_model(args.checkpoint, ema=args.ema, map_location=device)
    classes = sampled_classes(args.checkpoint, cfg.model.num_classes, say=rank == 0)
    out = Path(args.out)
    folder = out.with_name(out.name + ".chunks")
    settings = {
        k: str(v)
        for k, v in vars(args).items()
        if k in ("checkpoint", "num", "sampler", "steps", "cfg_scale", "ema", "seed", "batch", "spacing")
    }
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        stored = folder / "settings.json"
        if stored.is_file() and json.loads(stored.read_text()) != settings:
            raise ValueError(
                f"{folder} holds chunks drawn with other settings ({stored.read_text().strip()}); "
                f"use the same arguments to resume, or delete {folder}"
            )
        stored.write_text(json.dumps(settings))
    barrier(world)
    labels = balanced_labels(args.num, classes, args.seed) if classes > 0 else None
    decode = latent_decoder(cfg, device, args.latents)
    num_chunks = -(-args.num // args.batch)
    todo = [i for i in range(rank, num_chunks, world) if not (folder / f"{i:06d}.npz").is_file()]
    todo = todo[: args.max_chunks] if args.max_chunks else todo
    for i in tqdm(todo, disable=rank != 0, desc=f"sampling {args.num} images", unit="chunk"):
        lo, hi = i * args.batch, min(args.num, (i + 1) * args.batch)
        y = None if labels is None else labels[lo:hi]
        images = sample_images(
            model,
            cfg,
            y,
            hi - lo,
            args.seed,
            device=device,
            decode=decode,
            sampler=args.sampler,
            steps=args.steps,
            cfg_scale=args.cfg_scale,
            first=lo,
            spacing=args.spacing,
        )
        tmp = folder / f"{i:06d}.tmp.npz"
        np.savez(tmp, images=images)
        tmp.replace(folder / f"{i:06d}.npz")
    barrier(world)
    missing = [i for i in range(num_chunks) if not (folder / f"{i:06d}.npz").is_file()]
    if rank != 0 or missing:
        return None
    write_npz(out, _chunks(folder, num_chunks), args.num, labels)
    if args.png_dir or args.grid:
        _pictures(out, labels, args.png_dir, args.grid)
    shutil.rmtree(folder)
    return out


def class_rows(images: ImageSet, labels: np.ndarray, classes: int = 10, per_class: int = 10) -> tuple[np.ndarray, int]:
    """(uint8 [rows * cols, H, W, C], cols): the first `per_class` images (fewer if a class has fewer) of
    each of the first `classes` labels present, class by class: one row per class, as the training previews."""
    present = np.unique(labels)[:classes]
    cols = min(per_class, min(int(np.count_nonzero(labels == c)) for c in present))
    picks = np.concatenate([np.flatnonzero(labels == c)[:cols] for c in present]).tolist()
    found: dict[int, np.ndarray] = {}
    start = 0
    for batch in images.batches(1000):  # keep only the picked images; stop after the last one
        found.update((i, batch[i - start]) for i in picks if start <= i < start + len(batch))
        start += len(batch)
        if start > max(picks):
            break
    return np.stack([found[i] for i in picks]), cols


def _pictures(out: Path, labels: np.ndarray | None, png_dir: str | None, grid: str | None) -> None:
    from PIL import Image

    from minsnr.evaluate.grid import save_grid
    from minsnr.evaluate.images import open_images

    images = open_images(out)
    if grid:
        picked, cols = (next(images.batches(100)), None) if labels is None else class_rows(images, labels)
        save_grid(picked, grid, nrow=cols, min_width=320)
    if png_dir:
        Path(png_dir).mkdir(parents=True, exist_ok=True)
        i = 0
        for batch in progress(images.batches(1000), images.count, "writing PNGs"):
            for img in batch:
                name = f"{i:06d}" + ("" if labels is None else f"_{labels[i]}")
                Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(Path(png_dir) / f"{name}.png")
                i += 1


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="minsnr sample", description=__doc__, formatter_class=HelpFormatter)
    path = os.path.expanduser
    p.add_argument("checkpoint", type=path, help="a .pt checkpoint or an exported ema.safetensors")
    p.add_argument(
        "--num",
        "--num-images",
        dest="num",
        type=int,
        default=50_000,
        help="number of images (under torchrun write --num-images: torchrun takes --num for --numa-binding)",
    )
    p.add_argument("--sampler", choices=list(SAMPLERS), default=None, help="default: the run's")
    p.add_argument("--steps", type=int, default=None, help="default: the run's sample.steps")
    p.add_argument(
        "--spacing",
        choices=list(SPACINGS),
        default=None,
        help="karras (EDM) or trailing (Lin et al.); default: the run's",
    )
    p.add_argument("--cfg-scale", type=float, default=None, help="default: the run's sample.cfg_scale")
    p.add_argument("--out", default="samples.npz", type=path, help="output npz (arr_0 images, arr_1 labels)")
    p.add_argument("--png-dir", default=None, type=path, help="also write every image as PNG (name: index_label)")
    p.add_argument(
        "--grid",
        default=None,
        type=path,
        help="also write a picture of the first 10 images of the first 10 classes, one row per class "
        "(unconditional: the first 100 images)",
    )
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="EMA weights; --no-ema: the raw training weights (.pt checkpoints only)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the labels and the noise")
    p.add_argument("--batch", type=int, default=250, help="images per forward batch and per chunk file")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument(
        "--latents", default=None, type=path, help="latent folder with meta.json (default: the run's data.path)"
    )
    p.add_argument(
        "--max-chunks", type=int, default=0, help="stop after drawing N chunks, 0: no limit (rerun to go on)"
    )
    args = p.parse_args(argv)
    if args.num < 1 or args.batch < 1:
        p.error(f"--num {args.num} and --batch {args.batch} must be >= 1")
    return run_verb("minsnr sample", lambda: _sample(args))


def _sample(args: argparse.Namespace) -> int:
    try:
        out = run(args)
    finally:
        teardown()
    if out is not None:
        print(f"wrote {args.num} images to {out}")
    elif int(os.environ.get("RANK", "0")) == 0:
        print(f"stopped early; rerun the same command to finish {args.out}", file=sys.stderr)
    return 0
