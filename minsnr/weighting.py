"""Loss weights of section 3.4, converted to the target's own space by appendix B.

Strategies are named by their weight on the x0-space MSE:
    const         1
    snr           SNR
    max_snr       max(SNR, gamma)           truncated SNR of Salimans & Ho, default gamma 1
    min_snr       min(SNR, gamma)           Min-SNR-gamma, the paper's proposal, default gamma 5
    soft_min_snr  1 / (1/SNR + 1/gamma)     a smooth min, default gamma 5
    plain         1, SNR, SNR + 1           weight 1 in the target's own space (x0, eps, v): the plain MSE
                                            of that target, the paper's baseline for v (section 4.2)
or any callable snr -> x0-space weight.

Two weightings have state that training updates, so they are not functions of SNR alone (ADAPTIVE: name ->
the fixed base strategy they multiply; the state lives in minsnr.adaptive, docs/math.md says why):
    learned       exp(-u(t)) * plain + u(t)    EDM2's uncertainty weighting, u a tiny module trained jointly
    pareto        piecewise-constant w_k        a smoothed UGD optimum of eq. 11, refreshed every loss.adapt_every

Appendix B: ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2 and ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2,
so the weight applied to the eps-space MSE is w/SNR and to the v-space MSE is w/(SNR + 1). Then one
strategy is one objective whatever the target (min_snr with v is min(SNR, gamma)/(SNR + 1), never
min(SNR + 1, gamma)/(SNR + 1)).

Limits: weights are computed in float32 (float64 for float64 input) after clamping SNR to
[SNR_FLOOR, SNR_CEIL] = [1e-10, 1e10]. So SNR = 0 (zero terminal SNR) and SNR = inf give finite
weights, equal to the strategy's value at the clamp: min_snr/eps at SNR = 0 is min(1e-10, 5)/1e-10 = 1,
its true limit; const/eps at SNR = 0 is 1e10 (the true limit is infinite).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from minsnr.registry import check, did_you_mean

SNR_FLOOR = 1e-10
SNR_CEIL = 1e10
TARGETS = ("x0", "eps", "v")  # the prediction targets of appendix B
DEFAULT_TARGET = "x0"  # the paper's default (section 4.1)
DEFAULT_WEIGHTING = "min_snr"  # with STRATEGIES' default gamma, 5

WeightFn = Callable[[Tensor], Tensor]
Strategy = str | WeightFn


def _plain(snr: Tensor, gamma: float, target: str) -> Tensor:
    """Weight 1 in the target's own space, i.e. in x0 terms 1, SNR, SNR + 1 (appendix B)."""
    return torch.ones_like(snr) if target == "x0" else snr if target == "eps" else snr + 1


# name -> (x0-space weight(snr, gamma, target), default gamma or None when gamma is unused); `loss.weighting`.
# Only `plain` reads the target: it is the plain MSE of each target (the paper's v baseline, section 4.2).
STRATEGIES: dict[str, tuple[Callable[[Tensor, float, str], Tensor], float | None]] = {
    "const": (lambda snr, g, target: torch.ones_like(snr), None),
    "snr": (lambda snr, g, target: snr, None),
    "max_snr": (lambda snr, g, target: snr.clamp(min=g), 1.0),
    "min_snr": (lambda snr, g, target: snr.clamp(max=g), 5.0),
    "soft_min_snr": (lambda snr, g, target: snr * g / (snr + g), 5.0),
    "plain": (_plain, None),
}

# Stateful weightings (minsnr.adaptive): name -> the STRATEGIES entry they multiply; they take no gamma.
ADAPTIVE: dict[str, str] = {"learned": "plain", "pareto": "const"}
WEIGHTINGS = (*STRATEGIES, *ADAPTIVE)  # every valid `loss.weighting`


def parse_weighting(text: str) -> tuple[str, float | None]:
    """'NAME' or 'NAME:GAMMA' -> (a name of WEIGHTINGS, gamma or None for the strategy's default); ValueError
    naming what is wrong. Only strategies with a default gamma take one, and it must be > 0."""
    name, colon, gamma_text = text.partition(":")
    if name not in WEIGHTINGS:
        raise ValueError(
            f"{name!r} is not a weighting{did_you_mean(name, WEIGHTINGS)}; choose from {', '.join(WEIGHTINGS)}"
        )
    if not colon:
        return name, None
    takes = [n for n, (_, g) in STRATEGIES.items() if g is not None]
    try:
        gamma = float(gamma_text)
    except ValueError:
        raise ValueError(f"gamma {gamma_text!r} is not a number") from None
    if name not in takes or not gamma > 0:
        raise ValueError(f"only {', '.join(takes)} take a gamma > 0")
    return name, gamma


def _prepare(snr: Tensor) -> Tensor:
    dtype = torch.float64 if snr.dtype == torch.float64 else torch.float32
    return snr.to(dtype).clamp(SNR_FLOOR, SNR_CEIL)


def _x0_weight(snr: Tensor, strategy: Strategy, gamma: float | None, target: str) -> Tensor:
    check(target, TARGETS, "target")
    if callable(strategy):
        return strategy(snr).to(snr.dtype)
    if strategy in ADAPTIVE:
        raise ValueError(
            f"weighting {strategy!r} has no fixed weight: its state is trained with the model "
            "(minsnr.adaptive); pass diffusion_loss(..., adaptive=...) or a fixed strategy"
        )
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown weighting {strategy!r}; valid names: {', '.join(STRATEGIES)} or a callable")
    fn, default_gamma = STRATEGIES[strategy]
    g = default_gamma if gamma is None else gamma
    if g is not None and not g > 0:
        raise ValueError(f"gamma must be > 0, got {g}")
    return fn(snr, g, target)  # type: ignore[arg-type]


def x0_weight(snr: Tensor, strategy: Strategy, gamma: float | None = None, target: str = "x0") -> Tensor:
    """The strategy's weight on the x0-space MSE (section 3.4): float32 (float64 for float64 snr), like snr.
    `target` matters only for `plain`."""
    return _x0_weight(_prepare(snr), strategy, gamma, target)


def loss_weight(snr: Tensor, strategy: Strategy, gamma: float | None = None, target: str = "x0") -> Tensor:
    """Weight multiplying the MSE measured in `target`'s own space (appendix B conversion).

    snr: SNR(t) of any shape and float dtype; returns float32 (float64 for float64 snr) of that shape,
    finite for every snr in [0, inf]. gamma None takes the strategy's default from STRATEGIES."""
    s = _prepare(snr)
    w = _x0_weight(s, strategy, gamma, target)  # for plain: SNR / SNR and (SNR+1) / (SNR+1), exactly 1 in IEEE
    if target == "eps":
        return w / s
    if target == "v":
        return w / (s + 1)
    return w
