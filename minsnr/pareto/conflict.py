"""`minsnr conflict CHECKPOINT --ranges 100:200,200:300,300:400 --steps N`: figure 2 of the paper.

Fine-tunes a copy of the model on each timestep range only (the run's own loss: its target, weighting,
label dropout and AdamW settings at a tenth of its learning rate; t uniform in the range), then measures
the change of the unweighted x0-space loss in every one of `--bins` equal timestep bins on fixed images,
timesteps and noise. Negative cells: fine-tuning that range helped that bin; positive: it hurt.
Writes conflict.json and conflict.png to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from minsnr.checkpoint import CheckpointError
from minsnr.config import ConfigError
from minsnr.data import Batches, labels_for
from minsnr.evaluate.util import HelpFormatter, check_ema_choice
from minsnr.gram import Range, TaskBatch, make_task_batch, task_losses
from minsnr.loss import diffusion_loss
from minsnr.objective import drop_labels
from minsnr.pareto.common import Loaded, add_common_args, draw, load, out_dir
from minsnr.timesteps import bins
from minsnr.weighting import ADAPTIVE


def parse_ranges(text: str, num_timesteps: int) -> list[Range]:
    """'100:200,200:300' -> [(100, 200), (200, 300)]; each range non-empty and inside [0, T)."""
    ranges = []
    for part in text.split(","):
        try:
            lo, hi = (int(v) for v in part.split(":"))
        except ValueError:
            raise ValueError(f"range {part!r} is not of the form LO:HI (e.g. 100:200)") from None
        if not 0 <= lo < hi <= num_timesteps:
            raise ValueError(f"range {part!r} must satisfy 0 <= LO < HI <= {num_timesteps}")
        ranges.append((lo, hi))
    return ranges


def fine_tune(
    loaded: Loaded, start: nn.Module, rng: Range, *, steps: int, lr: float, batch_size: int, seed: int
) -> nn.Module:
    """A copy of `start` trained `steps` AdamW steps with t ~ U[lo, hi) only."""
    cfg, device = loaded.cfg, loaded.device
    weighting = ADAPTIVE.get(cfg.loss.weighting, cfg.loss.weighting)
    if weighting != cfg.loss.weighting:  # its trained state is not in the exported EMA weights
        print(
            f"loss.weighting={cfg.loss.weighting} has training state; fine-tuning with its fixed base "
            f"weighting {weighting!r} instead"
        )
    model = copy.deepcopy(start).train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=lr,
        betas=tuple(cfg.optim.betas),  # type: ignore[arg-type]
        weight_decay=cfg.optim.weight_decay,
        eps=cfg.optim.eps,
    )
    batches = Batches(loaded.dataset, batch_size, seed=seed)  # the same images for every range
    gen = torch.Generator(device).manual_seed(seed)
    num_classes = getattr(model, "num_classes", 0)
    for _ in tqdm(range(steps), desc=f"fine-tuning on t in [{rng[0]}, {rng[1]})", unit="step", dynamic_ncols=True):
        x, y = next(batches)
        x = x.to(device)
        labels = labels_for(getattr(model, "num_classes", 0), loaded.dataset, y.to(device))
        if labels is not None:
            labels = drop_labels(labels, cfg.loss.label_dropout, num_classes, generator=gen)
        t = torch.randint(rng[0], rng[1], (x.shape[0],), device=device, generator=gen)
        out = diffusion_loss(
            model,
            x,
            labels,
            loaded.schedule,
            target=cfg.loss.target,
            weighting=weighting,
            gamma=cfg.loss.gamma,
            t=t,
            generator=gen,
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
    batches.close()
    return model.eval()


def conflict(
    loaded: Loaded, ranges: list[Range], eval_batch: TaskBatch, *, steps: int, lr: float, batch_size: int, seed: int
) -> dict[str, Any]:
    """Loss per bin before and after fine-tuning on each range; change and relative change [range, bin]."""
    target = loaded.cfg.loss.target
    base = task_losses(loaded.model, eval_batch, loaded.schedule, target)
    after = torch.stack(
        [
            task_losses(
                fine_tune(loaded, loaded.model, r, steps=steps, lr=lr, batch_size=batch_size, seed=seed),
                eval_batch,
                loaded.schedule,
                target,
            )
            for r in ranges
        ]
    )
    return {
        "ranges": ranges,
        "bins": eval_batch.ranges,
        "base": base.tolist(),
        "after": after.tolist(),
        "change": (after - base).tolist(),
        "relative": ((after - base) / base).tolist(),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="minsnr conflict", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    add_common_args(p)
    p.add_argument("--ranges", default="100:200,200:300,300:400", help="fine-tuning ranges LO:HI,...")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per range")
    p.add_argument(
        "--lr",
        type=float,
        help="fine-tuning learning rate (default: the run's optim.lr / 10, as a "
        "fresh AdamW on EMA weights otherwise takes steps large enough to "
        "raise the loss everywhere)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="fine-tuning batch size")
    p.add_argument("--bins", type=int, default=10, help="equal timestep bins to measure")
    p.add_argument("--eval-images", type=int, default=64, help="held images per bin")
    args = p.parse_args(argv)
    try:
        check_ema_choice(args.checkpoint, not args.no_ema)
    except ValueError as err:
        p.error(str(err))
    for name in ("steps", "batch_size", "bins", "eval_images"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr is not None and args.lr <= 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from minsnr.pareto.plots import plot_matrix  # matplotlib (the plots extra): not needed for --help

    try:
        loaded = load(args)
        t_count = loaded.cfg.schedule.num_timesteps
        ranges = parse_ranges(args.ranges, t_count)
        gen = torch.Generator().manual_seed(args.seed)
        x0, labels = draw(loaded, args.eval_images, gen)
        eval_batch = make_task_batch(x0, labels, bins(t_count, args.bins), generator=gen).to(loaded.device)
        args.lr = args.lr or loaded.cfg.optim.lr / 10
        report = conflict(
            loaded, ranges, eval_batch, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed
        )
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"minsnr conflict: {err}", file=sys.stderr)
        return 2
    report.update(
        checkpoint=str(args.checkpoint),
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        eval_images=args.eval_images,
        seed=args.seed,
    )
    out = out_dir(args, "conflict")
    (out / "conflict.json").write_text(json.dumps(report, indent=1))
    rows = [f"tuned {lo}-{hi}" for lo, hi in ranges]
    cols = [f"{lo}-{hi}" for lo, hi in report["bins"]]
    rel = torch.tensor(report["relative"]) * 100
    plot_matrix(
        rel,
        rows,
        cols,
        out / "conflict.png",
        annotate=True,
        label="loss change (%)",
        title=f"unweighted x0 loss change per bin after {args.steps} steps on each range",
    )
    print(f"{'':<14}" + "".join(f"{c:>10}" for c in cols))
    print(f"{'base loss':<14}" + "".join(f"{v:>10.4g}" for v in report["base"]))
    for name, row in zip(rows, rel.tolist()):
        print(f"{name:<14}" + "".join(f"{v:>9.2f}%" for v in row))
    print(f"wrote {out}")
    return 0
