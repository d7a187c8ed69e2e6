"""Solvers for the task weights of section 3.3 on a Gram matrix G_kl = <g_k, g_l>.

Equation 11 (equation 10 when lambda = 0) on the simplex:
    min_w ||sum_k w_k g_k||^2 + lambda ||w||^2 = w^T (G + lambda I) w,   w_k >= 0, sum_k w_k = 1.
Frank-Wolfe (Sener & Koltun's choice, [49]) with pairwise or away steps and exact line search on the
quadratic converges linearly; plain Frank-Wolfe stalls once the optimum lies on a face of the simplex.
UGD (equations 12-13) runs Adam on the softmax logits beta.

Both stop on the Frank-Wolfe duality gap 2 (w^T A w - min_k (A w)_k), an upper bound on
f(w) - f(w*) (as is f(w) itself, f* >= 0): converged means that bound is <= tol * f(w), so f is within a
relative tol of the optimum, or below a numerical floor of 1e-13 * max_k A_kk when the optimum is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

FW_VARIANTS = ("pairwise", "away", "plain")
_FLOOR = 1e-13


@dataclass
class Solution:
    weights: NDArray[np.float64]  # [K] on the simplex
    objective: float  # w^T (G + lambda I) w, equation 11
    iterations: int
    converged: bool  # duality gap reached the tolerance


def regularised(gram: ArrayLike, lam: float = 0.0) -> NDArray[np.float64]:
    """A = G + lambda I as a float64 matrix; checks that G is square and symmetric."""
    g = np.asarray(gram, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] == 0:
        raise ValueError(f"Gram matrix must be square and non-empty, got shape {g.shape}")
    if not np.allclose(g, g.T, rtol=1e-8, atol=1e-12 * max(np.abs(g).max(), 1e-300)):
        raise ValueError("Gram matrix is not symmetric")
    if lam < 0:
        raise ValueError(f"lambda must be >= 0, got {lam}")
    return g + lam * np.eye(g.shape[0])


def objective(gram: ArrayLike, weights: ArrayLike, lam: float = 0.0) -> float:
    """Equation 11: ||sum_k w_k g_k||^2 + lambda ||w||^2 = w^T (G + lambda I) w."""
    w = np.asarray(weights, dtype=np.float64)
    return float(w @ regularised(gram, lam) @ w)


def _gap(a: NDArray[np.float64], w: NDArray[np.float64]) -> tuple[float, float, NDArray[np.float64]]:
    aw = a @ w
    f = float(w @ aw)
    return f, 2.0 * (f - float(aw.min())), aw


def _done(f: float, gap: float, tol: float, scale: float) -> bool:
    return min(gap, f) <= max(tol * f, _FLOOR * scale)  # f - f* <= min(gap, f) as f* >= 0


def frank_wolfe(
    gram: ArrayLike,
    lam: float = 0.0,
    *,
    variant: Literal["pairwise", "away", "plain"] = "pairwise",
    tol: float = 1e-10,
    max_iter: int = 100_000,
) -> Solution:
    """Minimise equation 11 on the simplex by Frank-Wolfe with exact line search (Lacoste-Julien & Jaggi 2015).

    pairwise: move mass from the worst active vertex to the best vertex; away: either toward the best
    vertex or away from the worst active one; plain: toward the best vertex only (slow on faces).
    """
    if variant not in FW_VARIANTS:
        raise ValueError(f"unknown Frank-Wolfe variant {variant!r}; valid: {', '.join(FW_VARIANTS)}")
    a = regularised(gram, lam)
    k = a.shape[0]
    scale = float(np.abs(np.diag(a)).max())
    w = np.zeros(k)
    w[int(np.argmin(np.diag(a)))] = 1.0  # best vertex
    it = 0
    while True:
        f, gap, aw = _gap(a, w)
        converged = _done(f, gap, tol, scale)
        if converged or it == max_iter:
            return Solution(w, f, it, converged)
        it += 1
        s = int(np.argmin(aw))  # Frank-Wolfe vertex: smallest gradient 2(Aw)_s
        active = np.flatnonzero(w > 0)
        v = int(active[np.argmax(aw[active])])  # away vertex: largest gradient among active ones
        away = variant == "away" and aw[v] - f > f - aw[s] and w[v] < 1.0  # away step is steeper
        if variant == "pairwise":
            d = np.zeros(k)
            d[s], d[v] = 1.0, -1.0
            step_max = w[v]
        elif away:
            d = w.copy()
            d[v] -= 1.0  # d = w - e_v
            step_max = w[v] / (1.0 - w[v])
        else:
            d = -w.copy()
            d[s] += 1.0  # d = e_s - w
            step_max = 1.0
        curvature = float(d @ a @ d)
        step = step_max if curvature <= 0 else min(max(-float(d @ aw) / curvature, 0.0), step_max)
        w = w + step * d
        if step == step_max and (variant == "pairwise" or away):
            w[v] = 0.0  # drop step: the away vertex leaves the active set exactly
        w = np.clip(w, 0.0, None)
        w /= w.sum()


def ugd(
    gram: ArrayLike,
    lam: float = 0.0,
    *,
    lr: float = 0.3,
    tol: float = 1e-5,
    max_iter: int = 50_000,
    patience: int = 100,
) -> Solution:
    """Equations 12-13: w = softmax(beta), Adam on beta; lr halves after `patience` steps without improvement.

    beta is unconstrained, so weights reach 0 only in the limit and convergence is slower than
    Frank-Wolfe's (thousands of steps); tol = 1e-5 puts the objective within 1e-5 of the optimum, relatively.
    """
    a = regularised(gram, lam)
    k = a.shape[0]
    scale = float(np.abs(np.diag(a)).max())
    beta, m, v = np.zeros(k), np.zeros(k), np.zeros(k)
    b1, b2 = 0.9, 0.999
    best, since = np.inf, 0
    it = 0
    while True:
        w = np.exp(beta - beta.max())
        w /= w.sum()  # eq. 12
        f, gap, aw = _gap(a, w)
        converged = _done(f, gap, tol, scale)
        if converged or it == max_iter:
            return Solution(w, f, it, converged)
        it += 1
        if f < best:
            best, since = f, 0
        else:
            since += 1
            if since > patience:
                lr, since = lr / 2, 0
        grad_w = 2 * aw
        grad = w * (grad_w - w @ grad_w)  # chain rule through the softmax: d f / d beta (eq. 13)
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad**2
        beta -= lr * (m / (1 - b1**it)) / (np.sqrt(v / (1 - b2**it)) + 1e-300)
