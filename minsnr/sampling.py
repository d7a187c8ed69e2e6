"""Samplers in the VE view of EDM (Karras et al. 2022), as the paper evaluates (section 4.1, app. C.3).

A denoiser D(x, sigma, **cond) returns the x0 estimate for x = x0 + sigma n (sigma: tensor [B]). Every
sampler has the signature `sample_X(denoiser, x, sigmas, cond=None, **options) -> x`, where x is the
starting noise already multiplied by sigmas[0] and sigmas is decreasing and ends in 0. The probability
flow ODE is dx/dsigma = (x - D(x, sigma)) / sigma. The step sizes are read once from `sigmas` (on the
host), so no step synchronises the device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from minsnr.objective import predict_x0
from minsnr.registry import lookup
from minsnr.schedule import Schedule

log = logging.getLogger(__name__)
Denoiser = Callable[..., Tensor]


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM eq. 5: n sigmas from sigma_max to sigma_min evenly spaced in sigma^(1/rho), then 0."""
    if n < 1 or not 0 < sigma_min < sigma_max:
        raise ValueError(f"need n >= 1 and 0 < sigma_min < sigma_max, got {n}, {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _host_sigmas(sigmas: Tensor) -> list[float]:
    s = [float(v) for v in sigmas.tolist()]
    if s[-1] != 0 or any(a <= b for a, b in zip(s, s[1:])):
        raise ValueError("sigmas must be strictly decreasing and end in 0")
    return s


def _call(denoiser: Denoiser, x: Tensor, sigma: float, cond: dict[str, Any]) -> Tensor:
    return denoiser(x, x.new_full((x.shape[0],), sigma), **cond)


def sample_euler(
    denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: dict[str, Any] | None = None, progress: bool = False
) -> Tensor:
    """First-order Euler steps of the probability flow ODE."""
    s, cond = _host_sigmas(sigmas), cond or {}
    for i in tqdm(range(len(s) - 1), disable=not progress, leave=False):
        d = (x - _call(denoiser, x, s[i], cond)) / s[i]
        x = x + (s[i + 1] - s[i]) * d
    return x


def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    cond: dict[str, Any] | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """EDM Algorithm 2: Heun's second-order method, Euler on the last step to sigma = 0.

    With s_churn > 0 noise is added to raise sigma by a factor (1 + gamma) in [s_tmin, s_tmax]
    (the stochastic sampler); s_churn = 0 is the deterministic sampler the paper uses.
    """
    s, cond = _host_sigmas(sigmas), cond or {}
    n = len(s) - 1
    for i in tqdm(range(n), disable=not progress, leave=False):
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= s[i] <= s_tmax else 0.0
        s_hat = s[i] * (1 + gamma)
        if gamma > 0:
            eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            x = x + math.sqrt(s_hat**2 - s[i] ** 2) * s_noise * eps
        d = (x - _call(denoiser, x, s_hat, cond)) / s_hat
        x_next = x + (s[i + 1] - s_hat) * d
        if s[i + 1] > 0:  # second-order correction (trapezoid rule)
            d_next = (x_next - _call(denoiser, x_next, s[i + 1], cond)) / s[i + 1]
            x_next = x + (s[i + 1] - s_hat) * (d + d_next) / 2
        x = x_next
    return x


def sample_ddim(
    denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: dict[str, Any] | None = None, progress: bool = False
) -> Tensor:
    """DDIM with eta = 0 (Song et al. eq. 12) in the VE view: x' = x0_hat + sigma' eps_hat.

    In this view it coincides with an Euler step of the ODE (Karras et al. sec. 3); kept under its
    own name because that is how users ask for it.
    """
    s, cond = _host_sigmas(sigmas), cond or {}
    for i in tqdm(range(len(s) - 1), disable=not progress, leave=False):
        x0 = _call(denoiser, x, s[i], cond)
        x = x0 + s[i + 1] * (x - x0) / s[i]
    return x


# name -> sampler with the module docstring's signature; `sample.sampler` and `minsnr sample --sampler` choose one.
SAMPLERS: dict[str, Callable[..., Tensor]] = {"heun": sample_heun, "euler": sample_euler, "ddim": sample_ddim}
DEFAULT_SAMPLER = "heun"  # EDM's 2nd-order sampler, as the paper evaluates (appendix C.3)


class VPDenoiser:
    """Wraps a model trained on the discrete VP schedule as a VE denoiser, for any target.

    x = x0 + sigma n is the VP state scaled by 1/alpha: alpha = (1 + sigma^2)^-1/2, sigma_vp = sigma alpha,
    x_vp = alpha x, t = schedule.t_from_sigma(sigma) (fractional); the prediction is converted to x0
    with the same alpha and sigma_vp (appendix B algebra), so eps, x0 and v models are all exact.

    The model is called with fractional float t [B] (it sees sigmas between the integer timesteps it
    was trained on); round_timesteps=True rounds t to the nearest integer and passes int64, for models
    that embed t with a table (nn.Embedding).
    """

    def __init__(
        self, model: nn.Module | Callable[..., Tensor], schedule: Schedule, target: str, round_timesteps: bool = False
    ):
        self.model, self.schedule, self.target, self.round = model, schedule, target, round_timesteps

    def __call__(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        """x [B, ...] in the VE view, sigma [B] -> x0 estimate like x."""
        sig = sigma.to(torch.float64)
        alpha = (1 + sig.square()).rsqrt()
        view = (-1,) + (1,) * (x.dim() - 1)
        a, s_vp = alpha.to(x.dtype).view(view), (sig * alpha).to(x.dtype).view(view)
        x_vp = x * a
        t = self.schedule.t_from_sigma(sig).to(x.device)
        t = t.round().long() if self.round else t.to(x.dtype)
        pred = self.model(x_vp, t, labels).to(x.dtype)
        return predict_x0(pred, x_vp, a, s_vp, self.target)


class CFGDenoiser:
    """Classifier-free guidance: D = D(x, null) + scale (D(x, c) - D(x, null)), one batched call of 2B.

    labels: long [B]; null_label: the extra embedding row (= num_classes) trained by label dropout."""

    def __init__(self, denoiser: Denoiser, scale: float, null_label: int):
        self.denoiser, self.scale, self.null_label = denoiser, scale, null_label

    def __call__(self, x: Tensor, sigma: Tensor, labels: Tensor) -> Tensor:
        both = torch.cat([labels, torch.full_like(labels, self.null_label)])
        d_cond, d_null = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), labels=both).chunk(2)
        return d_null + self.scale * (d_cond - d_null)


