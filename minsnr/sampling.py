"""Samplers in the VE view of EDM (Karras et al. 2022), as the paper evaluates (section 4.1, app. C.3).

A denoiser D(x, sigma, **cond) returns the x0 estimate for x = x0 + sigma n (sigma: tensor [B]). Every
sampler has the signature `sample_X(denoiser, x, sigmas, cond=None, **options) -> x`, where x is the
starting noise already multiplied by sigmas[0] and sigmas is decreasing and ends in 0. The probability
flow ODE is dx/dsigma = (x - D(x, sigma)) / sigma. The step sizes are read once from `sigmas` (on the
host), so no step synchronises the device.

Zero terminal SNR (Lin et al. 2024, sec. 3.3-3.4): sigmas[0] may be inf, the VE sigma of SNR 0, where
x0 + inf n cannot be represented. Then x is the pure noise n itself (the VP state at t = T-1) and every
sampler takes the first step in closed form, DDIM's from SNR 0: x0_hat = D(n, inf) and, the eps estimate at
alpha = 0 being n itself, x = x0_hat + sigmas[1] n; it goes on from sigmas[1] as usual.

Spacing (`sample.spacing`, SPACINGS): karras (EDM eq. 5, rho 7) between the schedule's sigma at t = 0 and at
T-1, or trailing (Lin et al. sec. 3.3): the integer timesteps round(T - i T/n) - 1, i = 0..n-1, which
always include T-1 (T = 1000, n = 10: 999, 899, ..., 99).
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


def _from_pure_noise(denoiser: Denoiser, x: Tensor, s: list[float], cond: dict[str, Any]) -> tuple[Tensor, list[float]]:
    """sigmas[0] = inf (module docstring): the closed-form DDIM step from SNR 0 (Lin et al. sec. 3.4),
    x0_hat + s[1] n, and the sigmas left; anything else is returned unchanged."""
    if not math.isinf(s[0]):
        return x, s
    return _call(denoiser, x, s[0], cond) + s[1] * x, s[1:]


def sample_euler(
    denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: dict[str, Any] | None = None, progress: bool = False
) -> Tensor:
    """First-order Euler steps of the probability flow ODE."""
    s, cond = _host_sigmas(sigmas), cond or {}
    x, s = _from_pure_noise(denoiser, x, s, cond)
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
    (the stochastic sampler); s_churn = 0 is the deterministic sampler the paper uses. A first step from
    sigma = inf is the closed-form DDIM step (module docstring), without churn or correction.
    """
    s, cond = _host_sigmas(sigmas), cond or {}
    x, s = _from_pure_noise(denoiser, x, s, cond)
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
    x, s = _from_pure_noise(denoiser, x, s, cond)
    for i in tqdm(range(len(s) - 1), disable=not progress, leave=False):
        x0 = _call(denoiser, x, s[i], cond)
        x = x0 + s[i + 1] * (x - x0) / s[i]
    return x


# name -> sampler with the module docstring's signature; `sample.sampler` and `minsnr sample --sampler` choose one.
SAMPLERS: dict[str, Callable[..., Tensor]] = {"heun": sample_heun, "euler": sample_euler, "ddim": sample_ddim}
DEFAULT_SAMPLER = "heun"  # EDM's 2nd-order sampler, as the paper evaluates (appendix C.3)


def _karras_spacing(schedule: Schedule, steps: int, sigma_max: float | None) -> Tensor:
    """Karras sigmas from sigma_max (None: the schedule's largest; a larger one is capped there, warned once)
    to sigma_ve_min. With zero terminal SNR and no sigma_max: inf (pure noise at T-1), then steps - 1 Karras
    sigmas from the largest finite one, sigma_ve(T-2), so that there are `steps` steps in all."""
    top = schedule.sigma_ve_max
    if sigma_max is not None and sigma_max > top:
        _warn_once(f"sample.sigma_max={sigma_max:g} is above the schedule's largest sigma {top:.6g}; starting there")
    elif sigma_max is not None:
        top = sigma_max
    if not math.isinf(top):
        return karras_sigmas(steps, schedule.sigma_ve_min, top)
    inf = torch.full((1,), math.inf, dtype=torch.float64)
    if steps == 1:
        return torch.cat([inf, inf.new_zeros(1)])
    return torch.cat([inf, karras_sigmas(steps - 1, schedule.sigma_ve_min, math.exp(schedule.log_sigmas[-2].item()))])


