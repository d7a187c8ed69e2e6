"""Timestep distributions: probabilities against independent computations, draws against probabilities,
and importance sampling's expected gradient against the uniform weighted loss (Monte Carlo, float64)."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from minsnr.loss import diffusion_loss
from minsnr.schedule import make_schedule
from minsnr.timesteps import TIMESTEPS, make_timesteps
from minsnr.weighting import loss_weight

SCHED = make_schedule("cosine", 1000)


def nearest_t(log_sigma: np.ndarray) -> np.ndarray:
    """The discrete t whose ln sigma_t is nearest (what the pmf's midpoint edges mean)."""
    ls = SCHED.log_sigmas.numpy()
    i = np.clip(np.searchsorted(ls, log_sigma), 1, len(ls) - 1)
    return np.where(np.abs(ls[i - 1] - log_sigma) <= np.abs(ls[i] - log_sigma), i - 1, i)


@pytest.mark.parametrize("name", list(TIMESTEPS))
@pytest.mark.parametrize("target", ["x0", "eps", "v"])
def test_every_distribution_is_a_pmf_and_draws_follow_it(name, target):
    ts = make_timesteps(name, SCHED, "min_snr", None, target)
    assert ts.pmf.shape == (1000,) and ts.pmf.dtype == torch.float64
    assert float(ts.pmf.min()) >= 0 and float(ts.pmf.sum()) == pytest.approx(1.0, abs=1e-12)
    t = ts.draw(400_000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 999
    freq = torch.bincount(t, minlength=1000).double() / len(t)
    assert 0.5 * float((freq - ts.pmf).abs().sum()) < 0.03  # total variation; ~0.02 from sampling noise alone


def test_lognormal_is_edms_density_on_the_discrete_ladder():
    ts = make_timesteps("lognormal", SCHED, "min_snr", None, "x0")
    ls = SCHED.log_sigmas.numpy()
    edges = np.concatenate([[-np.inf], (ls[1:] + ls[:-1]) / 2, [np.inf]])
    want = np.diff(norm.cdf(edges, loc=-1.2, scale=1.2))  # scipy, independent of the code's erf
    np.testing.assert_allclose(ts.pmf.numpy(), want / want.sum(), atol=1e-12)
    draws = nearest_t(np.random.default_rng(0).normal(-1.2, 1.2, 400_000))  # sample the continuous law, round
    freq = np.bincount(draws, minlength=1000) / len(draws)
    assert 0.5 * np.abs(freq - ts.pmf.numpy()).sum() < 0.03


def test_logit_normal_equals_rectified_flows_logit_normal_time():
    """tau ~ logit-normal(0, 1) in x_tau = (1 - tau) x0 + tau eps has SNR ((1 - tau)/tau)^2 = sigma_VE^-2."""
    tau = 1 / (1 + np.exp(-np.random.default_rng(1).normal(0.0, 1.0, 400_000)))
    draws = nearest_t(np.log(tau / (1 - tau)))
    freq = np.bincount(draws, minlength=1000) / len(draws)
    pmf = make_timesteps("logit_normal", SCHED, "min_snr", None, "x0").pmf.numpy()
    assert 0.5 * np.abs(freq - pmf).sum() < 0.03
    median_t = int(np.searchsorted(SCHED.log_sigmas.numpy(), 0.0))  # SNR = 1, tau = 1/2: the median
    assert pmf[:median_t].sum() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("target", ["x0", "eps", "v"])
def test_importance_weight_is_constant_and_proportional_sampling(target):
    ts = make_timesteps("importance", SCHED, "min_snr", 5.0, target)
    w = loss_weight(SCHED.snr(torch.arange(1000)), "min_snr", 5.0, target)
    torch.testing.assert_close(ts.pmf, w / w.sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close((w * ts.correction.double()), torch.full_like(w, float(w.mean())), rtol=1e-6, atol=0)


class Tiny(torch.nn.Module):
    """A small float64 denoiser: per-pixel affine map modulated by a learned function of t."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.a = torch.nn.Parameter(torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64) * 0.3)
        self.c = torch.nn.Parameter(torch.randn(3, dtype=torch.float64, generator=g) * 0.3)

    def forward(self, x, t, labels):
        s = t.to(torch.float64)[:, None, None, None] / 1000
        return self.a * x * (1 + self.c[0] * s) + self.b * (self.c[1] + self.c[2] * s)


def grads(model, loss):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])


@pytest.mark.parametrize("target", ["x0", "eps"])
def test_importance_sampling_has_the_weighted_losses_expected_gradient(target):
    """E_{t~p}[grad of the importance-weighted loss] = E_{t~U}[grad of the min_snr-weighted loss], by Monte
    Carlo over t (the noise and data are fixed per t), against the exact sum over every t."""
    sched = make_schedule("cosine", 50)
    model, T = Tiny(), 50
    x0 = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64).clamp(-1, 1)
    noise = torch.randn(T, 1, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ts = make_timesteps("importance", sched, "min_snr", 5.0, target)
    per_t = torch.stack(
        [
            grads(
                model,
                diffusion_loss(
                    model,
                    x0,
                    None,
                    sched,
                    target=target,
                    weighting="min_snr",
                    t=torch.tensor([k]),
                    noise=noise[k : k + 1],
                    timesteps="uniform",
                ).loss,
            )
            for k in range(T)
        ]
    )  # gradient of w(t) * mse_t for every t
    exact = per_t.mean(0)  # uniform t: (1/T) sum_t w(t) grad mse_t
    m = 20_000
    t = ts.draw(m, torch.Generator().manual_seed(6))
    est = grads(
        model,
        diffusion_loss(
            model,
            x0.expand(m, -1, -1, -1),
            None,
            sched,
            target=target,
            weighting="min_snr",
            t=t,
            noise=noise[t],
            timesteps=ts,
        ).loss,
    )
    # the estimator's per-draw spread, from the exact per-t gradients and p(t)
    single = per_t / (T * ts.pmf[:, None])
    sd = ((ts.pmf[:, None] * (single - exact) ** 2).sum(0) / m).sqrt()
    assert torch.all((est - exact).abs() <= 5 * sd + 1e-12), (est - exact).abs().max()
    # and it is a different sampling of t, not the uniform one in disguise
    assert float((ts.pmf - 1 / T).abs().max()) > 0.5 / T


def test_a_loss_spec_is_parsed_by_the_registries():
    from minsnr.timesteps import parse_spec

    assert parse_spec("min_snr") == ("min_snr", None, None)
    assert parse_spec("min_snr:3@importance") == ("min_snr", 3.0, "importance")
    assert parse_spec("const@logit_normal") == ("const", None, "logit_normal")
    for bad, why in [
        ("minsnr", "did you mean 'min_snr'"),
        ("const:2", "takes no parameter"),
        ("min_snr:x", "not a number"),
        ("min_snr:-1", "gamma must be > 0"),
        ("min_snr@bogus", "timestep distribution='bogus' is not valid"),
        ("learned@importance", "needs a fixed weight"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_spec(bad)
