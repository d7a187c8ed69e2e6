"""Loader throughput (items/s through `Batches`) by number of workers.

Cases: JPEG folders of 64x64 and 256x256 images (decode only), ImageNet-like 500x375 JPEGs through the
ADM crop to 64x64, and the latent dataset (32x32x4 posterior samples from a memory-mapped float16 file).
Prints items per wall-clock second and per CPU second (this process and its workers; the steadier
figure on a shared machine) and writes benchmarks/results/data.json.

    .venv/bin/python benchmarks/data.py [--seconds 3] [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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
        m[lo : lo + 1024, :, 0] = rng.standard_normal((min(1024, count - lo), 2, *shape))
        m[lo : lo + 1024, :, 1] = 0.05
    m.flush()
    np.save(folder / LABELS, rng.integers(0, 1000, count))
    write_json(
        folder / META,
        {
            "vae": "random",
            "scale_factor": 0.18215,
            "count": count,
            "shape": list(shape),
            "size": 256,
            "crop": "adm",
            "num_classes": 1000,
            "class_names": [str(i) for i in range(1000)],
        },
    )
    return folder


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (the loader's workers); Linux /proc."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == os.getpid():  # fields[1] is the parent pid; 11 and 12 are utime and stime
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def measure(dataset: object, batch: int, workers: int, seconds: float) -> tuple[float, float]:
    """(items per wall second, items per CPU second), workers started and warmed up before timing."""
    batches = Batches(dataset, batch, seed=0, num_workers=workers)  # type: ignore[arg-type]
    for _ in range(2 * workers + 2):
        next(batches)
    n, cpu, start = 0, cpu_seconds(), time.perf_counter()
    while time.perf_counter() - start < seconds or n < 3 * batch:
        x, _ = next(batches)
        n += len(x)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    batches.close()
    return n / wall, n / cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args()
    torch.set_num_threads(1)  # as in DataLoader workers; workers=0 then measures one core
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        cases = [
            ("folder jpeg 64x64", FolderDataset(make_jpegs(t / "j64", 1024, (64, 64))), 128),
            ("folder jpeg 256x256", FolderDataset(make_jpegs(t / "j256", 256, (256, 256))), 32),
            (
                "folder jpeg 500x375 adm->64",
                FolderDataset(make_jpegs(t / "jin", 256, (500, 375)), resolution=64, crop="adm"),
                64,
            ),
            ("latent 4x32x32 fp16", LatentDataset(make_latents(t / "lat", 8192)), 256),
        ]
        print(f"{'case':<30} {'batch':>5} {'workers':>7} {'items/s':>10} {'items/cpu-s':>12}")
        for name, dataset, batch in cases:
            for w in a.workers:
                rate, per_cpu = measure(dataset, batch, w, a.seconds)
                rows.append(
                    {
                        "case": name,
                        "batch": batch,
                        "workers": w,
                        "items_per_s": round(rate, 1),
                        "items_per_cpu_s": round(per_cpu, 1),
                    }
                )
                print(f"{name:<30} {batch:>5} {w:>7} {rate:>10.0f} {per_cpu:>12.0f}")
    RESULTS.parent.mkdir(exist_ok=True)
    machine = {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "load_avg_1min": os.getloadavg()[0],
    }
    RESULTS.write_text(json.dumps({"machine": machine, "results": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
