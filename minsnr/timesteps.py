"""Distributions of the training timesteps: which denoising tasks a batch trains (section 3.3, eq. 5).

The paper draws t uniformly from {0, ..., T-1}. Here a distribution is a probability mass function p(t)
over the T discrete timesteps (float64 [T]); t is drawn by inverse CDF from one U[0, 1) number per sample,
so a draw is a few kernels with no host sync, and runs that differ only in the distribution still share
their random numbers (a monotone coupling: the same u gives neighbouring tasks).

- uniform: p(t) = 1/T, the paper.
- lognormal(mean, std) (EDM, Karras et al. 2022): ln sigma ~ N(mean, std^2) for the VE sigma = SNR^-1/2,
  default EDM's (-1.2, 1.2), EDM2's is (-0.4, 1.0); the mass of that density between the midpoints of
  neighbouring ln sigma_t falls on t.
- logit_normal(mean, std) (rectified-flow practice, e.g. SD3: logit(tau) ~ N(0, 1) for x_tau = (1 - tau) x0
  + tau eps). There SNR = ((1 - tau)/tau)^2, so logit(tau) = ln sigma_VE: lognormal with mean 0, std 1.
- laplace(mu, b), cauchy(mu, scale) (Hang et al. 2024, "Improved noise schedule for diffusion training"):
  ln SNR ~ Laplace(mu, b), default (0, 0.5), or Cauchy(mu, scale), default (0, 1): importance on the middle
  of the log-SNR range. t gets the mass of ln SNR between the midpoints of neighbouring ln SNR_t, exactly.
- speed(threshold) (SpeeD, Wang et al. 2024): asymmetric sampling. Where the VP noise level
  sqrt(1 - alpha-bar_t) still grows by at least `threshold` per step (default 1e-4 at T = 1000, scaled by
  1000/T) p(t) is proportional to 2.5, in the "convergence area" near pure noise where it has flattened, to
  0.5 (their code: tanh(1e6 (grad - threshold)) + 1.5). Their change-aware weighting is P2 (k = 1, gamma
  1) on the eps loss, our `p2`: the whole method is `p2@speed`. Their dual (mirrored) sampling of half of
  each batch is left out: it changes the marginal of t and would need two draws per sample, breaking
  common random numbers (docs/math.md).
- importance: p(t) proportional to w(t), the loss weight in the target's own space (appendix B). The
  weight is then divided by T p(t), which leaves the constant sum_s w(s) / T: E_p[loss] is the uniform-t
  weighted loss, the same objective and expected gradient, with the weighting moved into the sampling.

Every other distribution changes the objective to sum_t p(t) w(t) E||target - prediction||^2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from minsnr.registry import lookup
from minsnr.schedule import Schedule
from minsnr.weighting import ADAPTIVE, Strategy, loss_weight, parse_weighting


@dataclass(frozen=True)
class Distribution:
    """A registry entry: pmf(schedule, w, **params) -> p float64 [T] (w: the target-space loss weight per t)."""

    pmf: Callable[..., Tensor]
    same_objective: bool = False  # divide the loss weight by T p(t) (importance sampling)
    params: tuple[tuple[str, float], ...] = ()  # (name, default), in the order of the `@name(a, b)` spec
    positive: tuple[str, ...] = ()  # parameters that must be > 0 (the others: any finite number)

    def resolve(self, name: str, given: Mapping[str, float] | None) -> dict[str, float]:
        """The defaults updated by `given`; ValueError naming an unknown parameter or a value out of range."""
        values = dict(self.params)
        for key, value in (given or {}).items():
            if key not in values:
                valid = ", ".join(values) or "none"
                raise ValueError(f"timestep distribution {name} has no parameter {key!r}; its parameters: {valid}")
            if not math.isfinite(value) or (key in self.positive and not value > 0):
                raise ValueError(
                    f"{name}({key}={value:g}): {key} must be {'> 0' if key in self.positive else 'finite'}"
                )
            values[key] = float(value)
        return values

    def signature(self, name: str) -> str:
        """'laplace(mu=0, b=0.5)', as the choices table shows it."""
        return f"{name}({', '.join(f'{k}={v:g}' for k, v in self.params)})" if self.params else name


def uniform_pmf(schedule: Schedule, w: Tensor) -> Tensor:
    return torch.full_like(schedule.alphas_cumprod, 1.0 / schedule.num_timesteps)


def lognormal_pmf(schedule: Schedule, w: Tensor, mean: float, std: float) -> Tensor:
    """Mass of ln sigma_VE ~ N(mean, std^2) between the midpoints of neighbouring ln sigma_t (ends open)."""
    ls = schedule.log_sigmas  # increasing in t
    edges = torch.cat([ls.new_full((1,), -math.inf), (ls[1:] + ls[:-1]) / 2, ls.new_full((1,), math.inf)])
    cdf = 0.5 * (1 + torch.erf((edges - mean) / (std * math.sqrt(2))))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def _log_snr_mass(schedule: Schedule, cdf: Callable[[Tensor], Tensor]) -> Tensor:
    """Mass of a distribution of ln SNR (its CDF) between the midpoints of neighbouring ln SNR_t (ends open)."""
    lam = -2 * schedule.log_sigmas  # ln SNR, decreasing in t
    inf = lam.new_full((1,), math.inf)
    edges = torch.cat([inf, (lam[1:] + lam[:-1]) / 2, -inf])
    p = cdf(edges[:-1]) - cdf(edges[1:])
    return p / p.sum()


def laplace_pmf(schedule: Schedule, w: Tensor, mu: float, b: float) -> Tensor:
    def cdf(x: Tensor) -> Tensor:
        z = (x - mu) / b
        return torch.where(z < 0, 0.5 * torch.exp(z.clamp(max=0)), 1 - 0.5 * torch.exp(-z.clamp(min=0)))

    return _log_snr_mass(schedule, cdf)


def cauchy_pmf(schedule: Schedule, w: Tensor, mu: float, scale: float) -> Tensor:
    return _log_snr_mass(schedule, lambda x: 0.5 + torch.atan((x - mu) / scale) / math.pi)


SPEED_HIGH, SPEED_LOW = 2.5, 0.5  # SpeeD's tanh(...) + 1.5 on either side of the threshold


def speed_pmf(schedule: Schedule, w: Tensor, threshold: float) -> Tensor:
    """SpeeD's asymmetric sampling (module docstring): 2.5 where d sqrt(1 - alpha-bar_t)/dt >= threshold
    (per step at T = 1000, scaled by 1000/T), 0.5 in the flat "convergence area" near pure noise."""
    grad = torch.gradient((1 - schedule.alphas_cumprod).sqrt())[0]
    fast = grad >= threshold * 1000 / schedule.num_timesteps
    p = torch.where(fast, SPEED_HIGH, SPEED_LOW).to(schedule.alphas_cumprod.dtype)
    return p / p.sum()


def importance_pmf(schedule: Schedule, w: Tensor) -> Tensor:
    return w / w.sum()


# name -> distribution; `loss.timesteps` chooses one (the trainer, compare and the Pareto tools read it).
# The parameters are config keys (`loss.timestep_args`) and spec arguments (`min_snr@lognormal(-0.4,1.0)`).
TIMESTEPS: dict[str, Distribution] = {
    "uniform": Distribution(uniform_pmf),
    "lognormal": Distribution(lognormal_pmf, params=(("mean", -1.2), ("std", 1.2)), positive=("std",)),
    "logit_normal": Distribution(lognormal_pmf, params=(("mean", 0.0), ("std", 1.0)), positive=("std",)),
    "laplace": Distribution(laplace_pmf, params=(("mu", 0.0), ("b", 0.5)), positive=("b",)),
    "cauchy": Distribution(cauchy_pmf, params=(("mu", 0.0), ("scale", 1.0)), positive=("scale",)),
    "speed": Distribution(speed_pmf, params=(("threshold", 1e-4),), positive=("threshold",)),
    "importance": Distribution(importance_pmf, same_objective=True),
}
# the spec variants `minsnr compare --search` tries besides each default (EDM2's lognormal)
SEARCH_VARIANTS: tuple[str, ...] = ("lognormal(-0.4,1)",)
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


def parse_timesteps(text: str) -> tuple[str, dict[str, float]]:
    """'NAME', 'NAME(a,b)' or 'NAME(key=a,key=b)' -> (a key of TIMESTEPS, its parameters with defaults
    filled in); ValueError naming what is wrong (an unknown name or parameter, a value out of range, a
    malformed spec)."""
    name, paren, rest = text.strip().partition("(")
    dist = lookup(TIMESTEPS, name.strip(), "timestep distribution")
    given: dict[str, float] = {}
    if paren:
        if not rest.endswith(")"):
            raise ValueError(f"timestep spec {text!r} is malformed: write {dist.signature(name.strip())}")
        args = [a.strip() for a in rest[:-1].split(",") if a.strip()]
        names = [k for k, _ in dist.params]
        if len(args) > len(names):
            raise ValueError(
                f"timestep spec {text!r} has {len(args)} arguments; {dist.signature(name.strip())} takes {len(names)}"
            )
        for i, arg in enumerate(args):
            key, eq, value = arg.partition("=")
            key, value = (key.strip(), value) if eq else (names[i], arg)
            try:
                given[key] = float(value)
            except ValueError:
                raise ValueError(f"timestep spec {text!r}: {value.strip()!r} is not a number") from None
    return name.strip(), dist.resolve(name.strip(), given)


def timesteps_spec(name: str, params: Mapping[str, float] | None = None) -> str:
    """The canonical spec of a distribution: 'NAME' at its defaults, else 'NAME(a,b)' with every parameter."""
    values = lookup(TIMESTEPS, name, "timestep distribution").resolve(name, params)
    if values == dict(TIMESTEPS[name].params):
        return name
    return f"{name}({','.join(f'{v:g}' for v in values.values())})"


def parse_spec(token: str) -> tuple[str, float | None, str | None]:
    """'NAME[:P][@TIMESTEPS[(ARGS)]]' (min_snr:3, const@logit_normal, min_snr@lognormal(-0.4,1)) ->
    (weighting, its parameter or None, the canonical timestep spec or None); ValueError naming what is
    wrong, including a stateful weighting with importance sampling (`check_weighting`)."""
    head, at, timesteps = token.partition("@")
    name, gamma = parse_weighting(head)
    if not at:
        return name, gamma, None
    dist_name, params = parse_timesteps(timesteps)
    check_weighting(dist_name, name)
    return name, gamma, timesteps_spec(dist_name, params)


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
    distribution: str | Distribution,
    schedule: Schedule,
    weighting: Strategy,
    gamma: float | None,
    target: str,
    params: Mapping[str, float] | None = None,
) -> Timesteps:
    """The distribution (a key of TIMESTEPS, a spec 'NAME(a,b)', or a Distribution) for this schedule,
    weighting and target, with `params` over its defaults. A stateful weighting (weighting.ADAPTIVE) is drawn
    for by its fixed base strategy (`check_weighting` first)."""
    if isinstance(distribution, str):
        name, spec_params = parse_timesteps(distribution)
        if spec_params != dict(TIMESTEPS[name].params) and params:
            raise ValueError(f"timestep parameters given twice: in {distribution!r} and as {dict(params)}")
        dist, values = TIMESTEPS[name], TIMESTEPS[name].resolve(name, params or spec_params)
    else:
        dist, values = distribution, distribution.resolve("distribution", params)
    check_weighting(dist, weighting)
    t = torch.arange(schedule.num_timesteps, device=schedule.alphas_cumprod.device)
    base = ADAPTIVE.get(weighting, weighting) if isinstance(weighting, str) else weighting
    w = loss_weight(schedule.snr(t), base, gamma, target)  # float64: the schedule is float64
    pmf = dist.pmf(schedule, w, **values)
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
