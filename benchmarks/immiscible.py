"""Cost of `loss.noise_assignment=immiscible` (minsnr.coupling.immiscible): one linear assignment per batch.

For batch sizes 64 ... 2048 and three image shapes (1x8x8 quickstart digits, 3x32x32 CIFAR, 4x32x32 the
256px latents) times one call of `immiscible` (the [B, B] inner products on the device, scipy's solver on
the CPU, the noise indexed on the device): the median of --repeats calls after one untimed call, on the CPU
and, when available, on CUDA (synchronised). The `solve` column is scipy's solver alone on the same matrix.
Images are U[-1, 1], noise N(0, I). Then times quickstart training steps (the real Trainer, batch 64) with
the default independent pairing and with immiscible, and prints the assignment's share of a step.

    python benchmarks/immiscible.py                 # full table, about a minute on 2 CPU cores
    python benchmarks/immiscible.py --smoke         # batch 64 and 128 only, a few seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import scipy
import torch
from scipy.optimize import linear_sum_assignment

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # minsnr, and models.py next to this file

from models import cpu_name  # noqa: E402  (benchmarks/models.py)

from minsnr.config import load_config  # noqa: E402
from minsnr.coupling import MAX_ASSIGNMENT_BATCH, immiscible  # noqa: E402
from minsnr.train import Trainer  # noqa: E402

BATCHES = (64, 128, 256, 512, 1024, 2048)
SMOKE_BATCHES = (64, 128)
SHAPES = {"quickstart": (1, 8, 8), "cifar": (3, 32, 32), "latent256": (4, 32, 32)}
RESULTS = ROOT / "benchmarks" / "results" / "immiscible.json"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall milliseconds of `repeats` calls of fn after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def assignment_row(batch: int, shape: str, device: torch.device, repeats: int) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(batch)
    x0 = torch.rand((batch, *SHAPES[shape]), device=device, generator=g) * 2 - 1
    noise = torch.randn((batch, *SHAPES[shape]), device=device, generator=g)
    inner = (x0.flatten(1) @ noise.flatten(1).T).cpu().numpy()
    return {
        "device": device.type,
        "shape": shape,
        "dims": list(SHAPES[shape]),
        "batch": batch,
        "ms": median_ms(lambda: immiscible(x0, noise), device, repeats),
        "solve_ms": median_ms(lambda: linear_sum_assignment(inner, maximize=True), torch.device("cpu"), repeats),
    }


def quickstart_steps_ms(steps: int, warmup: int, scratch: Path) -> dict[str, float]:
    """Median wall milliseconds of one quickstart training step (Trainer.train_step, batch 64) on the CPU, per
    assignment; the two trainers take turns, so both see the same load from anything else on the machine."""
    trainers = {}
    for assignment in ("independent", "immiscible"):
        overrides = [
            f"run_dir={scratch / assignment}",
            "resume=never",
            "train.device=cpu",
            "log.preview_every=0",
            "log.tensorboard=false",
            "checkpoint.every=0",
            f"loss.noise_assignment={assignment}",
        ]
        trainers[assignment] = Trainer(load_config("quickstart", overrides))
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for i in range(warmup + steps):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.train_step()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="batch 64 and 128 only, fewer repeats and steps")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per size (default 7; smoke 3)")
    p.add_argument("--steps", type=int, default=None, help="timed quickstart steps each (default 40; smoke 5)")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    repeats = a.repeats or (3 if a.smoke else 7)
    steps = a.steps or (5 if a.smoke else 40)
    batches = SMOKE_BATCHES if a.smoke else BATCHES
    assert max(batches) <= MAX_ASSIGNMENT_BATCH
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    names = {"cpu": cpu_name(), **({"cuda": torch.cuda.get_device_name()} if torch.cuda.is_available() else {})}
    print(
        f"immiscible assignment: {', '.join(f'{d}: {n}' for d, n in names.items())}; "
        f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}, scipy {scipy.__version__}"
    )
    print(f"{'device':<6} {'shape':<11} {'dims':<8} {'batch':>6} {'ms/call':>9} {'solve ms':>9} {'us/image':>9}")
    rows = []
    for device in devices:
        for shape in SHAPES:
            for batch in batches:
                r = assignment_row(batch, shape, device, repeats)
                rows.append(r)
                dims = "x".join(map(str, r["dims"]))
                print(
                    f"{device.type:<6} {shape:<11} {dims:<8} {batch:>6} {r['ms']:>9.2f} {r['solve_ms']:>9.2f} "
                    f"{1e3 * r['ms'] / batch:>9.1f}",
                    flush=True,
                )
    with tempfile.TemporaryDirectory() as scratch:
        medians = quickstart_steps_ms(steps, 3 if a.smoke else 10, Path(scratch))
    plain, paired = medians["independent"], medians["immiscible"]
    call = next(r["ms"] for r in rows if r["device"] == "cpu" and r["shape"] == "quickstart" and r["batch"] == 64)
    step = {
        "independent_ms": plain,
        "immiscible_ms": paired,
        "assignment_ms": call,
        "assignment_over_step": call / plain,
        "step_slowdown": paired / plain - 1,
    }
    print(
        f"quickstart step on the CPU (batch 64, median of {steps}): {plain:.2f} ms independent, "
        f"{paired:.2f} ms immiscible ({100 * step['step_slowdown']:+.1f}%); one assignment (1x8x8, batch 64) "
        f"{call:.2f} ms = {100 * step['assignment_over_step']:.1f}% of an independent step"
    )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "smoke": a.smoke,
        "repeats": repeats,
        "devices": names,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "scipy": scipy.__version__,
    }
    out.write_text(json.dumps({**meta, "results": rows, "quickstart_step": step}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
