"""Training-time Pareto monitor (`train.pareto_every`): equation 11 for the run's own weighting and for
the UGD optimum, and the share of conflicting task-gradient pairs, on a small fixed batch."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from minsnr.config import Config
from minsnr.pareto.compare import fixed_weights, negative_cosine_fraction
from minsnr.pareto.gram import equal_ranges, gram_matrix, make_task_batch
from minsnr.pareto.solvers import objective, ugd
from minsnr.schedule import Schedule


def pareto_metrics(model: nn.Module, x0: Tensor, labels: Tensor | None, schedule: Schedule, cfg: Config, *,
                   num_tasks: int = 10, lam: float = 0.0, seed: int = 0) -> dict[str, float]:
    """Metrics for one monitor step; call every `train.pareto_every` steps with the same x0 and labels.

    `model` is the raw module (not DDP- or compile-wrapped). Timesteps and noise come from `seed`, so
    successive calls differ only through the model. Leaves parameters' .grad untouched and restores the
    model's train/eval mode. Keys: pareto/objective_<cfg.loss.weighting>, pareto/objective_ugd,
    pareto/neg_cos_frac.
    """
    device = next(model.parameters()).device
    ranges = equal_ranges(schedule.num_timesteps, num_tasks)
    gen = torch.Generator().manual_seed(seed)
    batch = make_task_batch(x0.detach(), labels, ranges, generator=gen).to(device)
    gram = gram_matrix(model, batch, schedule.to(device), cfg.loss.target).numpy()
    w = fixed_weights(schedule, ranges, cfg.loss.weighting, cfg.loss.gamma)
    return {
        f"pareto/objective_{cfg.loss.weighting}": objective(gram, w, lam),
        "pareto/objective_ugd": ugd(gram, lam).objective,
        "pareto/neg_cos_frac": negative_cosine_fraction(gram),
    }
