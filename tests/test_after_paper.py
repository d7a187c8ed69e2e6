"""The weightings and timestep laws published after the paper (issue 23): each against its source's formula
computed independently (numpy/scipy), their coincidences, their limits and caps, their parameters' ranges,
and how a config or a race names them."""

import logging
import math

import numpy as np
import pytest
import torch
from scipy import stats

from minsnr.compare.presets import RunSpec, Settings, parse_weighting, run_config, run_matrix
from minsnr.config import ConfigError, load_config
from minsnr.loss import TrainingLoss
from minsnr.schedule import make_schedule
from minsnr.timesteps import TIMESTEPS, make_timesteps, parse_spec, parse_timesteps, timesteps_spec
from minsnr.weighting import SNR_FLOOR, STRATEGIES, TARGETS, loss_weight, x0_weight

SNR = torch.logspace(-8, 8, 2001, dtype=torch.float64)


@pytest.mark.parametrize("b", [-3.0, -2.0, 0.0, math.log(5.0), 2.0])
def test_sigmoid_is_soft_min_snr_with_gamma_e_to_the_b(b):
    """Kingma & Gao's eps-space sigmoid(b - ln SNR) is 1 / (1 + SNR/e^b): soft_min_snr's eps weight with
    gamma = e^b, exactly (so one function implements both)."""
    for target in TARGETS:
        torch.testing.assert_close(
            loss_weight(SNR, "sigmoid", b, target),
            loss_weight(SNR, "soft_min_snr", math.exp(b), target),
            rtol=1e-12,
            atol=0,
        )
    eps = 1 / (1 + np.exp(np.log(SNR.numpy()) - b))  # sigmoid(b - lambda), written out
    np.testing.assert_allclose(loss_weight(SNR, "sigmoid", b, "eps").numpy(), eps, rtol=1e-12)


def test_default_p2_sigmoid_and_soft_min_snr_1_are_one_weight_and_edm_1_is_plain_v():
    p2 = x0_weight(SNR, "p2")
    torch.testing.assert_close(p2, SNR / (1 + SNR), rtol=1e-12, atol=0)
    torch.testing.assert_close(x0_weight(SNR, "sigmoid"), p2, rtol=1e-12, atol=0)
    torch.testing.assert_close(x0_weight(SNR, "soft_min_snr", 1.0), p2, rtol=1e-12, atol=0)
    torch.testing.assert_close(x0_weight(SNR, "edm", 1.0), x0_weight(SNR, "plain", target="v"), rtol=1e-12, atol=0)
    # EDM's own default: sigma_data 0.5, lambda = 1/sigma^2 + 4 in x0 terms
    torch.testing.assert_close(x0_weight(SNR, "edm"), SNR + 4, rtol=1e-12, atol=0)


def test_debiased_cap_and_limits_at_zero_snr():
    zero = torch.zeros(1, dtype=torch.float64)
    cap = 1 / math.sqrt(SNR_FLOOR)  # 1e5: 1/sqrt(SNR) at the clamp
    assert float(loss_weight(zero, "debiased", target="eps")) == pytest.approx(cap, rel=1e-12)
    assert float(loss_weight(torch.tensor([1e-12]), "debiased", target="eps")) == pytest.approx(cap, rel=1e-6)
    assert float(loss_weight(torch.tensor([4.0]), "debiased", target="eps")) == 0.5  # 1/sqrt(4)
    assert float(loss_weight(zero, "sigmoid", target="eps")) == pytest.approx(1.0)  # sigmoid(b + inf)
    assert float(loss_weight(zero, "p2", target="eps")) == pytest.approx(1.0)  # 1 / (1 + 0)^gamma
    assert float(loss_weight(zero, "edm", target="eps")) == pytest.approx(4 / SNR_FLOOR)  # 1/sigma_d^2 / SNR


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("target", TARGETS)
def test_every_strategy_and_grid_value_is_finite_fp32_on_both_schedules(schedule, target):
    snr = make_schedule(schedule).snr(torch.arange(1000)).float()
    for name, entry in STRATEGIES.items():
        for value in (None, *entry.grid):
            w = loss_weight(snr, name, value, target)
            assert w.dtype == torch.float32 and bool(torch.isfinite(w).all()) and bool((w >= 0).all()), (name, value)


