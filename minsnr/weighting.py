"""Loss weights of section 3.4, converted to the target's own space by appendix B.

Strategies are named by their weight on the x0-space MSE (the eps-space weight is that / SNR):
    const         1                            eps-space 1/SNR
    snr           SNR                          eps-space 1: the plain eps MSE (Ho et al.)
    max_snr       max(SNR, gamma)              truncated SNR of Salimans & Ho, default gamma 1
    min_snr       min(SNR, gamma)              Min-SNR-gamma, the paper's proposal, default gamma 5
    soft_min_snr  SNR gamma / (SNR + gamma)    a smooth min, default gamma 5; = sigmoid with b = ln gamma
    sigmoid       SNR sigmoid(b - ln SNR)      Kingma & Gao 2023: eps-space sigmoid(b - ln SNR), default b 0
    p2            SNR / (k + SNR)^gamma        Choi et al. 2022 (P2): eps-space 1/(k + SNR)^gamma, k = 1, gamma 1
    debiased      sqrt(SNR)                    Yu et al. 2024: eps-space 1/sqrt(SNR) (capped: see Limits)
    edm           SNR + 1/sigma_data^2         Karras et al. 2022: lambda(sigma) = (sigma^2 + sigma_data^2) /
                                               (sigma sigma_data)^2 with sigma^2 = 1/SNR; default sigma_data 0.5
    plain         1, SNR, SNR + 1              weight 1 in the target's own space (x0, eps, v): the plain MSE
                                               of that target, the paper's baseline for v (section 4.2)
or any callable snr -> x0-space weight. The one parameter of a strategy (gamma, b, sigma_data) is passed in
the `gamma` position (`loss.gamma`, `NAME:P`). Coincidences (docs/math.md): sigmoid:b is soft_min_snr with
gamma = e^b exactly (one function here), so p2:1 = sigmoid:0 = soft_min_snr:1 = SNR/(1 + SNR); edm with
sigma_data = 1 is SNR + 1, the plain v MSE.

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
its true limit; const/eps at SNR = 0 is 1e10 (the true limit is infinite); debiased/eps, 1/sqrt(SNR), is
capped at 1/sqrt(1e-10) = 1e5 (also infinite in the limit); sigmoid/eps and p2/eps tend to 1, edm/eps to
1/sigma_data^2 / 1e-10.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

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


def _sigmoid(snr: Tensor, b: float) -> Tensor:
    """SNR sigmoid(b - ln SNR) = SNR e^b / (SNR + e^b): the eps-space sigmoid weight of Kingma & Gao (2023),
    in x0 terms; torch.sigmoid keeps it finite for every b and SNR."""
    return snr * torch.sigmoid(b - snr.log())


@dataclass(frozen=True)
class Weighting:
    """A fixed strategy: its x0-space weight(snr, p, target) and its one parameter, if any."""

    x0: Callable[[Tensor, float, str], Tensor]
    default: float | None = None  # the parameter's default; None: the strategy takes no parameter
    param: str = "gamma"  # the parameter's name in docs and errors (passed as `gamma`)
    positive: bool = True  # the parameter must be > 0 (else: any finite number)
    grid: tuple[float, ...] = ()  # the values `minsnr compare --search` tries by default (else the default)

    def check(self, name: str, value: float) -> None:
        """ValueError naming the strategy, its parameter, the value and the valid range."""
        if self.default is None:
            raise ValueError(f"{name} takes no parameter (got {value:g})")
        if not math.isfinite(value) or (self.positive and not value > 0):
            valid = "> 0" if self.positive else "a finite number"
            raise ValueError(f"{name}:{value:g}: its {self.param} must be {valid}")


# name -> fixed strategy; `loss.weighting`. Only `plain` reads the target: it is the plain MSE of each target
# (the paper's v baseline, section 4.2). Sources and both spaces of every entry: docs/math.md.
STRATEGIES: dict[str, Weighting] = {
    "const": Weighting(lambda snr, g, target: torch.ones_like(snr)),
    "snr": Weighting(lambda snr, g, target: snr),
    "max_snr": Weighting(lambda snr, g, target: snr.clamp(min=g), 1.0),
    "min_snr": Weighting(lambda snr, g, target: snr.clamp(max=g), 5.0, grid=(1.0, 2.0, 5.0, 10.0)),
    "soft_min_snr": Weighting(lambda snr, g, target: _sigmoid(snr, math.log(g)), 5.0),
    "sigmoid": Weighting(lambda snr, b, target: _sigmoid(snr, b), 0.0, "b", positive=False, grid=(-2.0, 0.0, 2.0)),
    "p2": Weighting(lambda snr, g, target: snr / (1 + snr) ** g, 1.0, grid=(0.5, 1.0)),
    "debiased": Weighting(lambda snr, g, target: snr.sqrt()),
    "edm": Weighting(lambda snr, s, target: snr + 1 / s**2, 0.5, "sigma_data", grid=(0.5, 1.0)),
    "plain": Weighting(_plain),
}

# Stateful weightings (minsnr.adaptive): name -> the STRATEGIES entry they multiply; they take no gamma.
ADAPTIVE: dict[str, str] = {"learned": "plain", "pareto": "const"}
WEIGHTINGS = (*STRATEGIES, *ADAPTIVE)  # every valid `loss.weighting`


def parse_weighting(text: str) -> tuple[str, float | None]:
    """'NAME' or 'NAME:P' -> (a name of WEIGHTINGS, its parameter or None for the strategy's default);
    ValueError naming what is wrong (`check_parameter`)."""
    name, colon, value_text = text.partition(":")
    if name not in WEIGHTINGS:
        raise ValueError(
            f"{name!r} is not a weighting{did_you_mean(name, WEIGHTINGS)}; choose from {', '.join(WEIGHTINGS)}"
        )
    if not colon:
        return name, None
    try:
        value = float(value_text)
    except ValueError:
        raise ValueError(f"{name}:{value_text}: the parameter {value_text!r} is not a number") from None
    check_parameter(name, value)
    return name, value


def check_parameter(name: str, value: float) -> None:
    """ValueError unless strategy `name` takes a parameter and `value` is in its range (gamma > 0, b finite,
    sigma_data > 0); the message names the valid range and the strategies that take one."""
    if name not in STRATEGIES or STRATEGIES[name].default is None:
        takes = ", ".join(f"{n} ({w.param})" for n, w in STRATEGIES.items() if w.default is not None)
        raise ValueError(f"{name} takes no parameter (got {value:g}); these do: {takes}")
    STRATEGIES[name].check(name, value)


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
    entry = STRATEGIES[strategy]
    if gamma is not None and entry.default is not None:  # a strategy without a parameter ignores it
        check_parameter(strategy, gamma)
    return entry.x0(snr, entry.default if gamma is None else gamma, target)  # type: ignore[arg-type]


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
