"""`minsnr pareto CHECKPOINT`: figure 4 (equation 11 for each weighting against the UGD and Frank-Wolfe
optima) and the cosine map of task gradients on your own model; `--instability` adds figure 3.

    minsnr pareto runs/quickstart/checkpoints/latest.pt                  # data from the checkpoint config
    minsnr pareto ckpt.pt --data cifar.npz data.source=npz --tasks 20 --lambda 1 --relative-lambda --instability

Writes pareto.json, pareto.png, cosine.png (and instability.json, instability.png) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch

from minsnr.checkpoint import CheckpointError
from minsnr.config import ConfigError
from minsnr.evaluate.util import HelpFormatter, check_ema_choice
from minsnr.gram import Range, auto_block, gram_matrix, make_task_batch, sampled_ranges, task_losses
from minsnr.pareto.common import Loaded, add_common_args, draw, load, out_dir
from minsnr.pareto.compare import compare, cosine_matrix, instability, negative_cosine_fraction
from minsnr.timesteps import bins


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="minsnr pareto", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    add_common_args(p)
    p.add_argument("--tasks", type=int, default=20, help="number of tasks K")
    p.add_argument("--sampled", action="store_true", help="K sampled timesteps instead of K equal ranges")
    p.add_argument("--batch", type=int, default=16, help="images per task, the same for every task")
    p.add_argument("--lambda", dest="lam", type=float, default=0.0, help="lambda of eq. 11 (0: eq. 10)")
    p.add_argument(
        "--relative-lambda",
        action="store_true",
        help="--lambda in units of the mean squared task-gradient norm trace(G)/K, so it does not "
        "depend on the scale of the loss",
    )
    p.add_argument(
        "--block",
        type=int,
        help="gradients held at once (default: all on CPU, what fits on CUDA); 1 = lowest memory, recomputes gradients",
    )
    p.add_argument("--micro-batch", type=int, help="samples per forward/backward pass (default: a whole task)")
    p.add_argument("--instability", action="store_true", help="also figure 3: UGD weights from few samples")
    p.add_argument("--sizes", default="1,2,4,8,16", help="samples per task for --instability")
    p.add_argument("--repeats", type=int, default=5, help="repeats per size for --instability")
    args = p.parse_args(argv)
    try:
        check_ema_choice(args.checkpoint, not args.no_ema)
    except ValueError as err:
        p.error(str(err))
    for name in ("tasks", "batch", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.lam < 0:
        p.error(f"--lambda must be >= 0, got {args.lam}")
    try:
        args.sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if min(args.sizes) < 1:
        p.error(f"--sizes must be >= 1, got {args.sizes}")
    return args


def table(results: dict[str, dict[str, Any]]) -> str:
    from minsnr.pareto.plots import LABELS  # matplotlib (the plots extra): imported once the arguments parse

    best = results["frank_wolfe"]["objective"]
    lines = [f"{'weighting':<16}{'objective':>14}{'/ optimum':>11}  iterations"]
    for name, r in results.items():
        ratio = r["objective"] / best if best > 0 else float("inf")
        its = f"{r['iterations']}{'' if r['converged'] else ' (not converged)'}" if "iterations" in r else ""
        lines.append(f"{LABELS.get(name, name):<16}{r['objective']:>14.6g}{ratio:>11.4f}  {its}")
    order = sorted(results, key=lambda n: results[n]["objective"])
    lines.append("ordering (best first): " + " < ".join(LABELS.get(n, n) for n in order))
    return "\n".join(lines)


def run(args: argparse.Namespace, loaded: Loaded) -> dict[str, Any]:
    model, cfg, sched = loaded.model, loaded.cfg, loaded.schedule
    t_count = cfg.schedule.num_timesteps
    if args.tasks > t_count:
        raise ConfigError(f"--tasks {args.tasks} exceeds the schedule's {t_count} timesteps")
    gen = torch.Generator().manual_seed(args.seed)
    ranges = sampled_ranges(t_count, args.tasks, gen) if args.sampled else bins(t_count, args.tasks)
    x0, labels = draw(loaded, args.batch, gen)
    batch = make_task_batch(x0, labels, ranges, generator=gen).to(loaded.device)
    block = args.block or auto_block(model, args.tasks)
    gram = gram_matrix(
        model, batch, sched, cfg.loss.target, block=block, micro_batch=args.micro_batch, progress=True
    ).numpy()
    mean_diag = float(np.trace(gram) / len(gram))
    lam = args.lam * mean_diag if args.relative_lambda else args.lam
    results = compare(gram, sched, ranges, lam)
    losses = task_losses(model, batch, sched, cfg.loss.target, micro_batch=args.micro_batch)
    return {
        "checkpoint": str(args.checkpoint),
        "model": cfg.model.name,
        "target": cfg.loss.target,
        "trained_weighting": cfg.loss.weighting,
        "data": {"source": cfg.data.source, "path": cfg.data.path, "split": args.split},
        "tasks": ranges,
        "images_per_task": args.batch,
        "lambda": lam,
        "seed": args.seed,
        "lambda_relative": lam / mean_diag if mean_diag > 0 else None,
        "mean_gram_diagonal": mean_diag,
        "task_losses": losses.tolist(),
        "neg_cos_frac": negative_cosine_fraction(gram),
        "results": results,
        "gram": gram.tolist(),
        "cosine": cosine_matrix(gram).tolist(),
    }


def run_instability(args: argparse.Namespace, loaded: Loaded, ranges: list[Range]) -> dict[str, Any]:
    entries = instability(
        loaded.model,
        lambda n, g: draw(loaded, n, g),
        loaded.schedule,
        loaded.cfg.loss.target,
        ranges,
        sizes=args.sizes,
        repeats=args.repeats,
        lam=args.lam,
        relative_lambda=args.relative_lambda,
        seed=args.seed,
        block=args.block or auto_block(loaded.model, len(ranges)),
        micro_batch=args.micro_batch,
    )
    return {"tasks": ranges, "lambda": args.lam, "relative_lambda": args.relative_lambda, "sizes": entries}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from minsnr.pareto.plots import plot_cosines, plot_instability, plot_objectives  # not needed for --help

    try:
        loaded = load(args)
        report = run(args, loaded)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"minsnr pareto: {err}", file=sys.stderr)
        return 2
    out = out_dir(args, "pareto")
    ranges = [tuple(r) for r in report["tasks"]]
    (out / "pareto.json").write_text(json.dumps(report, indent=1))
    plot_objectives(
        report["results"],
        ranges,
        out / "pareto.png",
        title=f"eq. 11, lambda {report['lambda']:.3g}: {report['model']} ({report['target']}, "
        f"trained {report['trained_weighting']})",
    )
    plot_cosines(np.array(report["cosine"]), ranges, out / "cosine.png")
    print(table(report["results"]))
    print(f"conflicting task pairs (negative cosine): {report['neg_cos_frac']:.1%}")
    if args.instability:
        unstable = run_instability(args, loaded, ranges)
        (out / "instability.json").write_text(json.dumps(unstable, indent=1))
        plot_instability(unstable["sizes"], ranges, out / "instability.png")
        print(
            "instability (mean std of UGD weights): "
            + ", ".join(f"{e['samples_per_task']}/task {e['spread']:.4f}" for e in unstable["sizes"])
        )
    print(f"wrote {out}")
    return 0