def trailing_timesteps(num_timesteps: int, steps: int) -> Tensor:
    """Lin et al. sec. 3.3, table 2: round(T - i T/n) - 1 for i = 0..n-1 (their round(arange(T, 0, -T/n)) - 1,
    written with an integer range so that no float step adds an n+1-th value), long [n], from T-1 down."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sample.spacing=trailing needs 1 <= sample.steps <= {num_timesteps}, got {steps}")
    i = torch.arange(steps, dtype=torch.float64)
    return (num_timesteps - i * num_timesteps / steps).round().long() - 1


def _trailing_spacing(schedule: Schedule, steps: int, sigma_max: float | None) -> Tensor:
    """The VE sigmas of `trailing_timesteps`, then 0 (the last step goes from t = round(T/n) - 1 to x0)."""
    if sigma_max is not None:
        raise ValueError(
            f"sample.sigma_max={sigma_max:g} with sample.spacing=trailing: trailing steps start at t = T-1 by "
            "definition; unset sample.sigma_max or use sample.spacing=karras"
        )
    t = trailing_timesteps(schedule.num_timesteps, steps).to(schedule.alphas_cumprod.device)
    sigmas = schedule.sigma_ve(t).cpu()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


# name -> (schedule, steps, sigma_max) -> decreasing sigmas ending in 0; `sample.spacing`, `minsnr sample --spacing`.
SPACINGS: dict[str, Callable[[Schedule, int, float | None], Tensor]] = {
    "karras": _karras_spacing,
    "trailing": _trailing_spacing,
}
DEFAULT_SPACING = "karras"  # EDM's, as the paper evaluates (appendix C.3)


class VPDenoiser:
    """Wraps a model trained on the discrete VP schedule as a VE denoiser, for any target.

    x = x0 + sigma n is the VP state scaled by 1/alpha: alpha = (1 + sigma^2)^-1/2, sigma_vp = sigma alpha,
    x_vp = alpha x, t = schedule.t_from_sigma(sigma) (fractional); the prediction is converted to x0
    with the same alpha and sigma_vp (appendix B algebra), so eps, x0 and v models are all exact.

    The model is called with fractional float t [B] (it sees sigmas between the integer timesteps it
    was trained on); round_timesteps=True rounds t to the nearest integer and passes int64, for models
    that embed t with a table (nn.Embedding).

    sigma = inf (zero terminal SNR) means x is the VP state itself, pure noise (module docstring): the
    model sees x at t = T-1 and its prediction is converted with alpha = 0, sigma_vp = 1 (x0 = -v for v;
    an eps prediction gives no x0 there: `generate` refuses it).
    """

    def __init__(
        self, model: nn.Module | Callable[..., Tensor], schedule: Schedule, target: str, round_timesteps: bool = False
    ):
        self.model, self.schedule, self.target, self.round = model, schedule, target, round_timesteps

    def __call__(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        """x [B, ...] in the VE view, sigma [B] -> x0 estimate like x."""
        sig = sigma.to(torch.float64)
        alpha = (1 + sig.square()).rsqrt()
        pure = sig.isinf()  # x is already the VP state; inf * 0 would be NaN
        view = (-1,) + (1,) * (x.dim() - 1)
        a, s_vp = alpha.to(x.dtype).view(view), torch.where(pure, 1.0, sig * alpha).to(x.dtype).view(view)
        x_vp = x * torch.where(pure, 1.0, alpha).to(x.dtype).view(view)
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
    spacing: str = DEFAULT_SPACING,
    device: torch.device | str | None = None,
    progress: bool = False,
    round_timesteps: bool = False,
    noise: Tensor | None = None,
) -> Tensor:
    """shape[0] samples in model space (pixels in [-1, 1] or scaled latents), float32 [N, ...] on `device`.
    The starting noise is `noise` (standard normal, `shape`) when given, else drawn from `generator`.

    `spacing` (a key of SPACINGS): karras sigmas (rho 7) run from `sigma_max` down to the schedule's
    sigma_ve_min. `sigma_max` None starts at the schedule's sigma_ve_max; a larger value is capped there
    (with a warning, once), as the model never saw a noisier input. trailing: the sigmas of Lin et al.'s
    trailing timesteps (no sigma_max). With zero terminal SNR both start from pure noise at t = T-1 (the
    module docstring), karras only when sigma_max is None. labels: long [N] or None (unconditional / null class).
    """
    run = lookup(SAMPLERS, sampler, "sampler")
    device = device or next(model.parameters()).device
    schedule = schedule.to(device)
    sigmas = lookup(SPACINGS, spacing, "spacing")(schedule, steps, sigma_max)
    pure = math.isinf(sigmas[0].item())
    if pure and target == "eps":
        raise ValueError(
            "target eps on a zero-terminal-SNR schedule: eps prediction cannot give x0 at SNR 0, where sampling "
            "starts; train with target v or x0 (Lin et al. 2024), or pass a finite sigma_max"
        )
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=device)
    x = noise.to(device=device, dtype=torch.float32)
    x = x if pure else x * sigmas[0].item()
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
