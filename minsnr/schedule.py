"""Discrete variance-preserving noise schedules (paper section 3.1, eq. 1-2).

x_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(alpha-bar_t), sigma_t = sqrt(1 - alpha-bar_t),
SNR(t) = alpha_t^2 / sigma_t^2 (section 3.4). Samplers use the VE view x / alpha_t = x0 + s n with
s = sigma_t / alpha_t = SNR^-1/2; `t_from_sigma` maps such an s back to a fractional timestep by linear
interpolation in log s, and `sigma_ve` of a fractional t interpolates the same way, so the two are
exact inverses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Schedule:
    """alpha-bar_t for t = 0..T-1 and what derives from it. Index methods take long t [B] (any shape)
    and return float64 of the same shape; `sigma_ve` and `t_from_sigma` also take fractional t / sigma."""

    alphas_cumprod: Tensor  # float64 [T], strictly decreasing in t

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
    def log_sigmas(self) -> Tensor:
        """log of the VE sigma at every integer timestep, increasing in t."""
        a = self.alphas_cumprod
        return 0.5 * (torch.log1p(-a) - torch.log(a))

    @property
    def sigma_ve_min(self) -> float:
        """The smallest VE sigma, at t = 0 (where samplers stop before the final step to 0)."""
        return math.exp(self.log_sigmas[0].item())

    @property
    def sigma_ve_max(self) -> float:
        """The largest VE sigma, at t = T-1 (20,291 for cosine, T = 1000): no sampler can start above it."""
        return math.exp(self.log_sigmas[-1].item())

    def sigma_ve(self, t: Tensor) -> Tensor:
        """SNR(t)^-1/2; integer t exactly, fractional t by linear interpolation in log-sigma."""
        if not t.is_floating_point():
            return self.snr(t).rsqrt()
        ls = self.log_sigmas
        t = t.to(torch.float64).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        return torch.exp(torch.lerp(ls[low], ls[low + 1], w))

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        """Inverse of `sigma_ve`: fractional float64 timestep, clamped to [0, T-1]."""
        ls = self.log_sigmas
        log_s = sigma.to(ls.device, torch.float64).log()
        high = torch.searchsorted(ls, log_s).clamp(1, self.num_timesteps - 1)
        low = high - 1
        w = ((log_s - ls[low]) / (ls[high] - ls[low])).clamp(0, 1)
        return low + w


# name -> alphas_cumprod(T); `schedule.name` chooses one.
SCHEDULES: dict[str, Callable[[int], Tensor]] = {"cosine": cosine_alphas_cumprod, "linear": linear_alphas_cumprod}


def make_schedule(name: str, num_timesteps: int = 1000) -> Schedule:
    """The named schedule (a key of SCHEDULES) with T = num_timesteps discrete steps."""
    return Schedule(lookup(SCHEDULES, name, "schedule.name")(num_timesteps))
