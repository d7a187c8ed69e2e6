"""Discrete variance-preserving noise schedules (paper section 3.1, eq. 1-2).

x_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(alpha-bar_t), sigma_t = sqrt(1 - alpha-bar_t),
SNR(t) = alpha_t^2 / sigma_t^2 (section 3.4). Samplers use the VE view x / alpha_t = x0 + s n with
s = sigma_t / alpha_t = SNR^-1/2; `t_from_sigma` maps such an s back to a fractional timestep by linear
interpolation in log s, and `sigma_ve` of a fractional t interpolates the same way, so the two are
exact inverses.

Zero terminal SNR (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed",
Algorithm 1): `rescale_zero_terminal_snr` shifts and scales sqrt(alpha-bar) so that alpha-bar_{T-1} = 0
exactly and alpha-bar_0 is kept. Then SNR(T-1) = 0, alpha_{T-1} = 0, sigma_{T-1} = 1 and the VE sigma
and log_sigmas[-1] are +inf; on the last interval [T-2, T-1], where log s is unbounded, `sigma_ve` and
`t_from_sigma` interpolate 1/s = sqrt(SNR) linearly instead (to 0 at T-1), again exact inverses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from minsnr.registry import lookup


def cosine_alphas_cumprod(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal: alpha-bar(u) = f(u)/f(0), f(u) = cos^2(((u/T)+s)/(1+s) pi/2); betas clipped."""
    u = torch.arange(num_timesteps + 1, dtype=torch.float64)
    f = torch.cos((u / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, dim=0)


def linear_alphas_cumprod(num_timesteps: int) -> Tensor:
    """Ho et al.: betas linear from 1e-4 to 0.02, scaled by 1000/T so any T spans the same range."""
    scale = 1000 / num_timesteps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Lin et al. 2024, Algorithm 1: sqrt(ab) <- (sqrt(ab) - sqrt(ab)[-1]) sqrt(ab)[0] / (sqrt(ab)[0] - sqrt(ab)[-1]).

    Computed as alpha-bar_0 r^2 with r = (sqrt(ab) - sqrt(ab)[-1]) / (sqrt(ab)[0] - sqrt(ab)[-1]), so that
    r_0 = 1 and r_{T-1} = 0 exactly: alpha-bar_0 is kept bit for bit and alpha-bar_{T-1} is exactly 0 (their
    re-derived betas are 1 - alpha-bar_t / alpha-bar_{t-1}, the last one 1; only alpha-bar is stored here)."""
    root = alphas_cumprod.sqrt()
    r = (root - root[-1]) / (root[0] - root[-1])
    return alphas_cumprod[0] * r.square()


@dataclass(frozen=True)
class Schedule:
    """alpha-bar_t for t = 0..T-1 and what derives from it. Index methods take long t [B] (any shape)
    and return float64 of the same shape; `sigma_ve` and `t_from_sigma` also take fractional t / sigma."""

    alphas_cumprod: Tensor  # float64 [T], strictly decreasing in t; the last may be exactly 0 (zero terminal SNR)

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def to(self, device: torch.device | str) -> Schedule:
        return Schedule(self.alphas_cumprod.to(device))

    def alpha(self, t: Tensor) -> Tensor:
        return self.alphas_cumprod[t].sqrt()

    def sigma(self, t: Tensor) -> Tensor:
        return (1 - self.alphas_cumprod[t]).sqrt()

    def snr(self, t: Tensor) -> Tensor:
        a = self.alphas_cumprod[t]
        return a / (1 - a)

    @property
    def zero_terminal_snr(self) -> bool:
        """SNR(T-1) == 0 exactly (Lin et al. 2024): x_{T-1} is pure noise, and the VE sigma there is inf."""
        return bool(self.alphas_cumprod[-1] == 0)

    @property
    def log_sigmas(self) -> Tensor:
        """log of the VE sigma at every integer timestep, increasing in t (+inf at SNR 0)."""
        a = self.alphas_cumprod
        return 0.5 * (torch.log1p(-a) - torch.log(a))

    @property
    def sigma_ve_min(self) -> float:
        """The smallest VE sigma, at t = 0 (where samplers stop before the final step to 0)."""
        return math.exp(self.log_sigmas[0].item())

    @property
    def sigma_ve_max(self) -> float:
        """The largest VE sigma, at t = T-1 (20,291 for cosine, T = 1000): no sampler can start above it.
        inf with zero terminal SNR (samplers then start from pure noise, minsnr.sampling)."""
        return math.exp(self.log_sigmas[-1].item())

    def sigma_ve(self, t: Tensor) -> Tensor:
        """SNR(t)^-1/2; integer t exactly (inf at SNR 0), fractional t by linear interpolation in log-sigma
        (with zero terminal SNR, on [T-2, T-1] in 1/sigma: the module docstring)."""
        if not t.is_floating_point():
            return self.snr(t).rsqrt()
        ls = self.log_sigmas
        t = t.to(torch.float64).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        sigma = torch.exp(torch.lerp(ls[low], ls[low + 1], w))
        # zero terminal SNR: on [T-2, T-1] 1/sigma falls linearly to 0 (log sigma has no finite end to lerp to)
        tail = ls[-2].exp() / (1 - w)
        return torch.where(ls[-1].isinf() & (low == self.num_timesteps - 2), tail, sigma)

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        """Inverse of `sigma_ve`: fractional float64 timestep, clamped to [0, T-1]."""
        ls = self.log_sigmas
        sigma = sigma.to(ls.device, torch.float64)
        log_s = sigma.log()
        high = torch.searchsorted(ls, log_s).clamp(1, self.num_timesteps - 1)
        low = high - 1
        w = ((log_s - ls[low]) / (ls[high] - ls[low])).clamp(0, 1)
        # zero terminal SNR: above sigma_{T-2} invert sigma_ve's tail, sigma = sigma_{T-2} / (1 - w); inf -> T-1
        tail = (self.num_timesteps - 2) + (1 - ls[-2].exp() / sigma).clamp(0, 1)
        return torch.where(ls[-1].isinf() & (log_s > ls[-2]), tail, low + w)


# name -> alphas_cumprod(T); `schedule.name` chooses one.
SCHEDULES: dict[str, Callable[[int], Tensor]] = {"cosine": cosine_alphas_cumprod, "linear": linear_alphas_cumprod}


class ScheduleSettings(Protocol):
    """What `schedule_of` reads: a run config's `schedule` section."""

    name: str
    num_timesteps: int
    zero_terminal_snr: bool


def schedule_of(settings: ScheduleSettings) -> Schedule:
    """The schedule a run's config names (cfg.schedule): every verb builds it through here."""
    return make_schedule(settings.name, settings.num_timesteps, settings.zero_terminal_snr)


def make_schedule(name: str, num_timesteps: int = 1000, zero_terminal_snr: bool = False) -> Schedule:
    """The named schedule (a key of SCHEDULES) with T = num_timesteps discrete steps; zero_terminal_snr
    rescales it to SNR(T-1) = 0 (`rescale_zero_terminal_snr`, `schedule.zero_terminal_snr`)."""
    alphas_cumprod = lookup(SCHEDULES, name, "schedule.name")(num_timesteps)
    if zero_terminal_snr and num_timesteps < 2:
        raise ValueError(f"schedule.zero_terminal_snr needs schedule.num_timesteps >= 2, got {num_timesteps}")
    return Schedule(rescale_zero_terminal_snr(alphas_cumprod) if zero_terminal_snr else alphas_cumprod)
