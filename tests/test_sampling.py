"""Samplers against analytic denoisers of Gaussian and Gaussian-mixture data (closed forms)."""

import math

import pytest
import torch

from minsnr.sampling import CFGDenoiser, VPDenoiser, generate, karras_sigmas, sample_ddim, sample_euler, sample_heun
from minsnr.schedule import make_schedule

SCHED = make_schedule("cosine")
MU, S = 1.5, 0.5  # data x0 ~ N(MU, S^2 I)


def gauss_denoiser(x, sigma, labels=None):
    """E[x0 | x0 + sigma n = x] for x0 ~ N(MU, S^2)."""
    s2 = sigma.view(-1, *([1] * (x.dim() - 1))).to(x.dtype) ** 2
    return MU + S**2 / (S**2 + s2) * (x - MU)


def gauss_ode_solution(x_T, sigma_T):
    """Probability-flow ODE solved exactly: x0 = MU + (x_T - MU) S / sqrt(S^2 + sigma_T^2)."""
    return MU + (x_T - MU) * S / math.sqrt(S**2 + sigma_T**2)


MIX_W, MIX_MU, MIX_S = torch.tensor([0.5, 0.5]), torch.tensor([1.0, 4.0]), torch.tensor([0.5, 0.5])


def mixture_denoiser(x, sigma, labels=None):
    """Posterior mean for a 1-D two-component Gaussian mixture (x: [B, 1])."""
    var = MIX_S.to(x.dtype) ** 2 + sigma.to(x.dtype).view(-1, 1) ** 2  # [B, 2]
    logp = torch.log(MIX_W.to(x.dtype)) - 0.5 * (x - MIX_MU.to(x.dtype)) ** 2 / var - 0.5 * var.log()
    r = torch.softmax(logp, dim=1)
    comp = MIX_MU.to(x.dtype) + MIX_S.to(x.dtype) ** 2 / var * (x - MIX_MU.to(x.dtype))
    return (r * comp).sum(dim=1, keepdim=True)


def start_noise(n, dim, sigmas, seed=0, dtype=torch.float64):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype) * sigmas[0].item()


def test_karras_sigmas():
    s = karras_sigmas(10, 0.002, 80.0)
    assert s.shape == (11,) and s[-1] == 0 and s[0].item() == pytest.approx(80) and s[-2].item() == pytest.approx(0.002)
    ramp = s[:-1] ** (1 / 7)
    torch.testing.assert_close(ramp[1:] - ramp[:-1], torch.full((9,), (ramp[1] - ramp[0]).item(), dtype=torch.float64))
    with pytest.raises(ValueError):
        karras_sigmas(10, 1.0, 0.5)


EDM_RANGE = (0.002, 80.0)  # Karras et al. table 1; the moment tests are about the sampler, not a schedule


def marginal_start(n, sigma_max, mean, var, seed=0):
    """x at sigma_max drawn from the data's noised marginal, N(mean, var + sigma_max^2) (exact for a Gaussian)."""
    z = torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return mean + math.sqrt(var + sigma_max**2) * z


def test_heun_gaussian_matches_closed_form_and_moments():
    sigmas = karras_sigmas(64, *EDM_RANGE)
    x = marginal_start(20000, EDM_RANGE[1], MU, S**2)
    out = sample_heun(gauss_denoiser, x, sigmas)
    exact = gauss_ode_solution(x, EDM_RANGE[1])
    assert (out - exact).abs().mean().item() < 2e-3
    assert out.mean().item() == pytest.approx(MU, rel=0.02)
    assert out.std().item() == pytest.approx(S, rel=0.02)
    # the schedule's own range (sigma_max ~ 2e4) spreads the steps thinly: still second order to the exact answer
    sigmas = karras_sigmas(64, SCHED.sigma_ve_min, SCHED.sigma_ve_max)
    x = start_noise(2000, 1, sigmas)
    exact = gauss_ode_solution(x, sigmas[0].item())
    err64 = (sample_heun(gauss_denoiser, x, sigmas) - exact).abs().mean().item()
    err128 = (
        (sample_heun(gauss_denoiser, x, karras_sigmas(128, SCHED.sigma_ve_min, SCHED.sigma_ve_max)) - exact)
        .abs()
        .mean()
        .item()
    )
    assert err64 < 0.02 * S and err128 < err64 / 3


def test_heun_mixture_moments():
    mean = (MIX_W * MIX_MU).sum().item()
    var = (MIX_W * (MIX_S**2 + MIX_MU**2)).sum().item() - mean**2
    out = sample_heun(
        mixture_denoiser, marginal_start(20000, EDM_RANGE[1], mean, var, seed=1), karras_sigmas(64, *EDM_RANGE)
    )
    assert out.mean().item() == pytest.approx(mean, rel=0.02)
    assert out.std().item() == pytest.approx(math.sqrt(var), rel=0.02)
    assert ((out - 1.0).abs() < 1.5).double().mean().item() == pytest.approx(0.5, abs=0.02)  # two modes, half each


