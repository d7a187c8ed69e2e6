"""Distributions of the training timesteps: which denoising tasks a batch trains (section 3.3, eq. 5).

The paper draws t uniformly from {0, ..., T-1}. Here a distribution is a probability mass function p(t)
over the T discrete timesteps (float64 [T]); t is drawn by inverse CDF from one U[0, 1) number per sample,
so a draw is a few kernels with no host sync, and runs that differ only in the distribution still share
their random numbers (a monotone coupling: the same u gives neighbouring tasks).

- uniform: p(t) = 1/T, the paper.
- lognormal (EDM, Karras et al. 2022): ln sigma ~ N(-1.2, 1.2^2) for the VE sigma = SNR^-1/2; the mass
  of that density between the midpoints of neighbouring ln sigma_t falls on t.
- logit_normal (rectified-flow practice, e.g. SD3: logit(tau) ~ N(0, 1) for x_tau = (1 - tau) x0 + tau eps).
  There SNR = ((1 - tau)/tau)^2, so logit(tau) = ln sigma_VE: the same family as lognormal, mean 0, std 1.
- importance: p(t) proportional to w(t), the loss weight in the target's own space (appendix B). The
  weight is then divided by T p(t), which leaves the constant sum_s w(s) / T: E_p[loss] is the uniform-t
  weighted loss, the same objective and expected gradient, with the weighting moved into the sampling.

Every other distribution changes the objective to sum_t p(t) w(t) E||target - prediction||^2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from minsnr.registry import lookup
from minsnr.schedule import Schedule
from minsnr.weighting import ADAPTIVE, Strategy, loss_weight, parse_weighting


@dataclass(frozen=True)
class Distribution:
    """A registry entry: pmf(schedule, w) -> p float64 [T] (w: the target-space loss weight per t)."""

    pmf: Callable[[Schedule, Tensor], Tensor]
    same_objective: bool = False  # divide the loss weight by T p(t) (importance sampling)


def uniform_pmf(schedule: Schedule, w: Tensor) -> Tensor:
    return torch.full_like(schedule.alphas_cumprod, 1.0 / schedule.num_timesteps)


def lognormal_pmf(schedule: Schedule, w: Tensor, mean: float, std: float) -> Tensor:
    """Mass of ln sigma_VE ~ N(mean, std^2) between the midpoints of neighbouring ln sigma_t (ends open)."""
    ls = schedule.log_sigmas  # increasing in t
    edges = torch.cat([ls.new_full((1,), -math.inf), (ls[1:] + ls[:-1]) / 2, ls.new_full((1,), math.inf)])
    cdf = 0.5 * (1 + torch.erf((edges - mean) / (std * math.sqrt(2))))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def importance_pmf(schedule: Schedule, w: Tensor) -> Tensor:
    return w / w.sum()


# name -> distribution; `loss.timesteps` chooses one (the trainer, compare and the Pareto tools read it).
TIMESTEPS: dict[str, Distribution] = {
    "uniform": Distribution(uniform_pmf),
    "lognormal": Distribution(lambda s, w: lognormal_pmf(s, w, mean=-1.2, std=1.2)),
    "logit_normal": Distribution(lambda s, w: lognormal_pmf(s, w, mean=0.0, std=1.0)),
    "importance": Distribution(importance_pmf, same_objective=True),
}
DEFAULT_TIMESTEPS = "uniform"


@dataclass(frozen=True)
class Timesteps:
    """A distribution made concrete for one schedule and loss: build once, then `draw` every step."""

    pmf: Tensor  # float64 [T], sums to 1
    cdf: Tensor  # float64 [T]
    correction: Tensor  # float32 [T]: multiplies the loss weight (1, or 1 / (T p(t)) for importance)

    def draw(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """long [batch] timesteps by inverse CDF of U[0, 1) draws from `generator`."""
        u = torch.rand(batch, device=self.cdf.device, dtype=torch.float64, generator=generator)
        return torch.searchsorted(self.cdf, u, right=True).clamp_(max=self.cdf.shape[0] - 1)


def parse_spec(token: str) -> tuple[str, float | None, str | None]:
    """'NAME[:GAMMA][@TIMESTEPS]' (min_snr:3, const@logit_normal, min_snr@importance) -> (weighting, gamma or
    None, timestep distribution or None); ValueError naming what is wrong, including a stateful weighting
    with importance sampling (`check_weighting`)."""
    head, at, timesteps = token.partition("@")
    name, gamma = parse_weighting(head)
    if at:
        lookup(TIMESTEPS, timesteps, "timestep distribution")
        check_weighting(timesteps, name)
    return name, gamma, timesteps or None


def check_weighting(distribution: str | Distribution, weighting: Strategy) -> None:
    """Importance sampling draws t in proportion to a fixed weight; a stateful weighting (weighting.ADAPTIVE)
    changes its weight while training, so the two do not combine (ValueError)."""
    dist = lookup(TIMESTEPS, distribution, "loss.timesteps") if isinstance(distribution, str) else distribution
    if dist.same_objective and isinstance(weighting, str) and weighting in ADAPTIVE:
        others = ", ".join(name for name, d in TIMESTEPS.items() if not d.same_objective)
        raise ValueError(
            f"loss.timesteps={distribution} needs a fixed weight to sample t from, but loss.weighting="
            f"{weighting} changes its weight while training; use loss.timesteps={others} or a "
            "fixed weighting"
        )


def make_timesteps(
    distribution: str | Distribution, schedule: Schedule, weighting: Strategy, gamma: float | None, target: str
) -> Timesteps:
    """The named distribution (a key of TIMESTEPS) for this schedule, weighting and target. A stateful
    weighting (weighting.ADAPTIVE) is drawn for by its fixed base strategy (`check_weighting` first)."""
    check_weighting(distribution, weighting)
    dist = lookup(TIMESTEPS, distribution, "loss.timesteps") if isinstance(distribution, str) else distribution
    t = torch.arange(schedule.num_timesteps, device=schedule.alphas_cumprod.device)
    base = ADAPTIVE.get(weighting, weighting) if isinstance(weighting, str) else weighting
    w = loss_weight(schedule.snr(t), base, gamma, target)  # float64: the schedule is float64
    pmf = dist.pmf(schedule, w)
    if pmf.shape != w.shape or not bool(torch.isfinite(pmf).all()) or bool((pmf < 0).any()) or float(pmf.sum()) <= 0:
        raise ValueError(f"timestep distribution {distribution!r} gave no valid probabilities over {len(w)} steps")
    pmf = pmf / pmf.sum()
    correction = 1.0 / (schedule.num_timesteps * pmf) if dist.same_objective else torch.ones_like(pmf)
    if dist.same_objective and bool((pmf == 0).any()):
        raise ValueError(f"importance sampling needs w(t) > 0 at every t; {weighting!r} has zeros")
    return Timesteps(pmf, torch.cumsum(pmf, 0), correction.float())


NUM_BINS = 10  # figure 6: the loss per tenth of the timesteps

Range = tuple[int, int]


def bins(num_timesteps: int, count: int = NUM_BINS) -> list[Range]:
    """`count` contiguous timestep ranges [lo, hi) covering 0..T-1, sizes differing by at most one (edges
    round(k T / count)): the bins of figure 6 (logged per run, `minsnr losses`, `compare`), the tasks of the
    Pareto analysis (section 3.2) and of the `pareto` weighting."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"number of timestep ranges must be in [1, {num_timesteps}], got {count}")
    edges = [round(i * num_timesteps / count) for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def bin_name(lo: int, hi: int) -> str:
    """'000-099' for the range [0, 100), as metrics are logged."""
    return f"{lo:03d}-{hi - 1:03d}"


def bin_index(ranges: list[Range]) -> Tensor:
    """long [T]: the index of the range each timestep falls in."""
    return torch.cat([torch.full((hi - lo,), k, dtype=torch.long) for k, (lo, hi) in enumerate(ranges)])