@torch.no_grad()
def generate(
    model: nn.Module,
    schedule: Schedule,
    target: str,
    labels: Tensor | None,
    *,
    shape: tuple[int, ...],
    sampler: str = DEFAULT_SAMPLER,
    steps: int = 30,
    cfg_scale: float = 1.0,
    num_classes: int = 0,
    generator: torch.Generator | None = None,
    sigma_max: float | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    round_timesteps: bool = False,
    noise: Tensor | None = None,
) -> Tensor:
    """shape[0] samples in model space (pixels in [-1, 1] or scaled latents), float32 [N, ...] on `device`.
    The starting noise is `noise` (standard normal, `shape`) when given, else drawn from `generator`.

    Karras sigmas (rho 7) run from `sigma_max` down to the schedule's sigma_ve_min. `sigma_max` None
    starts at the schedule's sigma_ve_max; a larger value is capped there (with a warning, once), as
    the model never saw a noisier input. labels: long [N] or None (unconditional / null class).
    """
    run = lookup(SAMPLERS, sampler, "sampler")
    device = device or next(model.parameters()).device
    schedule = schedule.to(device)
    top = schedule.sigma_ve_max
    if sigma_max is not None and sigma_max > top:
        _warn_once(f"sample.sigma_max={sigma_max:g} is above the schedule's largest sigma {top:.6g}; starting there")
    elif sigma_max is not None:
        top = sigma_max
    sigmas = karras_sigmas(steps, schedule.sigma_ve_min, top)
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=device)
    x = noise.to(device=device, dtype=torch.float32) * sigmas[0].item()
    denoiser: Denoiser = VPDenoiser(model, schedule, target, round_timesteps)
    if num_classes > 0 and labels is not None and cfg_scale != 1.0:
        denoiser = CFGDenoiser(denoiser, cfg_scale, null_label=num_classes)
    cond = {"labels": labels}
    return run(denoiser, x, sigmas, cond=cond, progress=progress)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)
