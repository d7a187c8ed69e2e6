"""`minsnr losses CKPT [CKPT ...]`: the unweighted x0-space MSE ||x0 - x0_hat||^2 of EMA models on
held-out images, averaged in timestep ranges (section 4.2, figure 6; default 10 bins of 100 steps).

Every checkpoint sees the same images, timesteps and noise (fixed --seed): in each bin the timesteps are
spread evenly over the range (image j gets lo + j mod width) and the noise is seeded by (seed, bin).
Held-out data: the run's own data config with --split (default test), or --data (digits, an npz, or an
image folder) read with the run's resolution and crop. Writes OUT.json and OUT.png: with several
checkpoints of a run, one panel per bin against training steps, one line per run (figure 6); otherwise
one panel, MSE against the timestep range, one line per checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from minsnr.config import Config
from minsnr.distributed import resolve_device
from minsnr.evaluate.util import HelpFormatter, check_ema_choice, run_verb
from minsnr.extras import require
from minsnr.loss import diffusion_loss
from minsnr.schedule import schedule_of
from minsnr.seeds import derive_seed
from minsnr.timesteps import bins as timestep_bins


def held_out(
    cfg: Config, data: str | None, split: str, num: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Up to `num` un-augmented images [N, C, H, W] (a seeded subset) and labels (None if unconditional)."""
    from minsnr.data import build_dataset, source_of

    dc = cfg.data
    if data is not None:
        source = source_of(data, "--data")
        dc = dataclasses.replace(dc, source=source, path=None if source == "digits" else data)
        split = "train" if source == "folder" else split
    dataset = build_dataset(dc, split=split)
    idx = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:num])
    x, labels, _ = dataset.get_batch(idx.tolist())
    if cfg.model.num_classes == 0:
        return x, None
    if dataset.num_classes == 0:
        raise ValueError(f"the model is class-conditional but the held-out data ({dc.source} {dc.path}) has no labels")
    return x, labels


@torch.no_grad()
def bin_losses(
    model: nn.Module,
    cfg: Config,
    x: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    bins: int = 10,
    seed: int = 0,
    batch_size: int = 250,
    device: torch.device | str = "cpu",
    desc: str | None = None,
) -> list[float]:
    """Mean unweighted x0 MSE per timestep range [k T/bins, (k+1) T/bins); a progress bar named `desc`
    over the bins when given."""
    schedule = schedule_of(cfg.schedule).to(device)
    out = []
    ranges = tqdm(
        timestep_bins(schedule.num_timesteps, bins), desc=desc, unit="bin", disable=desc is None, dynamic_ncols=True
    )
    for b, (lo, hi) in enumerate(ranges):
        gen = torch.Generator().manual_seed(derive_seed(seed, b))
        noise = torch.randn(x.shape, generator=gen)
        t = lo + torch.arange(len(x)) % (hi - lo)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(0, len(x), batch_size):
            s = slice(i, i + batch_size)
            y = None if labels is None else labels[s].to(device)
            res = diffusion_loss(
                model,
                x[s].to(device),
                y,
                schedule,
                target=cfg.loss.target,
                weighting="const",
                t=t[s].to(device),
                noise=noise[s].to(device),
            )
            total += res.mse_x0.double().sum()
        out.append(float(total) / len(x))
    return out


def _step(path: Path) -> int | None:
    """The training step stored in a .pt checkpoint (memory-mapped: the weights are not read)."""
    if path.suffix != ".pt":
        return None
    from minsnr.checkpoint import load_checkpoint

    return int(load_checkpoint(path, mmap=True).get("step", 0))


def _run_name(path: Path) -> str:
    """The run folder a checkpoint lives in (RUN/checkpoints/step_*.pt, or RUN/ema.safetensors)."""
    folder = path.resolve().parent
    return folder.parent.name if folder.name == "checkpoints" else folder.name


def plot(results: list[dict[str, Any]], bins: list[list[int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        runs.setdefault(r["run"], []).append(r)
    if all(r["step"] is not None for r in results) and max(len(v) for v in runs.values()) > 1:
        cols = min(5, len(bins))
        fig, axes = plt.subplots(
            -(-len(bins) // cols), cols, figsize=(3.2 * cols, 2.8 * -(-len(bins) // cols)), squeeze=False
        )
        for k, ax in enumerate(axes.flat):
            if k >= len(bins):
                ax.axis("off")
                continue
            for run, rs in runs.items():
                rs = sorted(rs, key=lambda r: r["step"])
                ax.plot([r["step"] for r in rs], [r["mse"][k] for r in rs], marker="o", label=run)
            ax.set_title(f"t in [{bins[k][0]}, {bins[k][1]})", fontsize=9)
            ax.set_xlabel("training step")
        axes[0, 0].set_ylabel("unweighted x0 MSE")
        axes[0, 0].legend(fontsize=8)
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        names = [f"[{lo}, {hi})" for lo, hi in bins]
        for r in results:
            label = r["path"] if r["step"] is None else f"{r['run']} @ {r['step']}"
            ax.plot(names, r["mse"], marker="o", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("timestep range")
        ax.set_ylabel("unweighted x0 MSE")
        ax.tick_params(axis="x", labelrotation=45)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="minsnr losses", description=__doc__, formatter_class=HelpFormatter)
    path = os.path.expanduser
    p.add_argument("checkpoints", nargs="+", type=path, help=".pt checkpoints or exported .safetensors")
    p.add_argument(
        "--data",
        default=None,
        type=path,
        help="held-out data: digits, an .npz or an image folder (default: the run's data config)",
    )
    p.add_argument("--split", choices=("train", "test"), default="test", help="split of the run's data or --data")
    p.add_argument("--num", type=int, default=1000, help="held-out images")
    p.add_argument("--bins", type=int, default=10, help="equal timestep ranges")
    p.add_argument("--seed", type=int, default=0, help="seed of the image subset and the noise")
    p.add_argument("--batch", type=int, default=250, help="images per forward pass")
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="EMA weights; --no-ema: the raw training weights (.pt checkpoints only)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--out", default="losses", type=path, help="writes OUT.json and OUT.png")
    a = p.parse_args(argv)
    return run_verb("minsnr losses", lambda: _losses(a))


def _losses(a: argparse.Namespace) -> int:
    from minsnr.checkpoint import load_model

    require("matplotlib", "the figure of minsnr losses")
    for ckpt in a.checkpoints:
        check_ema_choice(ckpt, a.ema)
    device = resolve_device(a.device)
    results = []
    for ckpt in a.checkpoints:
        model, cfg = load_model(ckpt, ema=a.ema, map_location=device)
        x, labels = held_out(cfg, a.data, a.split, a.num, a.seed)
        mse = bin_losses(
            model, cfg, x, labels, bins=a.bins, seed=a.seed, batch_size=a.batch, device=device, desc=Path(ckpt).name
        )
        results.append({"path": str(ckpt), "run": _run_name(Path(ckpt)), "step": _step(Path(ckpt)), "mse": mse})
        print(f"{ckpt}: " + " ".join(f"{m:.4g}" for m in mse))
    bins = [[lo, hi] for lo, hi in timestep_bins(cfg.schedule.num_timesteps, a.bins)]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"bins": bins, "num_images": len(x), "seed": a.seed, "ema": a.ema, "checkpoints": results}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    plot(results, bins, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0