@pytest.mark.parametrize("denoiser", [gauss_denoiser, mixture_denoiser])
def test_convergence_orders(denoiser):
    """Heun is second order (>= 3x less error per doubling), Euler first order (about 2x)."""
    x_ref_sigmas = karras_sigmas(1000, SCHED.sigma_ve_min, SCHED.sigma_ve_max)
    x = start_noise(1000, 1, x_ref_sigmas, seed=2)
    ref = sample_heun(denoiser, x, x_ref_sigmas)
    errs: dict[str, list[float]] = {"heun": [], "euler": []}
    for n in (8, 16, 32, 64):
        sigmas = karras_sigmas(n, SCHED.sigma_ve_min, SCHED.sigma_ve_max)
        for name, fn in (("heun", sample_heun), ("euler", sample_euler)):
            errs[name].append((fn(denoiser, x, sigmas) - ref).abs().mean().item())
    heun_ratio = errs["heun"][-2] / errs["heun"][-1]
    euler_ratio = errs["euler"][-2] / errs["euler"][-1]
    assert heun_ratio >= 3.0, errs
    assert 1.6 <= euler_ratio <= 2.6, errs
    assert all(a > b for a, b in zip(errs["heun"], errs["heun"][1:])), errs


def test_ddim_is_euler_in_the_ve_view():
    sigmas = karras_sigmas(12, SCHED.sigma_ve_min, SCHED.sigma_ve_max)
    x = start_noise(100, 1, sigmas, seed=3)
    torch.testing.assert_close(sample_ddim(mixture_denoiser, x, sigmas), sample_euler(mixture_denoiser, x, sigmas))


def test_heun_churn_is_stochastic_and_seeded():
    sigmas = karras_sigmas(64, *EDM_RANGE)
    x = marginal_start(2000, EDM_RANGE[1], MU, S**2, seed=4)
    a = sample_heun(gauss_denoiser, x, sigmas, s_churn=10, generator=torch.Generator().manual_seed(0))
    b = sample_heun(gauss_denoiser, x, sigmas, s_churn=10, generator=torch.Generator().manual_seed(0))
    det = sample_heun(gauss_denoiser, x, sigmas)
    assert torch.equal(a, b) and not torch.allclose(a, det)
    assert a.std().item() == pytest.approx(S, rel=0.1)


def test_sigmas_must_end_in_zero():
    with pytest.raises(ValueError, match="end in 0"):
        sample_euler(gauss_denoiser, torch.zeros(2, 1), torch.tensor([2.0, 1.0]))


class PerfectVPModel(torch.nn.Module):
    """A model on the discrete VP schedule whose x0 estimate is the analytic denoiser."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, x_vp, t, labels=None):
        sig = SCHED.sigma_ve(t.double()).to(x_vp.dtype).view(-1, 1)  # fractional t: log-sigma interpolation
        alpha = (1 + sig**2).rsqrt()
        s_vp = sig * alpha
        x0 = mixture_denoiser(x_vp / alpha, sig.view(-1))
        eps = (x_vp - alpha * x0) / s_vp
        return {"x0": x0, "eps": eps, "v": alpha * eps - s_vp * x0}[self.target]


@pytest.mark.parametrize("target", ["x0", "eps", "v"])
def test_vp_denoiser_is_exact_for_every_target(target):
    sigmas = karras_sigmas(32, SCHED.sigma_ve_min, SCHED.sigma_ve_max)
    x = start_noise(2000, 1, sigmas, seed=5)
    direct = sample_heun(mixture_denoiser, x, sigmas)
    wrapped = sample_heun(VPDenoiser(PerfectVPModel(target), SCHED, target), x, sigmas)
    torch.testing.assert_close(wrapped, direct, rtol=0, atol=1e-5)
    if target != "eps":  # a v model read as an eps model must be visibly wrong
        wrong = sample_heun(VPDenoiser(PerfectVPModel(target), SCHED, "eps"), x, sigmas)
        assert (wrong - direct).abs().max().item() > 0.1


def labelled_denoiser(x, sigma, labels):
    """Class c pulls towards c, the null class (10) towards -1."""
    centre = torch.where(labels == 10, torch.full_like(labels, -1), labels).to(x.dtype).view(-1, 1)
    return centre + 0.1 * x / (1 + sigma.view(-1, 1) ** 2)


def test_classifier_free_guidance_scales():
    g = torch.Generator().manual_seed(6)
    x, sigma = torch.randn(64, 1, generator=g), torch.rand(64, generator=g) * 5
    labels = torch.randint(0, 10, (64,), generator=g)
    cond = labelled_denoiser(x, sigma, labels)
    null = labelled_denoiser(x, sigma, torch.full_like(labels, 10))
    torch.testing.assert_close(CFGDenoiser(labelled_denoiser, 1.0, 10)(x, sigma, labels), cond)
    torch.testing.assert_close(CFGDenoiser(labelled_denoiser, 0.0, 10)(x, sigma, labels), null)
    torch.testing.assert_close(CFGDenoiser(labelled_denoiser, 2.5, 10)(x, sigma, labels), null + 2.5 * (cond - null))


def test_generate_runs_model_end_to_end():
    model = PerfectVPModel("v").double()
    model.register_parameter("dummy", torch.nn.Parameter(torch.zeros(1, dtype=torch.float64)))
    out = generate(
        model, SCHED, "v", None, shape=(4000, 1), sampler="heun", steps=32, generator=torch.Generator().manual_seed(0)
    )
    assert out.mean().item() == pytest.approx(2.5, rel=0.05)
    seen = []
    recorder = lambda x, t, labels: seen.append(SCHED.sigma_ve(t.double())[0].item()) or model(x, t, labels)  # noqa: E731
    recorder.parameters = model.parameters
    generate(recorder, SCHED, "v", None, shape=(2, 1), sampler="euler", steps=4, sigma_max=80.0)
    assert seen[0] == pytest.approx(80.0, rel=1e-5) and seen[-1] == pytest.approx(
        SCHED.sigma_ve_min, rel=1e-5
    )  # t in float32
    with pytest.raises(ValueError, match="heun, euler, ddim"):
        generate(model, SCHED, "v", None, shape=(2, 1), sampler="dpm")
