"""The training objective: noise a clean batch, predict, weighted MSE (section 3.1 eq. 2, 4, 5; 3.4).

Targets (appendix B): eps; x0; v = alpha_t eps - sigma_t x0 (Salimans & Ho). With alpha^2 + sigma^2 = 1
any one prediction and x_t determine the others exactly; `predict_x0`, `predict_eps` and `convert`
implement that algebra. alpha and sigma broadcast against x, e.g. shape [B, 1, 1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from minsnr.schedule import Schedule
from minsnr.registry import lookup
from minsnr.timesteps import DEFAULT_TIMESTEPS, TIMESTEPS, Distribution, Timesteps, make_timesteps
from minsnr.weighting import ADAPTIVE, DEFAULT_TARGET, DEFAULT_WEIGHTING, TARGETS, Strategy, loss_weight

# A stateful weighting (minsnr.adaptive): t long [B] -> (scale [B], offset [B]); the per-sample loss becomes
# scale * weight * mse + offset, weight that of the weighting's base strategy (weighting.ADAPTIVE).
Adaptive = Callable[[Tensor], tuple[Tensor, Tensor]]


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; valid names: {', '.join(TARGETS)}")


def q_sample(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Eq. 2: x_t = alpha_t x0 + sigma_t eps. x0, eps [B, ...]; alpha, sigma broadcast ([B, 1, ...])."""
    return alpha * x0 + sigma * eps


def make_target(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, target: str) -> Tensor:
    """The regression target of appendix B: x0, eps, or v = alpha eps - sigma x0; shapes as q_sample."""
    _check_target(target)
    if target == "x0":
        return x0
    if target == "eps":
        return eps
    return alpha * eps - sigma * x0


def predict_x0(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, target: str) -> Tensor:
    """The x0 estimate implied by a prediction `pred` of `target` at x_t (exact algebra, any float dtype)."""
    _check_target(target)
    if target == "x0":
        return pred
    if target == "eps":
        return (x_t - sigma * pred) / alpha
    return alpha * x_t - sigma * pred  # v: alpha x_t - sigma v = (alpha^2 + sigma^2) x0


def predict_eps(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, target: str) -> Tensor:
    """The eps estimate implied by a prediction `pred` of `target` at x_t."""
    _check_target(target)
    if target == "x0":
        return (x_t - alpha * pred) / sigma
    if target == "eps":
        return pred
    return sigma * x_t + alpha * pred  # v: sigma x_t + alpha v = (alpha^2 + sigma^2) eps


def convert(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, src: str, dst: str) -> Tensor:
    """Express a prediction of `src` as a prediction of `dst`."""
    x0 = predict_x0(pred, x_t, alpha, sigma, src)
    eps = predict_eps(pred, x_t, alpha, sigma, src)
    return make_target(x0, eps, alpha, sigma, dst)


def drop_labels(labels: Tensor, p: float, null_label: int, uniform: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Classifier-free guidance training: replace each label by the null class with probability p.

    labels: long [B]; null_label: the extra class index (= num_classes); returns long [B].
    `uniform` (U[0, 1) draws, one per label) may be given so that the choice is reproducible across ranks.
    """
    if p <= 0:
        return labels
    if uniform is None:
        uniform = torch.rand(labels.shape, device=labels.device, generator=generator)
    return torch.where(uniform < p, torch.full_like(labels, null_label), labels)


@dataclass
class LossOutput:
    loss: Tensor  # scalar: mean over the batch of weight * target-space MSE
    t: Tensor  # [B] long timesteps
    mse_x0: Tensor  # [B] unweighted x0-space MSE, detached (figure 6)
    weight: Tensor  # [B] weight applied in the target's space


def _reweights(timesteps: str | Distribution) -> bool:
    return (lookup(TIMESTEPS, timesteps, "loss.timesteps") if isinstance(timesteps, str) else timesteps).same_objective


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def diffusion_loss(model: nn.Module | Callable[..., Tensor], x0: Tensor, labels: Tensor | None,
                   schedule: Schedule, *, target: str = DEFAULT_TARGET, weighting: Strategy = DEFAULT_WEIGHTING,
                   gamma: float | None = None, t: Tensor | None = None, noise: Tensor | None = None,
                   timesteps: str | Distribution | Timesteps = DEFAULT_TIMESTEPS,
                   generator: torch.Generator | None = None, adaptive: Adaptive | None = None) -> LossOutput:
    """Weighted denoising loss (eq. 4-5 with the weight of section 3.4); `model(x_t, t, labels)` predicts `target`.

    x0: float [B, ...] clean data; labels: long [B] or None; noise: like x0 (drawn when None);
    t: long [B] timesteps in [0, T), drawn from `timesteps` when None. `timesteps` is a key of
    minsnr.timesteps.TIMESTEPS, a Distribution, or a `Timesteps` the caller built once (the trainer does);
    with importance sampling the weight is divided by T p(t) (minsnr.timesteps), also for a given t.
    The model receives the integer timesteps t (int64 [B]) as they index the schedule, so an
    `nn.Embedding` of t works; samplers pass fractional float t instead (see `sampling.VPDenoiser`).
    A stateful weighting (`learned`, `pareto`: weighting.ADAPTIVE) needs its state as `adaptive`
    (minsnr.adaptive): the loss is then mean(scale(t) * base weight * mse + offset(t)).
    """
    _check_target(target)
    ts = timesteps if isinstance(timesteps, Timesteps) else None
    if ts is None and (t is None or _reweights(timesteps)):  # type: ignore[arg-type]
        ts = make_timesteps(timesteps, schedule, weighting, gamma, target)  # type: ignore[arg-type]
    if isinstance(weighting, str) and weighting in ADAPTIVE:
        if adaptive is None:
            raise ValueError(f"weighting {weighting!r} is stateful: pass adaptive=minsnr.adaptive.make_adaptive(...)")
        weighting = ADAPTIVE[weighting]
    elif adaptive is not None:
        raise ValueError(f"adaptive= is given but weighting {weighting!r} is fixed; use 'learned' or 'pareto'")
    if t is None:
        t = ts.draw(x0.shape[0], generator)  # type: ignore[union-attr]
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    alpha, sigma = _bcast(schedule.alpha(t), x0), _bcast(schedule.sigma(t), x0)
    x_t = q_sample(x0, noise, alpha, sigma)
    pred = model(x_t, t, labels).float()
    dims = tuple(range(1, x0.dim()))
    mse = (pred - make_target(x0, noise, alpha, sigma, target)).square().mean(dim=dims)
    weight = loss_weight(schedule.snr(t), weighting, gamma, target).to(mse.dtype)
    if ts is not None:
        weight = weight * ts.correction[t]
    offset = None
    if adaptive is not None:
        scale, offset = adaptive(t)
        weight = weight * scale.to(mse.dtype)
    with torch.no_grad():
        mse_x0 = (predict_x0(pred, x_t, alpha, sigma, target) - x0).square().mean(dim=dims)
    loss = (weight * mse if offset is None else weight * mse + offset.to(mse.dtype)).mean()
    return LossOutput(loss=loss, t=t, mse_x0=mse_x0, weight=weight.detach() if adaptive is not None else weight)
