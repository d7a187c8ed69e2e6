"""minsnr.integrations.diffusers against diffusers' own SNR (training_utils.compute_snr) and the Min-SNR weights
written out here from the paper (appendix B), on diffusers' schedulers; its errors; its import footprint; and
the example script, run as a user would."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minsnr.integrations.diffusers import PREDICTION_TYPES, loss_weight
from minsnr.weighting import SNR_FLOOR, STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
BETA_SCHEDULES = ("linear", "squaredcos_cap_v2", "scaled_linear")
T = 1000


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def scheduler(diffusers, prediction_type="epsilon", beta_schedule="linear", zero_snr=False):
    return diffusers.DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_snr,
    )


def expected_min_snr(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """The weights the issue states, from diffusers' SNR: min(SNR, g)/SNR, min(SNR, g)/(SNR + 1), min(SNR, g)."""
    snr = snr.double()
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction_type]


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("prediction_type", list(PREDICTION_TYPES))
def test_min_snr_matches_the_formulas_on_diffusers_snr(diffusers, prediction_type, beta_schedule, zero_snr):
    from diffusers.training_utils import compute_snr

    sched = scheduler(diffusers, prediction_type, beta_schedule, zero_snr)
    t = torch.arange(T)
    snr = compute_snr(sched, t)
    assert (snr[-1] == 0) == zero_snr  # the zero terminal SNR case is really exercised
    for gamma in (5.0, 1.0, 20.0):
        got = loss_weight(sched, t, "min_snr", gamma=gamma)
        assert got.dtype == torch.float32 and got.shape == t.shape and bool(torch.isfinite(got).all())
        positive = snr > 0
        want = expected_min_snr(snr, gamma, prediction_type)
        torch.testing.assert_close(got[positive].double(), want[positive], rtol=1e-5, atol=0)
    assert torch.equal(loss_weight(sched, t), loss_weight(sched, t, "min_snr", 5.0))  # default: Min-SNR-5


@pytest.mark.parametrize("prediction_type", list(PREDICTION_TYPES))
def test_zero_terminal_snr_gives_the_documented_limit(diffusers, prediction_type):
    from diffusers.training_utils import compute_snr

    sched = scheduler(diffusers, prediction_type, "scaled_linear", zero_snr=True)
    last = torch.tensor([T - 1])
    snr = compute_snr(sched, last)
    assert float(snr) == 0.0
    if prediction_type == "epsilon":  # diffusers' recipe divides 0 by 0 here
        assert bool(torch.isnan(expected_min_snr(snr, 5.0, prediction_type)).all())
    w = float(loss_weight(sched, last, "min_snr", 5.0))
    # docs/math.md: SNR is clamped to 1e-10, so eps gets min(g/SNR, 1) -> 1 (its true limit); v and x0 get
    # min(1e-10, 5)/(1e-10 + 1) and min(1e-10, 5), both 1e-10 to float32 precision (true limit 0).
    assert w == (1.0 if prediction_type == "epsilon" else pytest.approx(SNR_FLOOR, rel=1e-6))


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_one_weighting_is_one_x0_objective_for_every_prediction_type(diffusers, beta_schedule):
    """Appendix B: ||eps - eps'||^2 = SNR ||x0 - x0'||^2, ||v - v'||^2 = (SNR + 1) ||x0 - x0'||^2, so the weight
    times that factor is the same x0-space weight whichever the prediction type."""
    from diffusers.training_utils import compute_snr

    t = torch.arange(T - 1)  # SNR > 0
    snr = compute_snr(scheduler(diffusers, beta_schedule=beta_schedule), t).double()
    factor = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}
    for name in ("min_snr", "soft_min_snr", "p2", "edm"):
        x0 = [loss_weight(scheduler(diffusers, p, beta_schedule), t, name).double() * factor[p] for p in factor]
        torch.testing.assert_close(x0[0], x0[1], rtol=1e-5, atol=0)
        torch.testing.assert_close(x0[0], x0[2], rtol=1e-5, atol=0)


@pytest.mark.parametrize("prediction_type", list(PREDICTION_TYPES))
def test_plain_is_weight_one_and_snr_is_the_plain_eps_mse(diffusers, prediction_type):
    t = torch.arange(T)
    sched = scheduler(diffusers, prediction_type, "squaredcos_cap_v2", zero_snr=True)
    assert torch.equal(loss_weight(sched, t, "plain"), torch.ones(T))  # the unweighted MSE of the prediction
    if prediction_type == "epsilon":  # what diffusers trains without --snr_gamma
        assert torch.equal(loss_weight(sched, t, "snr"), torch.ones(T))


