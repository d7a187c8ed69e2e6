"""Figure 4 (equation 11 for fixed weightings against the UGD and Frank-Wolfe optima) and figure 3
(instability of UGD weights estimated from few samples), on a Gram matrix of task gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import Tensor, nn

from minsnr.gram import Range, gram_matrix, make_task_batch
from minsnr.schedule import Schedule
from minsnr.solvers import Solution, frank_wolfe, objective, ugd
from minsnr.weighting import STRATEGIES, x0_weight

# The fixed weightings of figure 4 with the paper's gammas (section 3.4; the registry's defaults): name ->
# (strategy, gamma). `plain` is left out: its x0-space weight depends on the target, figure 4's does not;
# the strategies that came after the paper are left out to keep the figure the paper's.
FIGURE4_LEFT_OUT = ("plain", "sigmoid", "p2", "debiased", "edm")
FIGURE4: dict[str, tuple[str, float | None]] = {
    name: (name, w.default) for name, w in STRATEGIES.items() if name not in FIGURE4_LEFT_OUT
}

ImageSampler = Callable[[int, torch.Generator], tuple[Tensor, Tensor | None]]


def fixed_weights(
    schedule: Schedule, ranges: list[Range], strategy: str, gamma: float | None = None
) -> NDArray[np.float64]:
    """Task weights of a fixed strategy: its x0-space weight (section 3.4) averaged over each task's
    timestep range, normalised to sum to 1."""
    snr = schedule.snr(torch.arange(schedule.num_timesteps, device=schedule.alphas_cumprod.device)).cpu().double()
    w = x0_weight(snr, strategy, gamma)
    means = np.array([float(w[lo:hi].mean()) for lo, hi in ranges])
    return means / means.sum()


def _entry(sol: Solution) -> dict[str, Any]:
    return {
        "weights": sol.weights.tolist(),
        "objective": sol.objective,
        "iterations": sol.iterations,
        "converged": sol.converged,
    }


def compare(gram: ArrayLike, schedule: Schedule, ranges: list[Range], lam: float = 0.0) -> dict[str, dict[str, Any]]:
    """Equation 11 for every FIGURE4 weighting and for the UGD and Frank-Wolfe optima (figure 4)."""
    out: dict[str, dict[str, Any]] = {}
    for name, (strategy, gamma) in FIGURE4.items():
        w = fixed_weights(schedule, ranges, strategy, gamma)
        out[name] = {"weights": w.tolist(), "objective": objective(gram, w, lam), "gamma": gamma}
    out["ugd"] = _entry(ugd(gram, lam))
    out["frank_wolfe"] = _entry(frank_wolfe(gram, lam))
    return out


def cosine_matrix(gram: ArrayLike) -> NDArray[np.float64]:
    """cos(g_k, g_l) = G_kl / sqrt(G_kk G_ll); 0 where a gradient vanishes."""
    g = np.asarray(gram, dtype=np.float64)
    norm = np.sqrt(np.clip(np.diag(g), 0, None))
    denom = np.outer(norm, norm)
    return np.divide(g, denom, out=np.zeros_like(g), where=denom > 0)


def negative_cosine_fraction(gram: ArrayLike) -> float:
    """Share of task pairs k < l whose gradients conflict (negative cosine)."""
    cos = cosine_matrix(gram)
    k = cos.shape[0]
    if k < 2:
        return 0.0
    return float((cos[np.triu_indices(k, 1)] < 0).mean())


def instability(
    model: nn.Module,
    draw: ImageSampler,
    schedule: Schedule,
    target: str,
    ranges: list[Range],
    *,
    sizes: list[int],
    repeats: int,
    lam: float = 0.0,
    relative_lambda: bool = False,
    seed: int = 0,
    block: int | None = None,
    micro_batch: int | None = None,
) -> list[dict[str, Any]]:
    """Figure 3: UGD weights from n fresh images per task (n in `sizes`), `repeats` times each.

    `draw(m, generator)` returns m images [m, C, H, W] and labels (or None). The spread of a size is the
    mean over tasks of the standard deviation of the weight across repeats. relative_lambda: lambda is
    in units of each Gram matrix's mean diagonal trace(G) / K.
    """
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        weights = []
        for _ in range(repeats):
            x0, labels = draw(n * len(ranges), gen)
            batch = make_task_batch(x0, labels, ranges, share=False, generator=gen).to(device)
            gram = gram_matrix(model, batch, schedule, target, block=block, micro_batch=micro_batch)
            scale = float(gram.diagonal().mean()) if relative_lambda else 1.0
            weights.append(ugd(gram.numpy(), lam * scale).weights)
        w = np.stack(weights)
        out.append(
            {
                "samples_per_task": n,
                "weights": w.tolist(),
                "mean": w.mean(0).tolist(),
                "std": w.std(0).tolist(),
                "spread": float(w.std(0).mean()),
            }
        )
    return out
