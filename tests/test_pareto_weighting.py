"""loss.weighting=pareto (minsnr.adaptive.ParetoWeight): the start, the smoothed UGD update on a hand-made
Gram matrix, the piecewise map from t to its range, exact resume with the state, the static step."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minsnr.adaptive import ParetoWeight
from minsnr.compare.presets import parse_weighting
from minsnr.config import ConfigError
from minsnr.schedule import make_schedule
from minsnr.solvers import ugd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import straight_and_resumed  # noqa: E402


def start_weights(num_t: int, edges: list[int]) -> tuple[np.ndarray, float]:
    """Min-SNR-5 averaged over each range [edges[k], edges[k+1]), and its mean over all t (float64)."""
    snr = make_schedule("cosine", num_t).snr(torch.arange(num_t)).double().numpy()
    w = np.minimum(snr, 5.0)
    return np.array([w[lo:hi].mean() for lo, hi in zip(edges[:-1], edges[1:])]), float(w.mean())


def test_start_and_two_smoothed_updates_on_a_diagonal_gram():
    """Diagonal G: the optimum of eq. 10 on the simplex is w_k = (1/d_k) / sum_j 1/d_j (closed form); each
    update is w <- 0.9 w + 0.1 v, v the optimum scaled so that the mean weight over t stays the start's."""
    pw = ParetoWeight(make_schedule("cosine", 1000))
    edges = list(range(0, 1001, 100))
    start, mean_t = start_weights(1000, edges)
    assert np.allclose(pw.weights.numpy(), start, rtol=1e-6) and int(pw.updates) == 0
    rng = np.random.default_rng(0)
    w = start
    for d in (rng.uniform(0.5, 4.0, 10), rng.uniform(0.1, 1.0, 10)):
        optimum = (1 / d) / (1 / d).sum()
        assert np.allclose(ugd(np.diag(d)).weights, optimum, atol=2e-3)
        v = ugd(np.diag(d)).weights
        before = w
        w = 0.9 * w + 0.1 * v * mean_t / v.mean()  # equal ranges: mean over t = mean over k
        pw.update_from_gram(np.diag(d))
        assert np.allclose(pw.weights.numpy(), w, rtol=1e-9)
        step = pw.weights.numpy() - 0.9 * before  # 0.1 x the normalised closed-form optimum
        assert np.allclose(step, 0.1 * optimum * mean_t / optimum.mean(), rtol=2e-2)
    assert int(pw.updates) == 2
    assert abs(float(pw.weights.mean()) - mean_t) < 1e-9 * mean_t  # the loss scale is kept


def test_uneven_ranges_keep_the_mean_over_t():
    """T = 25 in K = 10 ranges of 2 or 3 steps: the mean over t is sum_k n_k w_k / T, not the mean over k."""
    pw = ParetoWeight(make_schedule("cosine", 25))
    sizes = np.array([hi - lo for lo, hi in pw.ranges])
    assert sorted(set(sizes.tolist())) == [2, 3] and sizes.sum() == 25
    edges = [lo for lo, _ in pw.ranges] + [25]
    start, mean_t = start_weights(25, edges)
    assert np.allclose(pw.weights.numpy(), start, rtol=1e-6)
    pw.apply_solution(np.eye(10)[3])
    assert abs((sizes * pw.weights.numpy()).sum() / 25 - mean_t) < 1e-9
    assert np.allclose(pw.weights.numpy(), 0.9 * start + 0.1 * np.eye(10)[3] * mean_t * 25 / sizes[3], rtol=1e-9)


@pytest.mark.parametrize("num_t", [1000, 25])
def test_piecewise_weight_maps_each_t_to_its_range(num_t):
    pw = ParetoWeight(make_schedule("cosine", num_t))
    with torch.no_grad():
        pw.weights.copy_(torch.arange(1.0, 11.0, dtype=torch.float64))  # w_k = k + 1
    t = torch.arange(num_t)
    scale, offset = pw(t)
    assert torch.equal(offset, torch.zeros(num_t))
    assert pw.ranges[0][0] == 0 and pw.ranges[-1][1] == num_t
    for k, (lo, hi) in enumerate(pw.ranges):
        assert torch.equal(scale[lo:hi], torch.full((hi - lo,), k + 1.0)), (k, lo, hi)
    if num_t == 1000:
        assert torch.equal(scale, (t // 100 + 1).float())


PARETO = ["loss.weighting=pareto", "loss.adapt_every=2"]


def test_resume_is_bit_exact_with_the_weights_state(tmp_path):
    a, b = straight_and_resumed(tmp_path, *PARETO)
    assert a["loss_weighting"].keys() == {"weights", "updates"}
    assert torch.equal(a["loss_weighting"]["weights"], b["loss_weighting"]["weights"])
    assert int(a["loss_weighting"]["updates"]) == int(b["loss_weighting"]["updates"]) == 2  # at steps 2 and 4
    start = ParetoWeight(make_schedule("cosine", 1000)).weights
    assert not torch.allclose(a["loss_weighting"]["weights"], start)  # the updates moved the weights
    lines = (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
    assert all("pareto_w/900-999" in line for line in lines)


@pytest.mark.parametrize("weighting", [["loss.weighting=learned"], PARETO], ids=["learned", "pareto"])
def test_static_step_is_bit_identical_to_the_general_step(tmp_path, weighting):
    """The captured step's eager twin reads the Pareto weights and trains u(t) in place, like the general step."""
    from test_speed_paths import assert_same_state, trainer

    static = trainer(tmp_path / "a", *weighting)
    general = trainer(tmp_path / "b", *weighting, general=True)
    assert static.static is not None
    for _ in range(5):
        static.train_step()
        general.train_step()
        assert_same_state(static, general)
        for (name, x), (_, y) in zip(
            static.loss.adaptive.state_dict().items(), general.loss.adaptive.state_dict().items()
        ):
            assert torch.equal(x, y), name


def test_compare_accepts_the_stateful_weightings_without_gamma():
    for name in ("learned", "pareto"):
        spec = parse_weighting(name, "x0", config_gamma=5.0)
        assert (spec.weighting, spec.gamma, spec.name) == (name, None, f"x0_{name}")
        with pytest.raises(ConfigError, match="gamma"):
            parse_weighting(f"{name}:3", "x0", None)
    with pytest.raises(ConfigError, match="learned, pareto"):
        parse_weighting("adaptive", "x0", None)