@pytest.mark.parametrize("zero_snr", [False, True])
def test_every_weighting_is_finite_and_positive_everywhere(diffusers, zero_snr):
    t = torch.arange(T)
    for beta_schedule in BETA_SCHEDULES:
        for prediction_type in PREDICTION_TYPES:
            sched = scheduler(diffusers, prediction_type, beta_schedule, zero_snr)
            for name, strategy in STRATEGIES.items():
                for gamma in {None, *strategy.grid}:
                    w = loss_weight(sched, t, name, gamma)
                    assert bool(torch.isfinite(w).all() and (w > 0).all()), (beta_schedule, prediction_type, name)


def test_dtype_device_and_shape_follow_the_timesteps(diffusers):
    sched = scheduler(diffusers, "v_prediction")
    sched.alphas_cumprod = sched.alphas_cumprod.double()  # the table's dtype does not leak into the weight
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    for device in devices:
        for t in (torch.tensor([[0, 999], [500, 3]], device=device), torch.tensor(7, device=device)):
            w = loss_weight(sched, t, "min_snr", 5.0)
            assert w.dtype == torch.float32 and w.device == t.device and w.shape == t.shape
    assert float(loss_weight(sched, [0, 10])[1]) == float(loss_weight(sched, torch.tensor([10])))  # lists work


def test_any_object_with_the_two_attributes_is_a_scheduler():
    """No diffusers needed: alphas_cumprod (any array) and config.prediction_type (attribute or mapping)."""
    a = torch.linspace(0.9999, 0.0, T, dtype=torch.float64)  # ends at SNR = 0
    t = torch.arange(T - 1)
    for config in (SimpleNamespace(prediction_type="v_prediction"), {"prediction_type": "v_prediction"}):
        for table in (a, a.float(), a.numpy()):
            exact = torch.as_tensor(table).double()  # the weight is exact for the table it is given
            snr = (exact / (1 - exact))[t]
            want = torch.minimum(snr, torch.full_like(snr, 2.0)) / (snr + 1)
            w = loss_weight(SimpleNamespace(alphas_cumprod=table, config=config), t, "min_snr", 2.0)
            torch.testing.assert_close(w.double(), want, rtol=1e-5, atol=0)


def one_line_error(match: str, *args, **kwargs) -> str:
    with pytest.raises(ValueError, match=match) as err:
        loss_weight(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_inputs_give_one_line_errors_naming_the_cause(diffusers):
    t = torch.tensor([0, 999])
    one_line_error("has no alphas_cumprod", SimpleNamespace(config={"prediction_type": "epsilon"}), t)
    one_line_error(
        "FlowMatchEulerDiscreteScheduler has no alphas_cumprod", diffusers.FlowMatchEulerDiscreteScheduler(), t
    )
    eps = {"prediction_type": "epsilon"}
    one_line_error("must be a non-empty 1-D table in", SimpleNamespace(alphas_cumprod=[0.5, 1.5], config=eps), t)
    one_line_error("must be a non-empty 1-D table in", SimpleNamespace(alphas_cumprod=[[0.5]], config=eps), t)
    sched = scheduler(diffusers)
    sched.register_to_config(prediction_type="flow_prediction")
    msg = one_line_error("prediction_type='flow_prediction' is not valid", sched, t)
    assert all(name in msg for name in PREDICTION_TYPES)
    sched = scheduler(diffusers)
    one_line_error(r"timestep -1 is outside \[0, 1000\)", sched, torch.tensor([0, -1]))
    one_line_error(r"timestep 1000 is outside \[0, 1000\)", sched, torch.tensor([1000, 3]))
    one_line_error("timesteps must be integers", sched, torch.tensor([1.0, 2.0]))
    one_line_error("timesteps must be integers", sched, torch.tensor([True]))
    one_line_error(r"weighting='min_snrr' is not valid \(did you mean 'min_snr'\?\)", sched, t, "min_snrr")
    one_line_error("const takes no parameter", sched, t, "const", gamma=5.0)
    one_line_error("min_snr:-1: its gamma must be > 0", sched, t, "min_snr", gamma=-1.0)
    one_line_error("'learned' has no fixed weight", sched, t, "learned")


def test_importing_the_module_does_not_import_diffusers():
    code = "import sys, minsnr.integrations.diffusers; print(sorted(m for m in sys.modules if m.split('.')[0] == 'diffusers'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def run_example(*args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "examples/diffusers_min_snr.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_example_trains_and_the_loss_falls(diffusers):
    out = run_example("--steps", "20")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].startswith("loss fell: ")
    out = run_example("--steps", "10", "--prediction-type", "v_prediction", "--zero-terminal-snr")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].startswith("loss fell: ")


def test_the_example_refuses_epsilon_with_zero_terminal_snr(diffusers):
    out = run_example("--zero-terminal-snr")
    assert out.returncode == 2 and out.stdout == ""
    assert "error: --zero-terminal-snr needs --prediction-type v_prediction" in out.stderr.splitlines()[-1]
