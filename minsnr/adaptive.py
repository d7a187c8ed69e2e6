"""Stateful loss weightings (`loss.weighting=learned | pareto`): the state, its update and its logging.

Each is an nn.Module whose call maps timesteps t (long [B]) to (scale [B], offset [B]); `diffusion_loss`
then takes, per sample, scale * base weight * mse + offset, the base being the fixed strategy
weighting.ADAPTIVE names (docs/math.md, "Learned and Pareto-adaptive weightings").

- learned (EDM2, Karras et al. 2024, "loss weighting" / uncertainty): u(t) = Linear(Fourier(c(t))), with
  c = ln(sigma_VE) / 4 and fixed random Fourier features as EDM2; the per-sample loss is
  exp(-u) * plain-MSE + u. Its parameters are trained by the model's optimiser (a group without weight
  decay), checkpointed and exported, never averaged by the EMA (u is not used at sampling).
- pareto: a weight per equal timestep range, w_k, on the x0-space MSE. Every `loss.adapt_every` steps
  the Gram matrix of the K task gradients on a fixed probe batch gives the UGD optimum of eq. 11
  (`minsnr.gram`, `minsnr.solvers`), which is normalised to the mean weight over t of the start and smoothed into w_k.
  Start: Min-SNR-5 averaged over each range (the paper's proposal, section 3.4).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import Tensor, nn

from minsnr.data import labels_for
from minsnr.gram import gram_matrix, make_task_batch
from minsnr.schedule import Schedule
from minsnr.solvers import ugd
from minsnr.timesteps import bin_index, bin_name, bins
from minsnr.weighting import ADAPTIVE, DEFAULT_WEIGHTING, x0_weight

FOURIER_CHANNELS = 128  # EDM2's logvar_channels
FOURIER_SEED = 0  # the features are fixed, the same for every run (like the schedule)
PARETO_TASKS = 10  # equal timestep ranges (the `train.pareto_every` monitor uses the same)
PARETO_IMAGES = 8  # probe images per task (also the monitor's)
PARETO_SMOOTHING = 0.9  # w <- 0.9 w + 0.1 (normalised UGD optimum) at every update
PARETO_START = (DEFAULT_WEIGHTING, None)  # Min-SNR-5, the paper's proposal (gamma None: the registry's default)
PARETO_LAMBDA = 0.0  # eq. 10 (eq. 11 without the penalty), also the monitor's default


class LearnedWeight(nn.Module):
    """u(t) = <weight, features[t]> + bias, features[t] = sqrt(2) cos(2 pi (f c(t) + phi)) (EDM2's MPFourier),
    c(t) = ln(sigma_VE(t)) / 4 (EDM2's c_noise), f ~ N(0, 1), phi ~ U[0, 1). weight and bias start at 0,
    so u = 0 and training starts as the base strategy (the plain MSE of the target)."""

    def __init__(self, schedule: Schedule, channels: int = FOURIER_CHANNELS) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(FOURIER_SEED)  # not the global stream: no effect on the run's draws
        freqs = torch.randn(channels, generator=gen, dtype=torch.float64)
        phases = torch.rand(channels, generator=gen, dtype=torch.float64)
        c = schedule.log_sigmas.detach().cpu().double()[:, None] / 4
        self.register_buffer("features", (math.sqrt(2) * torch.cos(2 * math.pi * (c * freqs + phases))).float())
        self.weight = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(()))
        self.bins = bins(schedule.num_timesteps)  # u is logged per bin of figure 6, as the x0 MSE

    def u(self, t: Tensor) -> Tensor:
        """u(t) float32 [B] (elementwise ops: autocast leaves them in float32)."""
        return (self.features[t] * self.weight).sum(-1) + self.bias

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
        u = self.u(t)
        return torch.exp(-u), u

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """Mean u over each tenth of the timesteps: exp(u) estimates E[base weight * mse | t] there."""
        u = self.u(torch.arange(self.features.shape[0], device=self.features.device)).double().cpu()
        return {f"learned_u/{bin_name(lo, hi)}": float(u[lo:hi].mean()) for lo, hi in self.bins}


class ParetoWeight(nn.Module):
    """Piecewise-constant x0-space weight: w_k on the k-th of K equal timestep ranges (`minsnr.gram`)."""

    def __init__(self, schedule: Schedule, num_tasks: int = PARETO_TASKS, smoothing: float = PARETO_SMOOTHING) -> None:
        super().__init__()
        num_t = schedule.num_timesteps
        self.ranges = bins(num_t, num_tasks)
        self.smoothing = smoothing
        self.sizes = np.array([hi - lo for lo, hi in self.ranges], dtype=np.float64)
        self.register_buffer("task_of_t", bin_index(self.ranges), persistent=False)
        snr = schedule.snr(torch.arange(num_t, device=schedule.alphas_cumprod.device)).detach().cpu().double()
        start = x0_weight(snr, *PARETO_START)
        self.scale = float(start.mean())  # every w keeps the start's mean weight over t (so the loss scale)
        means = np.array([float(start[lo:hi].mean()) for lo, hi in self.ranges])
        self.register_buffer("weights", torch.from_numpy(self.normalise(means)))  # float64 [K]
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.probe: Any = None  # the fixed TaskBatch, built at the first update (`set_probe`)

    def normalise(self, w: ArrayLike) -> NDArray[np.float64]:
        """w scaled so that the mean weight over all T timesteps, sum_k (n_k / T) w_k, is `scale`."""
        w = np.asarray(w, dtype=np.float64)
        return w * self.scale / float((self.sizes * w).sum() / self.sizes.sum())

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
        w = self.weights[self.task_of_t[t]].float()
        return w, torch.zeros_like(w)

    @torch.no_grad()
    def apply_solution(self, task_weights: ArrayLike) -> None:
        """One update: w <- s w + (1 - s) normalise(task_weights) (both have the same mean over t)."""
        new = self.smoothing * self.weights.cpu().numpy() + (1 - self.smoothing) * self.normalise(task_weights)
        self.weights.copy_(torch.from_numpy(new))  # in place: a captured step reads it there
        self.updates.add_(1)

    def set_probe(self, x0: Tensor, labels: Tensor | None, seed: int) -> None:
        """Fix the probe: `x0` [N, C, H, W] for every task, timesteps and noise drawn from `seed`."""
        gen = torch.Generator().manual_seed(seed)
        self.probe = make_task_batch(
            x0.detach().cpu(), None if labels is None else labels.cpu(), self.ranges, generator=gen
        ).to(self.weights.device)

    def adapt(self, model: nn.Module, schedule: Schedule, target: str, dataset: Any, seed: int) -> None:
        """Eq. 11 on the probe (built from `dataset` and `seed` at the first call): the Gram matrix of the task
        gradients, its UGD optimum (eq. 12-13), one update. Every DDP rank alike (same replicas, same probe);
        outside the training step, one host sync. `model` is the raw module (not DDP- or compile-wrapped)."""
        if self.probe is None:
            self.set_probe(*probe_images(dataset, model, seed), seed)
        self.update_from_gram(gram_matrix(model, self.probe, schedule, target).numpy())

    def update_from_gram(self, gram: ArrayLike) -> None:
        """The UGD optimum of eq. 11 (lambda = PARETO_LAMBDA) on the K x K Gram matrix, smoothed in."""
        self.apply_solution(ugd(gram, PARETO_LAMBDA).weights)

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        w = self.weights.cpu().tolist()
        return {f"pareto_w/{lo:03d}-{hi - 1:03d}": v for (lo, hi), v in zip(self.ranges, w)}


def make_adaptive(weighting: str, schedule: Schedule) -> LearnedWeight | ParetoWeight | None:
    """The state of a stateful weighting (weighting.ADAPTIVE), on the schedule's device; None for a fixed one."""
    if weighting not in ADAPTIVE:
        return None
    module = LearnedWeight(schedule) if weighting == "learned" else ParetoWeight(schedule)
    return module.to(schedule.alphas_cumprod.device)


def probe_images(dataset: Any, model: nn.Module, seed: int, count: int = PARETO_IMAGES) -> tuple[Tensor, Tensor | None]:
    """`count` un-augmented training images chosen by `seed` and their labels (None when unconditional),
    as the `train.pareto_every` monitor chooses them."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=gen)[:count].tolist()
    x, y, _ = dataset.get_batch(idx)
    return x, labels_for(getattr(model, "num_classes", 0), dataset, y)


def average_gradients(module: nn.Module, world: int) -> None:
    """Average `module`'s gradients over the DDP ranks (learned u(t) is trained outside the DDP wrapper)."""
    import torch.distributed as dist

    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)
