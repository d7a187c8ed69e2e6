"""The algebra of the training objective (section 3.1 eq. 2, 4, 5): the forward process, the regression
targets and the conversions between predictions. The loss itself is minsnr.loss.

Targets (appendix B): eps; x0; v = alpha_t eps - sigma_t x0 (Salimans & Ho). With alpha^2 + sigma^2 = 1
any one prediction and x_t determine the others exactly; `predict_x0`, `predict_eps` and `convert`
implement that algebra. alpha and sigma broadcast against x, e.g. shape [B, 1, 1, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

from minsnr.registry import check
from minsnr.weighting import TARGETS


def q_sample(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Eq. 2: x_t = alpha_t x0 + sigma_t eps. x0, eps [B, ...]; alpha, sigma broadcast ([B, 1, ...])."""
    return alpha * x0 + sigma * eps


def make_target(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, target: str) -> Tensor:
    """The regression target of appendix B: x0, eps, or v = alpha eps - sigma x0; shapes as q_sample."""
    check(target, TARGETS, "target")
    if target == "x0":
        return x0
    if target == "eps":
        return eps
    return alpha * eps - sigma * x0


def predict_x0(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, target: str) -> Tensor:
    """The x0 estimate implied by a prediction `pred` of `target` at x_t (exact algebra, any float dtype)."""
    check(target, TARGETS, "target")
    if target == "x0":
        return pred
    if target == "eps":
        return (x_t - sigma * pred) / alpha
    return alpha * x_t - sigma * pred  # v: alpha x_t - sigma v = (alpha^2 + sigma^2) x0


def predict_eps(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, target: str) -> Tensor:
    """The eps estimate implied by a prediction `pred` of `target` at x_t."""
    check(target, TARGETS, "target")
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


def drop_labels(
    labels: Tensor, p: float, null_label: int, uniform: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Classifier-free guidance training: replace each label by the null class with probability p.

    labels: long [B]; null_label: the extra class index (= num_classes); returns long [B].
    `uniform` (U[0, 1) draws, one per label) may be given so that the choice is reproducible across ranks.
    """
    if p <= 0:
        return labels
    if uniform is None:
        uniform = torch.rand(labels.shape, device=labels.device, generator=generator)
    return torch.where(uniform < p, torch.full_like(labels, null_label), labels)
