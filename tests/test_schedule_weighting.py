"""Schedules and loss weights against independent closed forms (DESIGN.md math conventions)."""

import math

import numpy as np
import pytest
import torch

from minsnr.schedule import make_schedule
from minsnr.weighting import STRATEGIES, TARGETS, loss_weight, x0_weight


def reference_cosine(T: int) -> list[float]:
    s = 0.008
    f = [math.cos(((u / T) + s) / (1 + s) * math.pi / 2) ** 2 for u in range(T + 1)]
    out, prod = [], 1.0
    for i in range(T):
        beta = min(1 - (f[i + 1] / f[0]) / (f[i] / f[0]), 0.999)
        prod *= 1 - beta
        out.append(prod)
    return out


def reference_linear(T: int) -> list[float]:
    lo, hi = 1e-4 * 1000 / T, 0.02 * 1000 / T
    out, prod = [], 1.0
    for i in range(T):
        prod *= 1 - (lo + (hi - lo) * i / (T - 1))
        out.append(prod)
    return out


@pytest.mark.parametrize("name,ref", [("cosine", reference_cosine), ("linear", reference_linear)])
@pytest.mark.parametrize("T", [1000, 250])
def test_schedule_matches_formula(name, ref, T):
    sched = make_schedule(name, T)
    assert sched.alphas_cumprod.dtype == torch.float64 and sched.num_timesteps == T
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), ref(T), rtol=1e-12, atol=1e-300)
    t = torch.arange(T)
    ac = torch.tensor(ref(T), dtype=torch.float64)
    torch.testing.assert_close(sched.alpha(t), ac.sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(sched.sigma(t), (1 - ac).sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(sched.snr(t), ac / (1 - ac), rtol=1e-12, atol=0)
    torch.testing.assert_close(sched.sigma_ve(t), ((1 - ac) / ac).sqrt(), rtol=1e-12, atol=0)
    snr = sched.snr(t)
    assert bool((snr[1:] < snr[:-1]).all()), "SNR must be strictly decreasing"


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_sigma_timestep_round_trip(name):
    sched = make_schedule(name)
    t = torch.cat([torch.arange(1000, dtype=torch.float64), torch.rand(500, dtype=torch.float64) * 999])
    torch.testing.assert_close(sched.t_from_sigma(sched.sigma_ve(t)), t, rtol=0, atol=1e-9)
    ti = torch.arange(1000)
    torch.testing.assert_close(sched.t_from_sigma(sched.sigma_ve(ti)), ti.double(), rtol=0, atol=1e-9)
    assert sched.sigma_ve_min == pytest.approx(float(sched.sigma_ve(ti[:1])), rel=1e-12)
    assert sched.sigma_ve_max == pytest.approx(float(sched.sigma_ve(ti[-1:])), rel=1e-12)


def test_unknown_schedule_lists_names():
    with pytest.raises(ValueError, match="cosine, linear"):
        make_schedule("sigmoid")


def closed_form(snr: np.ndarray, strategy: str, target: str, gamma: float | None) -> np.ndarray:
    """x0-space weight of section 3.4 over the target's conversion factor of appendix B. The strategies after
    the paper as their sources state them: eps-space weights (times SNR for x0), EDM's lambda(sigma)."""
    defaults = {"max_snr": 1.0, "min_snr": 5.0, "soft_min_snr": 5.0, "sigmoid": 0.0, "p2": 1.0, "edm": 0.5}
    g = defaults.get(strategy) if gamma is None else gamma
    sigma = 1 / np.sqrt(snr)  # the VE noise level
    w = {
        # Kingma & Gao: eps-space sigmoid(b - lambda)
        "sigmoid": snr / (1 + np.exp(-(g - np.log(snr)))) if g is not None else None,
        "p2": snr * 1 / (1 + snr) ** g if g else None,  # Choi et al.: eps 1 / (k + SNR)^gamma, k = 1
        "debiased": snr * 1 / np.sqrt(snr),  # Yu et al.: eps 1 / sqrt(SNR)
        "edm": (sigma**2 + g**2) / (sigma * g) ** 2 if g else None,  # Karras et al.: lambda(sigma), sigma_data = g
        "const": np.ones_like(snr),
        "snr": snr,
        "max_snr": np.maximum(snr, g) if g else None,
        "min_snr": np.minimum(snr, g) if g else None,
        "soft_min_snr": 1 / (1 / snr + 1 / g) if g else None,
        "plain": {"x0": np.ones_like(snr), "eps": snr, "v": snr + 1}[target],  # weight 1 in the target's space
    }[strategy]
    assert w is not None
    return w / {"x0": 1.0, "eps": snr, "v": snr + 1}[target]


DTYPE_RANGES = {
    torch.float16: (6.2e-5, 6.5e4),  # normal range of half precision
    torch.bfloat16: (1e-8, 1e6),
    torch.float32: (1e-8, 1e6),
    torch.float64: (1e-8, 1e6),
}


@pytest.mark.parametrize("dtype", list(DTYPE_RANGES))
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("gamma", [None, 2.5])
def test_loss_weight_closed_form(strategy, target, dtype, gamma):
    lo, hi = DTYPE_RANGES[dtype]
    snr = torch.logspace(math.log10(lo), math.log10(hi), 3000, dtype=torch.float64).to(dtype)
    w = loss_weight(snr, strategy, gamma=gamma, target=target)
    assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = closed_form(snr.double().numpy(), strategy, target, gamma)
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    np.testing.assert_allclose(w.double().numpy(), expected, rtol=rtol)


@pytest.mark.parametrize("dtype", list(DTYPE_RANGES))
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_loss_weight_finite_at_extremes(strategy, target, dtype):
    snr = torch.tensor([0.0, 1e-30, 1e30, float("inf")], dtype=torch.float64).to(dtype)
    w = loss_weight(snr, strategy, target=target)
    assert bool(torch.isfinite(w).all()), (strategy, target, dtype, w)


def test_documented_limits_at_zero_snr():
    zero = torch.zeros(1)
    assert float(loss_weight(zero, "min_snr", target="eps")) == 1.0  # min(gamma/SNR, 1) -> 1
    assert float(loss_weight(zero, "min_snr", target="v")) == pytest.approx(1e-10)  # -> 0
    assert float(loss_weight(zero, "snr", target="eps")) == 1.0  # eps-space "const"
    assert float(loss_weight(zero, "const", target="eps")) == pytest.approx(1e10)


def test_min_is_not_max():
    snr = torch.tensor([0.1, 100.0])
    assert loss_weight(snr, "min_snr").tolist() == pytest.approx([0.1, 5.0])
    assert loss_weight(snr, "max_snr").tolist() == pytest.approx([1.0, 100.0])


def test_callable_strategy_and_errors():
    snr = torch.logspace(-3, 3, 50, dtype=torch.float64)
    w = loss_weight(snr, lambda s: s.sqrt(), target="v")
    torch.testing.assert_close(w, snr.sqrt() / (snr + 1))
    torch.testing.assert_close(x0_weight(snr, "min_snr", 3.0), snr.clamp(max=3.0))
    with pytest.raises(ValueError, match="min_snr"):
        loss_weight(snr, "minsnr")
    with pytest.raises(ValueError, match="x0, eps, v"):
        loss_weight(snr, "min_snr", target="score")
    with pytest.raises(ValueError, match="gamma"):
        loss_weight(snr, "min_snr", gamma=-1.0)
