"""Zero terminal SNR (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed"):
the rescaled schedules in closed form and against diffusers, the weights and timestep laws at SNR 0, the
eps refusal, trailing spacing, the samplers' first step from pure noise, and a short v-target run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from minsnr.config import ConfigError, load_config
from minsnr.sampling import (
    SAMPLERS,
    SPACINGS,
    CFGDenoiser,
    VPDenoiser,
    generate,
    sample_ddim,
    sample_euler,
    sample_heun,
    trailing_timesteps,
)
from minsnr.schedule import SCHEDULES, make_schedule
from minsnr.timesteps import make_timesteps
from minsnr.weighting import STRATEGIES, TARGETS, loss_weight

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
T = 1000
ZSNR = {name: make_schedule(name, T, zero_terminal_snr=True) for name in SCHEDULES}
PLAIN = {name: make_schedule(name, T) for name in SCHEDULES}


# ---- the schedule ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cosine", "linear"])
@pytest.mark.parametrize("num_t", [T, 50])
def test_rescaled_schedule_closed_forms(name, num_t):
    old = make_schedule(name, num_t).alphas_cumprod
    new = make_schedule(name, num_t, zero_terminal_snr=True)
    ab = new.alphas_cumprod
    last = torch.tensor([num_t - 1])
    assert ab.dtype == torch.float64 and ab[-1].item() == 0.0
    assert new.snr(last).item() == 0.0 and new.alpha(last).item() == 0.0 and new.sigma(last).item() == 1.0
    assert new.log_sigmas[-1].item() == math.inf and new.sigma_ve_max == math.inf and new.zero_terminal_snr
    assert not make_schedule(name, num_t).zero_terminal_snr
    assert ab[0].item() == old[0].item()  # the first alpha-bar is kept
    assert bool((ab[1:] < ab[:-1]).all())
    # Lin et al.: sqrt(alpha-bar) is affine in the original's, k (sqrt(ab) - sqrt(ab_T)), k = sqrt(ab_0)/(sqrt(ab_0) - sqrt(ab_T))
    r0, rT = math.sqrt(old[0].item()), math.sqrt(old[-1].item())
    expect = (old.sqrt() - rT) * (r0 / (r0 - rT))
    torch.testing.assert_close(ab.sqrt(), expect, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("name", "beta_schedule"), [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_rescaled_schedule_matches_diffusers(name, beta_schedule):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=T, beta_schedule=beta_schedule, beta_start=1e-4, beta_end=0.02, rescale_betas_zero_snr=True
    ).alphas_cumprod.double()  # diffusers computes in float32
    ours = ZSNR[name].alphas_cumprod
    assert ref[-1].item() == 0.0
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-7)


def test_sigma_ve_and_t_from_sigma_near_the_last_timestep():
    for sched in ZSNR.values():
        t = torch.linspace(0, T - 1, 20001, dtype=torch.float64)
        s = sched.sigma_ve(t)
        assert not s.isnan().any() and bool((s[1:] > s[:-1]).all()) and s[-1].item() == math.inf
        assert bool(torch.isfinite(s[:-1]).all())
        torch.testing.assert_close(sched.t_from_sigma(s), t, rtol=0, atol=1e-9)  # exact inverses, inf included
        s_tm2 = 1 / sched.snr(torch.tensor(T - 2)).sqrt().item()
        # the last interval is linear in 1/sigma = sqrt(SNR): halfway the sigma is twice sigma_{T-2}
        assert sched.sigma_ve(torch.tensor([T - 1.5], dtype=torch.float64)).item() == pytest.approx(
            2 * s_tm2, rel=1e-12
        )
        sig = torch.logspace(-6, 40, 2000, dtype=torch.float64)
        back = sched.t_from_sigma(sig)
        assert not back.isnan().any() and bool((back[1:] >= back[:-1]).all()) and back.max().item() <= T - 1
        assert sched.t_from_sigma(torch.tensor([math.inf])).item() == T - 1


def test_ordinary_schedule_interpolation_unchanged():
    """The zero-SNR branch must not touch a finite schedule: log-sigma lerp written out independently."""
    sched = PLAIN["cosine"]
    ls = 0.5 * (torch.log1p(-sched.alphas_cumprod) - torch.log(sched.alphas_cumprod))
    t = torch.linspace(0, T - 1, 4001, dtype=torch.float64)
    low = t.floor().long().clamp(max=T - 2)
    expect = torch.exp(ls[low] + (t - low) * (ls[low + 1] - ls[low]))
    torch.testing.assert_close(sched.sigma_ve(t), expect, rtol=1e-13, atol=0)
    assert sched.sigma_ve_max == pytest.approx(20291, rel=1e-4)


# ---- weights and timestep laws at SNR 0 -------------------------------------------------------------------
# docs/math.md "Zero terminal SNR": each strategy at its default parameter at SNR 0 (clamped to 1e-10), in the
# x0, eps and v spaces, as that table states them
AT_ZERO = {
    "const": (1.0, 1e10, 1.0),
    "snr": (1e-10, 1.0, 1e-10),
    "max_snr": (1.0, 1e10, 1.0),
    "min_snr": (1e-10, 1.0, 1e-10),
    "soft_min_snr": (1e-10, 1.0, 1e-10),
    "sigmoid": (1e-10, 1.0, 1e-10),
    "p2": (1e-10, 1.0, 1e-10),
    "debiased": (1e-5, 1e5, 1e-5),
    "edm": (4.0, 4e10, 4.0),
    "plain": (1.0, 1.0, 1.0),
}


def test_every_weighting_at_snr_zero_matches_docs():
    assert set(AT_ZERO) == set(STRATEGIES)
    for name, values in AT_ZERO.items():
        for target, expect in zip(("x0", "eps", "v"), values):
            for dtype in (torch.float32, torch.float64):
                w = loss_weight(torch.zeros(3, dtype=dtype), name, None, target)
                assert bool(torch.isfinite(w).all()), (name, target, dtype)
                assert w[0].item() == pytest.approx(expect, rel=1e-6 if dtype == torch.float32 else 1e-9), (
                    name,
                    target,
                )
    docs = (ROOT / "docs" / "math.md").read_text()
    assert "## Zero terminal SNR" in docs


@pytest.mark.parametrize("law", ["uniform", "lognormal", "logit_normal", "laplace", "cauchy", "speed", "importance"])
def test_timestep_laws_finite_on_zero_snr(law):
    for sched in ZSNR.values():
        for weighting in STRATEGIES:
            for target in TARGETS:
                ts = make_timesteps(law, sched, weighting, None, target)
                assert bool(torch.isfinite(ts.pmf).all()) and bool(torch.isfinite(ts.correction).all())
                assert ts.pmf.sum().item() == pytest.approx(1, abs=1e-12)


def test_cauchy_mass_at_zero_snr_is_the_midpoint_rules_limit():
    """ln SNR(T-1) = -inf: the midpoint between it and ln SNR(T-2) is -inf, so t = T-1 gets no mass and t = T-2
    the whole open lower tail, below the midpoint of ln SNR(T-3) and ln SNR(T-2) (Cauchy(0, 1) CDF by hand)."""
    sched = ZSNR["cosine"]
    p = make_timesteps("cauchy", sched, "min_snr", None, "v").pmf
    lam = [math.log(sched.snr(torch.tensor(t)).item()) for t in (T - 3, T - 2)]
    tail = 0.5 + math.atan((lam[0] + lam[1]) / 2) / math.pi
    assert p[-1].item() == 0.0 and p[-2].item() == pytest.approx(tail, rel=1e-9)
    assert make_timesteps("uniform", sched, "min_snr", None, "v").pmf[-1].item() == pytest.approx(1 / T)


def test_v_and_x0_losses_finite_at_t_minus_1():
    from minsnr.loss import TrainingLoss

    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([T - 1, T - 1, T - 2, 0])
    for sched in ZSNR.values():
        for target in ("v", "x0"):
            for weighting in STRATEGIES:
                out = TrainingLoss(sched, target=target, weighting=weighting)(lambda x, t, y: 0.3 * x, x0, None, t=t)
                assert math.isfinite(out.loss.item()) and bool(torch.isfinite(out.mse_x0).all())
    # at SNR 0 the input is pure noise and v = -x0: a model predicting -x0 has no x0 error there
    out = TrainingLoss(ZSNR["cosine"], target="v", weighting="plain")(lambda x, t, y: -x0, x0, None, t=t[:2].repeat(2))
    assert out.mse_x0.abs().max().item() == 0.0 and out.loss.item() == 0.0


# ---- configuration -----------------------------------------------------------------------------------------
def test_config_refusals():
    with pytest.raises(ConfigError, match=r"loss.target=eps with schedule.zero_terminal_snr=true: .*SNR 0.*v or x0"):
        load_config(QUICKSTART, ["loss.target=eps", "schedule.zero_terminal_snr=true"])
    for extra in ("loss.weighting=learned", "log.eval_metric=bpd"):
        with pytest.raises(ConfigError, match=f"{extra} with schedule.zero_terminal_snr=true"):
            load_config(QUICKSTART, ["loss.target=v", "schedule.zero_terminal_snr=true", extra])
    with pytest.raises(ConfigError, match="sample.sigma_max with sample.spacing=trailing"):
        load_config(QUICKSTART, ["sample.spacing=trailing", "sample.sigma_max=80"])
    with pytest.raises(ConfigError, match="sample.spacing='trailng' is not valid"):
        load_config(QUICKSTART, ["sample.spacing=trailng"])
    cfg = load_config(QUICKSTART, ["loss.target=v", "schedule.zero_terminal_snr=true", "sample.spacing=trailing"])
    assert cfg.schedule.zero_terminal_snr and cfg.sample.spacing == "trailing"
    default = load_config(QUICKSTART, [])
    assert not default.schedule.zero_terminal_snr and default.sample.spacing == "karras"


# ---- spacing -----------------------------------------------------------------------------------------------
def test_trailing_timesteps():
    assert trailing_timesteps(1000, 10).tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]  # Lin et al.
    for num_t, n in [(1000, 4), (1000, 25), (1000, 50), (1000, 1000), (50, 7), (1000, 1)]:
        ref = np.round(np.arange(num_t, 0, -num_t / n)) - 1  # their formula, where numpy's float range gives n values
        got = trailing_timesteps(num_t, n)
        assert len(got) == n and got[0].item() == num_t - 1 and bool((got[1:] < got[:-1]).all())
        if len(ref) == n:
            assert got.tolist() == ref.astype(int).tolist()
    with pytest.raises(ValueError, match="1 <= sample.steps <= 50"):
        trailing_timesteps(50, 51)


def test_spacing_sigmas():
    for sched in ZSNR.values():
        trail = SPACINGS["trailing"](sched, 10, None)
        assert trail[0].item() == math.inf and trail[-1].item() == 0 and len(trail) == 11
        torch.testing.assert_close(trail[1:-1], 1 / sched.snr(trailing_timesteps(T, 10)[1:]).sqrt(), rtol=1e-12, atol=0)
        karras = SPACINGS["karras"](sched, 8, None)  # inf, then 7 Karras sigmas from sigma_{T-2}, then 0
        assert karras[0].item() == math.inf and len(karras) == 9 and karras[-1].item() == 0
        assert karras[1].item() == pytest.approx(1 / math.sqrt(sched.snr(torch.tensor(T - 2)).item()), rel=1e-12)
        assert karras[-2].item() == pytest.approx(sched.sigma_ve_min, rel=1e-12)
        assert SPACINGS["karras"](sched, 1, None).tolist() == [math.inf, 0.0]
        assert SPACINGS["karras"](sched, 5, 80.0)[0].item() == pytest.approx(80.0)  # a given sigma_max: as before
    plain = SPACINGS["trailing"](PLAIN["cosine"], 10, None)
    assert plain[0].item() == pytest.approx(PLAIN["cosine"].sigma_ve_max, rel=1e-12)
    with pytest.raises(ValueError, match="sample.sigma_max=80 with sample.spacing=trailing"):
        SPACINGS["trailing"](PLAIN["cosine"], 10, 80.0)


# ---- samplers ------------------------------------------------------------------------------------------------
C = 0.7  # data: the point x0 = C (a Dirac), whose denoiser is D = C at every sigma


def recording(x0_fn):
    calls = []

    def denoiser(x, sigma, labels=None):
        calls.append((x.clone(), sigma.clone()))
        return x0_fn(x, sigma)

    return denoiser, calls


@pytest.mark.parametrize("sampler", [sample_euler, sample_heun, sample_ddim])
def test_first_step_from_pure_noise_closed_form(sampler):
    n = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigmas = torch.tensor([math.inf, 40.0, 3.0, 0.2, 0.0], dtype=torch.float64)
    denoiser, calls = recording(lambda x, s: torch.full_like(x, C))
    out = sampler(denoiser, n, sigmas)
    assert calls[0][1].eq(math.inf).all() and torch.equal(calls[0][0], n)  # the model sees the noise itself at SNR 0
    # every later call: x = x0_hat + sigma n exactly for this denoiser, the first one after the closed-form step
    assert calls[1][1][0].item() == 40.0
    for x, s in calls[1:]:
        torch.testing.assert_close(x, C + s[0].item() * n, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, torch.full_like(n, C), rtol=0, atol=1e-12)


def _gauss_v_model(sched, mu=1.5, s=0.5, label_shift=0.0):
    """Exact v prediction for x0 ~ N(mu + label_shift * label, s^2), in the VP view at (fractional) t."""

    def model(x_vp, t, labels=None):
        sig = sched.sigma_ve(t.double())
        a = (1 + sig.square()).rsqrt().view(-1, *[1] * (x_vp.dim() - 1))
        sv = torch.where(sig.isinf(), 1.0, sig * (1 + sig.square()).rsqrt()).view_as(a)
        m = mu + (0 if labels is None else label_shift * labels.double().view_as(a))
        x0 = m + a * s**2 / (a.square() * s**2 + sv.square()) * (x_vp.double() - a * m)
        eps = (x_vp.double() - a * x0) / sv
        return (a * eps - sv * x0).to(x_vp.dtype)

    return model


@pytest.mark.parametrize("spacing", list(SPACINGS))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_full_sample_from_zero_snr_gaussian(sampler, spacing):
    """A v model of Gaussian data N(1.5, 0.5^2) on the rescaled cosine schedule, through VPDenoiser: no NaN, and
    the samples converge to the probability-flow ODE's exact solution from the state after the closed-form first
    step, x1 = mu + s1 n at s1: x0 = mu + n s1 S / sqrt(S^2 + s1^2); at the sampler's order (Heun's last step to
    0 is Euler, so with trailing spacing its error halves too)."""
    sched, mu, sd = ZSNR["cosine"], 1.5, 0.5
    noise = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for steps in (64, 128):
        s1 = SPACINGS[spacing](sched, steps, None)[1].item()
        exact = mu + noise * s1 * sd / math.sqrt(sd**2 + s1**2)
        out = generate(
            _gauss_v_model(sched, mu, sd),
            sched,
            "v",
            None,
            shape=(4000, 1),
            sampler=sampler,
            steps=steps,
            spacing=spacing,
            device="cpu",
            noise=noise,
        )
        assert bool(torch.isfinite(out).all())
        errors.append((out.double() - exact).abs().mean().item())
    assert errors[1] < 0.05 * sd and errors[0] / errors[1] > (3.5 if (sampler, spacing) == ("heun", "karras") else 1.8)


def test_first_step_through_vp_denoiser_and_guidance():
    """generate with one step: x0_hat at SNR 0 from a v model (x0 = -v there), with guidance in x0 space."""
    sched = ZSNR["linear"]
    seen = []
    exact = _gauss_v_model(sched, mu=C, s=0.0, label_shift=1.0)  # data: the point C + label

    def v_model(x_vp, t, labels):
        seen.append((x_vp.clone(), t.clone()))
        return exact(x_vp, t, labels)

    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])
    out = generate(
        v_model, sched, "v", labels, shape=(4, 2), steps=1, cfg_scale=3.0, num_classes=4, device="cpu", noise=noise
    )
    x_vp, t = seen[0]
    assert torch.equal(x_vp, torch.cat([noise, noise])) and bool((t == T - 1).all())
    null, cond = C + 4, C + labels.float().view(-1, 1)  # the null class is row num_classes = 4
    torch.testing.assert_close(out, (null + 3.0 * (cond - null)).expand(4, 2), rtol=0, atol=1e-6)
    den = CFGDenoiser(VPDenoiser(v_model, sched, "v"), 3.0, null_label=4)
    x1 = sample_euler(den, noise, torch.tensor([math.inf, 5.0, 0.0]), cond={"labels": labels})
    torch.testing.assert_close(x1, (null + 3.0 * (cond - null)).expand(4, 2), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="target eps on a zero-terminal-SNR schedule"):
        generate(v_model, sched, "eps", labels, shape=(4, 2), steps=2, device="cpu")


def test_given_sigma_max_starts_there_on_zero_snr():
    sched = ZSNR["cosine"]
    seen_t = []
    model = lambda x_vp, t, y: seen_t.append(t) or torch.full_like(x_vp, C)  # noqa: E731
    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    out = generate(model, sched, "x0", None, shape=(3, 2), steps=5, sigma_max=2000.0, device="cpu", noise=noise)
    assert torch.isfinite(out).all() and out.sub(C).abs().max().item() < 1e-5
    first = seen_t[0]  # float32, as VPDenoiser passes it
    assert T - 2 < first[0].item() < T - 1  # sigma 2000 lies between sigma_{T-2} = 663 and inf
    assert first[0].item() == pytest.approx(T - 2 + 1 - sched.sigma_ve(torch.tensor(T - 2)).item() / 2000, rel=1e-7)


# ---- a short run ---------------------------------------------------------------------------------------------
TINY = [
    "model.args={patch_size: 2, depth: 2, width: 32, num_heads: 2}",
    "train.batch_size=32",
    "train.steps=40",
    "log.every=1",
    "log.preview_every=0",
    "log.tensorboard=false",
    "checkpoint.every=40",
    "optim.warmup_steps=2",
    "ema.decay=0.9",
    "train.device=cpu",
    "train.threads=1",
    "loss.target=v",
    "schedule.zero_terminal_snr=true",
    "sample.steps=4",
]


def test_quickstart_v_run_and_sampling(tmp_path):
    from minsnr.checkpoint import load_model
    from minsnr.evaluate import sample
    from minsnr.evaluate.images import to_uint8
    from minsnr.run import build_run
    from minsnr.train import train

    cfg = load_config(QUICKSTART, [*TINY, f"run_dir={tmp_path / 'run'}"])
    assert build_run(cfg).schedule.zero_terminal_snr  # the run trains on the rescaled schedule
    train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in lines if "loss" in m]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    ckpt = tmp_path / "run" / "checkpoints" / "latest.pt"
    model, saved = load_model(ckpt)
    labels = torch.arange(4)
    for sampler in SAMPLERS:
        for spacing in SPACINGS:
            out = generate(
                model,
                ZSNR["cosine"],
                "v",
                labels,
                shape=(4, 1, 8, 8),
                sampler=sampler,
                steps=4,
                spacing=spacing,
                cfg_scale=1.5,
                num_classes=10,
                device="cpu",
                generator=torch.Generator().manual_seed(0),
            )
            assert bool(torch.isfinite(out).all()), (sampler, spacing)
    # `minsnr sample`'s path reads schedule.zero_terminal_snr and --spacing from the checkpoint's run
    images = sample.sample_images(model, saved, labels.numpy(), 4, 0, device=torch.device("cpu"), spacing="trailing")
    expect = generate(
        model,
        ZSNR["cosine"],
        "v",
        labels,
        shape=(4, 1, 8, 8),
        steps=4,
        spacing="trailing",
        num_classes=10,
        device="cpu",
        noise=sample.image_noise(0, 0, 4, (1, 8, 8)),
    )
    assert np.array_equal(images, to_uint8(expect))
    out = tmp_path / "s.npz"
    argv = [str(ckpt), "--num", "3", "--batch", "3", "--steps", "3", "--spacing", "trailing", "--out", str(out)]
    assert sample.main([*argv, "--device", "cpu"]) == 0
    with np.load(out) as z:
        assert z["arr_0"].shape == (3, 8, 8, 1)
