"""Frank-Wolfe and UGD (section 3.3, eq. 10-13) against closed forms and scipy's SLSQP."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from scipy.optimize import minimize

from minsnr.pareto.compare import cosine_matrix, negative_cosine_fraction
from minsnr.solvers import FW_VARIANTS, frank_wolfe, objective, ugd

SOLVERS = [
    lambda g, lam: frank_wolfe(g, lam, variant="pairwise"),
    lambda g, lam: frank_wolfe(g, lam, variant="away"),
    lambda g, lam: ugd(g, lam),
]
SOLVER_IDS = ["fw_pairwise", "fw_away", "ugd"]


def random_psd(k: int, rank: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(k, rank)) + 0.5 * rng.normal(size=(1, rank))  # correlated, like task gradients
    return m @ m.T / rank


@functools.cache
def slsqp(k: int, rank: int, seed: int, lam: float) -> float:
    a = random_psd(k, rank, seed) + lam * np.eye(k)
    res = minimize(
        lambda w: w @ a @ w,
        np.full(k, 1 / k),
        jac=lambda w: 2 * a @ w,
        method="SLSQP",
        bounds=[(0, 1)] * k,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
        options={"ftol": 1e-15, "maxiter": 2000},
    )
    assert res.success, res.message
    return float(res.fun)


@pytest.mark.parametrize("solve", SOLVERS, ids=SOLVER_IDS)
def test_orthogonal_unit_gradients(solve):
    sol = solve(np.eye(2), 0.0)  # g1 = (1, 0), g2 = (0, 1): min-norm point (1/2, 1/2), norm^2 1/2
    assert sol.converged
    np.testing.assert_allclose(sol.weights, [0.5, 0.5], atol=1e-6)
    assert sol.objective == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("solve", SOLVERS, ids=SOLVER_IDS)
def test_vertex_is_closest_point(solve):
    g = np.array([[1.0, 0.0], [1.0, 1.0]])  # ||w1 g1 + w2 g2||^2 = 1 + w2^2: optimum at g1
    sol = solve(g @ g.T, 0.0)
    assert sol.converged
    np.testing.assert_allclose(sol.weights, [1.0, 0.0], atol=5e-3)  # UGD reaches the face only in the limit
    assert sol.objective == pytest.approx(1.0, abs=1e-5)  # within the solvers' relative tolerance


@pytest.mark.parametrize("solve", SOLVERS, ids=SOLVER_IDS)
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_diagonal_closed_form(solve, lam):
    a, b = 1.0, 3.0  # orthogonal gradients of squared norms a, b: w1 = b'/(a'+b'), f = a'b'/(a'+b'), ' = + lambda
    sol = solve(np.diag([a, b]), lam)
    ar, br = a + lam, b + lam
    np.testing.assert_allclose(sol.weights, [br / (ar + br), ar / (ar + br)], atol=1e-5)
    assert sol.objective == pytest.approx(ar * br / (ar + br), rel=1e-6)


def test_conflicting_gradients_reach_zero():
    sol = frank_wolfe(np.array([[1.0, -1.0], [-1.0, 1.0]]))  # g2 = -g1: Pareto stationary
    assert sol.converged and sol.objective == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(sol.weights, [0.5, 0.5])


@pytest.mark.parametrize("solve", SOLVERS, ids=SOLVER_IDS)
@pytest.mark.parametrize("k", [5, 10, 20])
@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_agrees_with_slsqp(solve, k, lam):
    for rank, seed in ((k // 2, 1), (2 * k, 2)):  # optimum on a face (rank-deficient G), and inside
        g = random_psd(k, rank, seed + k)
        sol = solve(g, lam)
        assert sol.converged
        assert sol.weights.min() >= 0 and sol.weights.sum() == pytest.approx(1.0, abs=1e-12)
        assert sol.objective == pytest.approx(objective(g, sol.weights, lam), rel=1e-12)
        assert sol.objective == pytest.approx(slsqp(k, rank, seed + k, lam), abs=1e-4)


def test_pairwise_converges_where_plain_stalls():
    g = random_psd(20, 10, 0)
    fast = frank_wolfe(g, variant="pairwise")
    slow = frank_wolfe(g, variant="plain", max_iter=5000)
    assert fast.converged and fast.iterations < 2000
    assert (fast.weights == 0).sum() >= 2  # the optimum lies on a face of the simplex
    assert not slow.converged and slow.objective > fast.objective * (1 + 1e-6)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="square"):
        frank_wolfe(np.ones((2, 3)))
    with pytest.raises(ValueError, match="symmetric"):
        ugd(np.array([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="lambda"):
        ugd(np.eye(2), -1.0)
    with pytest.raises(ValueError, match="pairwise"):
        frank_wolfe(np.eye(2), variant="fast")  # type: ignore[arg-type]
    assert set(FW_VARIANTS) == {"pairwise", "away", "plain"}


def test_cosines_and_conflict_fraction():
    g = np.array([[1.0, 0.0], [-1.0, 1.0], [0.0, 2.0], [0.0, 0.0]])  # the last gradient vanishes
    gram = g @ g.T
    cos = cosine_matrix(gram)
    assert cos[0, 1] == pytest.approx(-1 / np.sqrt(2)) and cos[1, 2] == pytest.approx(1 / np.sqrt(2))
    assert cos[0, 2] == 0 and (cos[3] == 0).all()
    assert negative_cosine_fraction(gram) == pytest.approx(1 / 6)  # one conflicting pair of six
