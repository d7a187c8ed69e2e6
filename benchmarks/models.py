"""Backbone speed: parameters, training FLOPs per image, forward+backward images/s, peak memory, MFU.

    python benchmarks/models.py                                   # CPU, the tiny models, < 1 minute
    python benchmarks/models.py --device cuda --dtype bf16 --compile --batch 256 --models vit_b \
        --peak-tflops 989

FLOPs are counted with torch.utils.flop_counter over one forward+backward on the meta device (matmuls,
convolutions and attention; the usual MFU convention). MFU = FLOPs/image * images/s / peak.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from minsnr.models import MODELS, create_model

# (input_size, in_channels, num_classes): the tiny models on 8x8 digits, the paper's on 32x32x4 latents
SHAPES = {name: (8, 1, 10) if name.endswith("_tiny") else (32, 4, 1000) for name in MODELS}
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}


def batch_for(name: str, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    size, channels, classes = SHAPES[name]
    x = torch.randn(batch, channels, size, size, device=device)
    t = torch.rand(batch, device=device) * 999
    labels = torch.randint(0, classes + 1, (batch,), device=device)  # the null row included
    return x, t, labels


def training_flops_per_image(name: str) -> float:
    """Forward+backward FLOPs for one image, counted on the meta device (no memory, no compute)."""
    size, channels, classes = SHAPES[name]
    with torch.device("meta"):
        model = create_model(name, input_size=size, in_channels=channels, num_classes=classes)
        x, t, labels = batch_for(name, 2, "meta")
        with FlopCounterMode(display=False) as counter:
            model(x, t, labels).square().mean().backward()
    return counter.get_total_flops() / 2


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.machine()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(name: str, args: argparse.Namespace) -> dict:
    size, channels, classes = SHAPES[name]
    model: nn.Module = create_model(name, input_size=size, in_channels=channels, num_classes=classes)
    model = model.to(args.device).train()
    x, t, labels = batch_for(name, args.batch, args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    step_model = torch.compile(model) if args.compile else model
    target = torch.randn_like(x)

    def step() -> None:
        with torch.autocast(args.device.split(":")[0], dtype=DTYPES[args.dtype], enabled=args.dtype == "bf16"):
            out = step_model(x, t, labels)
        F.mse_loss(out.float(), target).backward()
        model.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    sync(args.device)
    seconds = (time.perf_counter() - start) / args.steps
    cpu_seconds = (time.process_time() - cpu_start) / args.steps  # all threads; robust to other loads
    if args.device.startswith("cuda"):
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:  # resident peak of the whole process so far (Linux reports KiB)
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    flops = training_flops_per_image(name)
    images_per_s = args.batch / seconds
    mfu = flops * images_per_s / (args.peak_tflops * 1e12) if args.peak_tflops else None
    return {
        "model": name,
        "shape": [channels, size, size],
        "num_classes": classes,
        "params": params,
        "train_gflops_per_image": flops / 1e9,
        "ms_per_step": seconds * 1e3,
        "cpu_ms_per_step": cpu_seconds * 1e3,
        "images_per_s": images_per_s,
        "peak_mib": peak_mib,
        "mfu": mfu,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="fp32", help="bf16: autocast; tf32: fp32 with TF32 matmuls"
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--models",
        default=None,
        help=f"comma-separated; default: the tiny ones on CPU, all on GPU ({', '.join(MODELS)})",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format (UNet)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU, e.g. 989 (H100 bf16)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results/models.json")
    args = parser.parse_args(argv)
    names = (
        args.models.split(",")
        if args.models
        else [n for n in MODELS if n.endswith("_tiny") or not args.device.startswith("cpu")]
    )
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; valid: {', '.join(MODELS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype == "tf32":
        torch.set_float32_matmul_precision("high")
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_name()

    print(
        f"device {args.device} ({device_name}), {args.dtype}, batch {args.batch}, compile {args.compile}, "
        f"channels_last {args.channels_last}, threads {torch.get_num_threads()}, torch {torch.__version__}"
    )
    print(
        f"{'model':<18} {'params':>9} {'GFLOP/img':>10} {'ms/step':>9} {'cpu ms':>8} {'img/s':>9} {'peak MiB':>9} {'MFU':>6}"
    )
    results = []
    for name in names:
        r = bench(name, args)
        results.append(r)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(
            f"{name:<18} {r['params'] / 1e6:>8.2f}M {r['train_gflops_per_image']:>10.3f} {r['ms_per_step']:>9.1f} "
            f"{r['cpu_ms_per_step']:>8.1f} {r['images_per_s']:>9.1f} {r['peak_mib']:>9.0f} {mfu:>6}",
            flush=True,
        )
    if not args.device.startswith("cuda"):
        print("peak MiB on CPU: resident peak of the whole process so far")
    print("cpu ms: process CPU time per step, all threads (wall ms/step is inflated when cores are shared)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: getattr(args, k) for k in ("device", "dtype", "batch", "compile", "channels_last", "steps")}
    out.write_text(
        json.dumps(
            {
                **meta,
                "device_name": device_name,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
