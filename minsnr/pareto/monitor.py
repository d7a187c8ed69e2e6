"""Training-time Pareto monitor (`train.pareto_every`): equation 11 for the run's own weighting and for
the UGD optimum, and the share of conflicting task-gradient pairs, on a small fixed batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from minsnr.adaptive import PARETO_IMAGES, PARETO_LAMBDA, PARETO_TASKS, probe_images
from minsnr.config import Config
from minsnr.gram import gram_matrix, make_task_batch
from minsnr.pareto.compare import fixed_weights, negative_cosine_fraction
from minsnr.schedule import Schedule
from minsnr.solvers import objective, ugd
from minsnr.timesteps import bins
from minsnr.weighting import ADAPTIVE

if TYPE_CHECKING:
    from minsnr.train import HookContext


def pareto_metrics(
    model: nn.Module,
    x0: Tensor,
    labels: Tensor | None,
    schedule: Schedule,
    cfg: Config,
    *,
    num_tasks: int = PARETO_TASKS,
    lam: float = PARETO_LAMBDA,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics for one monitor step; call every `train.pareto_every` steps with the same x0 and labels.

    `model` is the raw module (not DDP- or compile-wrapped). Timesteps and noise come from `seed`, so
    successive calls differ only through the model. Leaves parameters' .grad untouched and restores the
    model's train/eval mode. Keys: pareto/objective_<cfg.loss.weighting> (not for the stateful learned and
    pareto weightings), pareto/objective_ugd, pareto/neg_cos_frac.
    """
    device = next(model.parameters()).device
    ranges = bins(schedule.num_timesteps, num_tasks)
    gen = torch.Generator().manual_seed(seed)
    batch = make_task_batch(x0.detach(), labels, ranges, generator=gen).to(device)
    gram = gram_matrix(model, batch, schedule.to(device), cfg.loss.target).numpy()
    out = {"pareto/objective_ugd": ugd(gram, lam).objective, "pareto/neg_cos_frac": negative_cosine_fraction(gram)}
    if cfg.loss.weighting not in ADAPTIVE:  # learned / pareto have no fixed weight (they log their own state)
        w = fixed_weights(schedule, ranges, cfg.loss.weighting, cfg.loss.gamma)
        out[f"pareto/objective_{cfg.loss.weighting}"] = objective(gram, w, lam)
    return out


def make_pareto_hook(
    cfg: Config, *, images: int = PARETO_IMAGES, num_tasks: int = PARETO_TASKS, lam: float = PARETO_LAMBDA
) -> Callable[[HookContext], dict[str, float]]:
    """The trainer's `train.pareto_every` hook: `pareto_metrics` of the training weights (ctx.model) on
    `images` un-augmented training images chosen once by train.seed."""
    fixed: list[tuple[Tensor, Tensor | None]] = []

    def hook(ctx: HookContext) -> dict[str, float]:
        if not fixed:
            x, labels = probe_images(ctx.dataset, ctx.model, cfg.train.seed, images)  # as `pareto` weighting's
            fixed.append((x.to(ctx.device), None if labels is None else labels.to(ctx.device)))
        x0, labels = fixed[0]
        return pareto_metrics(
            ctx.model, x0, labels, ctx.schedule, cfg, num_tasks=num_tasks, lam=lam, seed=cfg.train.seed
        )

    return hook
