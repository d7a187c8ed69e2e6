"""Which noise goes with which image inside a training batch (`loss.noise_assignment`).

- independent: each image keeps the noise drawn for its row, the paper's i.i.d. pairing (eq. 5).
- immiscible (Li et al. 2024, "Immiscible Diffusion: Accelerating Diffusion Training with Noise
  Assignment"): the batch's B noise vectors are re-assigned to its B images by the permutation pi that
  minimises sum_i ||x0_i - noise_pi(i)||^2 over the flattened images, a linear assignment problem solved
  exactly by scipy's `linear_sum_assignment`.

The assignment only permutes the rows of the noise: the same set of noise vectors is drawn as with
`independent`, so runs that differ in this option share their random numbers. It changes the joint
distribution of (x0, noise) inside a batch: each noise vector is still a standard Gaussian draw, but it
is no longer independent of its image (nearby noise goes to each image), so the training loss is no
longer exactly the paper's eq. 5 expectation over independent x0 and noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from minsnr.registry import lookup

# scipy's solver (shortest augmenting paths, Hungarian-type) is O(B^3) in the batch size B and single-threaded
# on the CPU whatever the device. On 2 cores of an Intel Xeon (benchmarks/immiscible.py) one call took 0.16 ms
# at B = 64 (1x8x8, 0.6% of a quickstart step) but 0.31-0.36 s at B = 2048 (1x8x8 to 4x32x32; the solver alone
# 0.22-0.33 s), about 5x per doubling of B: above 2048, lower train.batch_size and raise train.grad_accum.
MAX_ASSIGNMENT_BATCH = 2048


def independent(x0: Tensor, noise: Tensor) -> Tensor:
    """The noise unchanged: each image keeps its own independent draw (the paper)."""
    return noise


def immiscible(x0: Tensor, noise: Tensor) -> Tensor:
    """noise[perm] with perm minimising sum_i ||x0_i - noise_perm(i)||^2 over the flattened images.

    sum_i ||x0_i - n_perm(i)||^2 = sum_i ||x0_i||^2 + sum_j ||n_j||^2 - 2 sum_i <x0_i, n_perm(i)>, and the two
    norm sums do not depend on perm: the minimiser is the permutation of largest total inner product. The
    [B, B] inner products are taken on the data's device in float32 (TF32 off: full float32 products, and no
    cancellation of the large norms), and only that matrix goes to the CPU for scipy (a host sync)."""
    b = x0.shape[0]
    if noise.shape[0] != b:
        raise ValueError(f"immiscible: {b} images but {noise.shape[0]} noise vectors")
    x, n = x0.detach().reshape(b, -1).float(), noise.detach().reshape(b, -1).float()
    tf32 = torch.backends.cuda.matmul.allow_tf32  # set by minsnr.run on CUDA; restored below
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        inner = x @ n.T
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    _, cols = linear_sum_assignment(inner.cpu().numpy(), maximize=True)  # square: rows 0..B-1 in order
    return noise[torch.as_tensor(cols, device=noise.device)]


# name -> (x0 [B, ...], noise [B, ...]) -> the noise re-ordered for x0; `loss.noise_assignment` chooses one.
NOISE_ASSIGNMENTS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "independent": independent,
    "immiscible": immiscible,
}
DEFAULT_NOISE_ASSIGNMENT = "independent"


def assign_noise(name: str, x0: Tensor, noise: Tensor) -> Tensor:
    """The registered assignment `name` applied to one batch; immiscible refuses B > MAX_ASSIGNMENT_BATCH."""
    assignment = lookup(NOISE_ASSIGNMENTS, name, "loss.noise_assignment")
    if name == "immiscible" and x0.shape[0] > MAX_ASSIGNMENT_BATCH:
        raise ValueError(
            f"loss.noise_assignment=immiscible solves an O(B^3) assignment per batch; batch size {x0.shape[0]} "
            f"is above its limit MAX_ASSIGNMENT_BATCH={MAX_ASSIGNMENT_BATCH}"
        )
    return assignment(x0, noise)