def test_parameter_ranges_are_refused_with_the_range():
    from minsnr.weighting import parse_weighting as parse

    assert parse("sigmoid:-3") == ("sigmoid", -3.0)  # b may be negative
    for bad, why in [
        ("p2:0", "gamma must be > 0"),
        ("edm:-0.5", "sigma_data must be > 0"),
        ("sigmoid:nan", "b must be a finite number"),
        ("min_snr:0", "gamma must be > 0"),
        ("debiased:2", "debiased takes no parameter"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse(bad)
    with pytest.raises(ValueError, match="sigma_data must be > 0"):
        loss_weight(SNR, "edm", -1.0)


def test_config_gamma_is_checked_for_the_weighting_and_dropped_when_the_weighting_changes(caplog):
    with pytest.raises(ConfigError, match=r"loss.gamma=-1: edm:-1: its sigma_data must be > 0"):
        load_config("quickstart", ["loss.weighting=edm", "loss.gamma=-1"])
    with caplog.at_level(logging.WARNING, logger="minsnr.config"):
        cfg = load_config("quickstart", ["loss.weighting=edm"])  # the file's gamma 5 is min_snr's
    assert cfg.loss.gamma is None and "dropping the config file's loss.gamma=5" in caplog.text
    assert load_config("quickstart", ["loss.gamma=0.7", "loss.weighting=edm"]).loss.gamma == 0.7
    assert load_config("quickstart", ["loss.weighting=min_snr"]).loss.gamma == 5.0  # unchanged weighting keeps it


SCHED = make_schedule("cosine", 1000)


def _log_snr_edges() -> np.ndarray:
    lam = -2 * SCHED.log_sigmas.numpy()  # decreasing in t
    return np.concatenate([[np.inf], (lam[1:] + lam[:-1]) / 2, [-np.inf]])


@pytest.mark.parametrize(
    ("spec", "law"),
    [
        ("laplace", stats.laplace(loc=0.0, scale=0.5)),
        ("laplace(1,2)", stats.laplace(loc=1.0, scale=2.0)),
        ("cauchy", stats.cauchy(loc=0.0, scale=1.0)),
        ("cauchy(mu=-1,scale=3)", stats.cauchy(loc=-1.0, scale=3.0)),
    ],
)
def test_log_snr_laws_are_their_mass_between_neighbouring_log_snr(spec, law):
    edges = _log_snr_edges()
    want = law.cdf(edges[:-1]) - law.cdf(edges[1:])  # scipy, independent of the code's formulas
    pmf = make_timesteps(spec, SCHED, "min_snr", None, "x0").pmf.numpy()
    np.testing.assert_allclose(pmf, want / want.sum(), atol=1e-12)
    half = int(np.searchsorted(np.cumsum(pmf), 0.5))  # the median t is where ln SNR_t is the law's median
    assert abs(-2 * float(SCHED.log_sigmas[half]) - law.median()) < 0.1


def test_edm2_lognormal_through_the_spec_and_the_config_keys():
    ls = SCHED.log_sigmas.numpy()
    edges = np.concatenate([[-np.inf], (ls[1:] + ls[:-1]) / 2, [np.inf]])
    want = np.diff(stats.norm.cdf(edges, loc=-0.4, scale=1.0))
    np.testing.assert_allclose(
        make_timesteps("lognormal(-0.4,1.0)", SCHED, "min_snr", None, "x0").pmf.numpy(), want / want.sum(), atol=1e-12
    )
    cfg = load_config(
        "quickstart", ["loss.timesteps=lognormal", "loss.timestep_args.mean=-0.4", "loss.timestep_args.std=1.0"]
    )
    loss = TrainingLoss.from_config(cfg, SCHED)
    np.testing.assert_allclose(loss.timesteps.pmf.numpy(), want / want.sum(), atol=1e-12)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_speed_suppresses_the_flat_area_near_noise_five_to_one(schedule):
    sched = make_schedule(schedule)
    sigma = np.sqrt(1 - sched.alphas_cumprod.numpy())
    grad = np.gradient(sigma)  # numpy's central differences, one-sided at the ends
    flat = grad < 1e-4
    assert flat.any() and (~flat).any()
    pmf = make_timesteps("speed", sched, "p2", None, "eps").pmf.numpy()
    np.testing.assert_allclose(pmf[~flat] / pmf[flat].max(), 5.0, rtol=1e-12)  # 2.5 : 0.5
    np.testing.assert_allclose(pmf.sum(), 1.0, atol=1e-12)
    first = int(np.argmax(flat))
    assert flat[first:].all()  # one contiguous area at the noisy end
    assert first > 500  # near pure noise (cosine: t >= 958; linear: t >= 641)
    halved = make_timesteps("speed", make_schedule(schedule, 500), "p2", None, "eps").pmf.numpy()
    assert (halved > halved.min()).sum() == pytest.approx((~flat).sum() / 2, abs=3)  # threshold per unit time


def test_timestep_specs_parse_and_refuse_with_the_reason():
    assert parse_timesteps("lognormal(-0.4, 1.0)") == ("lognormal", {"mean": -0.4, "std": 1.0})
    assert parse_timesteps("laplace(b=1)") == ("laplace", {"mu": 0.0, "b": 1.0})
    assert timesteps_spec("lognormal", {"mean": -1.2}) == "lognormal"  # at its defaults
    assert parse_spec("min_snr@lognormal(-0.4,1.0)") == ("min_snr", None, "lognormal(-0.4,1)")
    assert parse_spec("p2:0.5@speed") == ("p2", 0.5, "speed")
    for bad, why in [
        ("laplace(0,0)", "b must be > 0"),
        ("cauchy(0,-1)", "scale must be > 0"),
        ("lognormal(-0.4", "malformed"),
        ("lognormal(1,2,3)", "takes 2"),
        ("lognormal(mu=1)", "no parameter 'mu'; its parameters: mean, std"),
        ("lognormal(x)", "not a number"),
        ("uniform(1)", "takes 0"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_timesteps(bad)


def test_config_refuses_bad_timestep_args_and_the_spec_form():
    with pytest.raises(ConfigError, match=r"loss.timestep_args=.*laplace\(b=-1\): b must be > 0"):
        load_config("quickstart", ["loss.timesteps=laplace", "loss.timestep_args.b=-1"])
    with pytest.raises(ConfigError, match="no parameter 'sigma'"):
        load_config("quickstart", ["loss.timesteps=lognormal", "loss.timestep_args.sigma=1"])
    with pytest.raises(ConfigError, match="give its parameters as loss.timestep_args"):
        load_config("quickstart", ["loss.timesteps=lognormal(-0.4,1)"])


def test_a_race_names_and_configures_the_new_entries(tmp_path):
    base = load_config("quickstart")
    spec = parse_weighting("min_snr@lognormal(-0.4,1.0)+immiscible", "x0", 5.0)
    assert spec == RunSpec("x0", "min_snr", 5.0, timesteps="lognormal(-0.4,1)", noise="immiscible")
    assert spec.name == "x0_min_snr@lognormal(-0.4,1)+immiscible"
    cfg = run_config(base, spec, tmp_path, None, 1)
    assert (cfg.loss.timesteps, cfg.loss.timestep_args, cfg.loss.noise_assignment) == (
        "lognormal",
        {"mean": -0.4, "std": 1.0},
        "immiscible",
    )
    assert run_config(base, parse_weighting("min_snr@laplace", "x0", 5.0), tmp_path, None, 1).loss.timestep_args == {}
    # the config's gamma (min_snr's) is not another strategy's parameter
    specs = run_matrix(Settings(targets=["eps"], weightings=["p2", "edm", "min_snr"]), 5.0, "min_snr")
    assert [(s.name, s.gamma) for s in specs] == [
        ("eps_snr", None),
        ("eps_p2", 1.0),
        ("eps_edm", 0.5),
        ("eps_min_snr", 5.0),
    ]
    with pytest.raises(ConfigError, match=r"\+immiscibel is not a noise assignment"):
        parse_weighting("min_snr+immiscibel", "x0", None)
    with pytest.raises(ConfigError, match="b must be > 0"):
        parse_weighting("min_snr@laplace(0,-1)", "x0", None)


def test_every_new_distribution_is_in_the_registry():
    for name in ("laplace", "cauchy", "speed", "lognormal"):
        assert name in TIMESTEPS
    for name in ("p2", "sigmoid", "debiased", "edm"):
        assert name in STRATEGIES


def test_a_race_started_before_the_new_keys_continues_and_a_changed_key_is_named(tmp_path):
    import dataclasses

    from minsnr.compare.runner import STATE, load_state
    from minsnr.files import write_json

    base = load_config("quickstart", [f"run_dir={tmp_path}"])
    state = load_state(tmp_path, base, "auto", "fid_cls")
    del state["config"]["loss.noise_assignment"]  # what an older minsnr stored
    write_json(tmp_path / STATE, state)
    assert load_state(tmp_path, base, "auto", "fid_cls")["config"] == state["config"]
    other = dataclasses.replace(base, loss=dataclasses.replace(base.loss, noise_assignment="immiscible"))
    with pytest.raises(ConfigError, match=r"loss.noise_assignment: 'independent' -> 'immiscible'"):
        load_state(tmp_path, other, "auto", "fid_cls")
    other = dataclasses.replace(base, loss=dataclasses.replace(base.loss, timestep_args={"mean": -0.4}))
    with pytest.raises(ConfigError, match=r"loss.timestep_args.mean: None -> -0.4"):
        load_state(tmp_path, other, "auto", "fid_cls")


def test_the_command_line_list_keeps_a_timestep_spec_whole():
    from minsnr.compare.cli import _list

    assert _list("p2, min_snr@lognormal(-0.4,1),edm:1,") == ["p2", "min_snr@lognormal(-0.4,1)", "edm:1"]
