"""Loader throughput (items/s through `Batches`) by number of workers.

Cases: JPEG folders of 64x64 and 256x256 images (decode only), ImageNet-like 500x375 JPEGs through the
ADM crop to 64x64, and the latent dataset (32x32x4 posterior samples from a memory-mapped float16 file).
Prints a table and writes benchmarks/results/data.json.

    .venv/bin/python benchmarks/data.py [--seconds 3] [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minsnr.data import Batches, FolderDataset, LatentDataset
from minsnr.data.latent import LABELS, META, MOMENTS, write_json

RESULTS = Path(__file__).resolve().parent / "results" / "data.json"


def make_jpegs(folder: Path, count: int, size: tuple[int, int], classes: int = 4) -> Path:
    """Smooth random RGB JPEGs (quality 90) in `classes` class folders."""
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.BICUBIC)
        (folder / f"c{i % classes}").mkdir(parents=True, exist_ok=True)
        img.save(folder / f"c{i % classes}" / f"{i:05d}.jpg", quality=90)
    return folder


def make_latents(folder: Path, count: int, shape: tuple[int, int, int] = (4, 32, 32)) -> Path:
    """A finished latent folder with random moments, laid out as `minsnr encode` writes it."""
    folder.mkdir(parents=True)
    m = np.lib.format.open_memmap(folder / MOMENTS, mode="w+", dtype=np.float16, shape=(count, 2, 2, *shape))
    rng = np.random.default_rng(0)
    for lo in range(0, count, 1024):
        m[lo:lo + 1024, :, 0] = rng.standard_normal((min(1024, count - lo), 2, *shape))
        m[lo:lo + 1024, :, 1] = 0.05
    m.flush()
    np.save(folder / LABELS, rng.integers(0, 1000, count))
    write_json(folder / META, {"vae": "random", "scale_factor": 0.18215, "count": count, "shape": list(shape),
                               "size": 256, "crop": "adm", "num_classes": 1000,
                               "class_names": [str(i) for i in range(1000)]})
    return folder


def measure(dataset: object, batch: int, workers: int, seconds: float) -> float:
    """Items/s after a warm-up of two batches (worker start-up excluded)."""
    batches = Batches(dataset, batch, seed=0, num_workers=workers)  # type: ignore[arg-type]
    for _ in range(2):
        next(batches)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 3:
        x, _ = next(batches)
        n += len(x)
    rate = n / (time.perf_counter() - start)
    batches.close()
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        cases = [
            ("folder jpeg 64x64", FolderDataset(make_jpegs(t / "j64", 1024, (64, 64))), 128),
            ("folder jpeg 256x256", FolderDataset(make_jpegs(t / "j256", 256, (256, 256))), 32),
            ("folder jpeg 500x375 adm->64", FolderDataset(make_jpegs(t / "jin", 256, (500, 375)), resolution=64,
                                                           crop="adm"), 64),
            ("latent 4x32x32 fp16", LatentDataset(make_latents(t / "lat", 8192)), 256),
        ]
        print(f"{'case':<30} {'batch':>5} {'workers':>7} {'items/s':>10}")
        for name, dataset, batch in cases:
            for w in a.workers:
                rate = measure(dataset, batch, w, a.seconds)
                rows.append({"case": name, "batch": batch, "workers": w, "items_per_s": round(rate, 1)})
                print(f"{name:<30} {batch:>5} {w:>7} {rate:>10.0f}")
    RESULTS.parent.mkdir(exist_ok=True)
    machine = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__, "load_avg_1min": os.getloadavg()[0]}
    RESULTS.write_text(json.dumps({"machine": machine, "results": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
