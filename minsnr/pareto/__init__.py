"""The paper's Pareto view of diffusion training (sections 3.2-3.4, appendix A; figures 2, 3, 4).

solvers   Frank-Wolfe (pairwise / away steps) and UGD for equation 11 on a Gram matrix
gram      tasks (timestep ranges), per-task gradients of the unweighted x0 loss, float64 Gram matrix
compare   figure 4 (fixed weightings against the optima), gradient cosines, figure 3 (instability)
monitor   the trainer's `train.pareto_every` hook
cli       `minsnr pareto`;  conflict: `minsnr conflict` (figure 2)
"""

from minsnr.gram import TaskBatch, gram_matrix, make_task_batch, sampled_ranges, task_gradients
from minsnr.pareto.compare import FIGURE4, compare, cosine_matrix, fixed_weights, instability, negative_cosine_fraction
from minsnr.solvers import Solution, frank_wolfe, objective, ugd

__all__ = [
    "FIGURE4",
    "compare",
    "cosine_matrix",
    "fixed_weights",
    "instability",
    "negative_cosine_fraction",
    "TaskBatch",
    "gram_matrix",
    "make_task_batch",
    "sampled_ranges",
    "task_gradients",
    "Solution",
    "frank_wolfe",
    "objective",
    "ugd",
]
