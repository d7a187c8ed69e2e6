"""Per-task gradients of the unweighted x0-space loss and their float64 Gram matrix (section 3.2-3.3).

Timesteps are split into K tasks, each a range [lo, hi) (K equal ranges, minsnr.timesteps.bins, or K sampled
timesteps as ranges of width 1). A `TaskBatch` fixes, for every sample, its image, label, task, timestep and noise, so every
gradient is a deterministic function of the model. The loss of task k is the mean over its samples of
||x0 - x0_hat||^2 / (C H W), the loss whose weights section 3.4 discusses, whatever the model's target.

`gram_matrix` never holds more than `block` flattened gradients: with block = K it computes K
gradients once; with block = 1 (low memory) it recomputes gradients, K + K (K - 1) / 2 of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from tqdm import tqdm

from minsnr.objective import predict_x0, q_sample
from minsnr.schedule import Schedule
from minsnr.timesteps import Range

_DOT_CHUNK = 1 << 20  # parameters per float64 chunk when multiplying gradients


def sampled_ranges(num_timesteps: int, num_tasks: int, generator: torch.Generator | None = None) -> list[Range]:
    """K distinct timesteps drawn uniformly, sorted, each as the range [t, t + 1)."""
    if not 1 <= num_tasks <= num_timesteps:
        raise ValueError(f"number of tasks must be in [1, {num_timesteps}], got {num_tasks}")
    ts = torch.randperm(num_timesteps, generator=generator)[:num_tasks].sort().values.tolist()
    return [(t, t + 1) for t in ts]


@dataclass
class TaskBatch:
    x0: Tensor  # [N, C, H, W] clean images
    labels: Tensor | None  # [N] long, None for an unconditional model
    t: Tensor  # [N] long timesteps, t[i] in ranges[task[i]]
    noise: Tensor  # [N, C, H, W]
    task: Tensor  # [N] long task index of each sample
    ranges: list[Range]

    @property
    def num_tasks(self) -> int:
        return len(self.ranges)

    def to(self, device: torch.device | str) -> TaskBatch:
        labels = None if self.labels is None else self.labels.to(device)
        return replace(
            self,
            x0=self.x0.to(device),
            labels=labels,
            t=self.t.to(device),
            noise=self.noise.to(device),
            task=self.task.to(device),
        )

    def indices(self, k: int) -> Tensor:
        return (self.task == k).nonzero().flatten()


def make_task_batch(
    x0: Tensor,
    labels: Tensor | None,
    ranges: list[Range],
    *,
    share: bool = True,
    generator: torch.Generator | None = None,
) -> TaskBatch:
    """Fix timesteps (uniform within each task's range) and noise for `x0` [B, C, H, W].

    share=True: every task uses all B images (N = K B). share=False: the images are split into K groups
    of B / K, one per task (N = B; B must be a multiple of K).
    """
    k, b = len(ranges), x0.shape[0]
    if share:
        task = torch.arange(k).repeat_interleave(b)
        x0 = x0.repeat(k, *([1] * (x0.dim() - 1)))
        labels = None if labels is None else labels.repeat(k)
    else:
        if b % k:
            raise ValueError(f"{b} images cannot be split evenly over {k} tasks")
        task = torch.arange(k).repeat_interleave(b // k)
    lo = torch.tensor([r[0] for r in ranges])[task]
    hi = torch.tensor([r[1] for r in ranges])[task]
    t = lo + (torch.rand(task.shape, generator=generator, dtype=torch.float64) * (hi - lo)).long()
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    return TaskBatch(x0.cpu(), None if labels is None else labels.cpu(), t, noise, task, list(ranges))


def x0_mse(
    model: nn.Module, x0: Tensor, labels: Tensor | None, t: Tensor, noise: Tensor, schedule: Schedule, target: str
) -> Tensor:
    """Per-sample unweighted x0-space MSE [B], differentiable (eq. 5 whatever the target, appendix B)."""
    if schedule.alphas_cumprod.device != t.device:
        schedule = schedule.to(t.device)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    alpha = schedule.alpha(t).to(x0.dtype).view(shape)
    sigma = schedule.sigma(t).to(x0.dtype).view(shape)
    x_t = q_sample(x0, noise, alpha, sigma)
    pred = model(x_t, t, labels)
    pred = pred.to(torch.promote_types(pred.dtype, torch.float32))  # bf16/fp16 outputs measured in fp32
    return (predict_x0(pred, x_t, alpha, sigma, target) - x0).square().mean(dim=tuple(range(1, x0.dim())))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while measuring, so gradients are deterministic; restores the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _chunks(idx: Tensor, micro_batch: int | None) -> list[Tensor]:
    return list(idx.split(micro_batch)) if micro_batch else [idx]


def _mse(model: nn.Module, batch: TaskBatch, schedule: Schedule, target: str, i: Tensor) -> Tensor:
    labels = None if batch.labels is None else batch.labels[i]
    return x0_mse(model, batch.x0[i], labels, batch.t[i], batch.noise[i], schedule, target)


def task_losses(
    model: nn.Module, batch: TaskBatch, schedule: Schedule, target: str, *, micro_batch: int | None = None
) -> Tensor:
    """Unweighted x0-space loss of every task [K] (float64, no gradients)."""
    out = torch.zeros(batch.num_tasks, dtype=torch.float64)
    with torch.no_grad(), eval_mode(model):
        for k in range(batch.num_tasks):
            idx = batch.indices(k)
            for i in _chunks(idx, micro_batch):
                out[k] += _mse(model, batch, schedule, target, i).double().sum().cpu()
            out[k] /= len(idx)
    return out


def trainable(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def task_gradient(
    model: nn.Module, batch: TaskBatch, schedule: Schedule, target: str, k: int, *, micro_batch: int | None = None
) -> Tensor:
    """Flattened gradient [P] of task k's loss (float32, or the parameters' dtype if wider); samples in
    chunks of `micro_batch` to bound memory. Uses the model's current train/eval mode."""
    params = trainable(model)
    idx = batch.indices(k)
    dtype = torch.promote_types(params[0].dtype, torch.float32)
    flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=dtype)
    for i in _chunks(idx, micro_batch):
        mse = _mse(model, batch, schedule, target, i)
        grads = torch.autograd.grad(mse.sum() / len(idx), params, allow_unused=True)
        flat += torch.cat(
            [(torch.zeros_like(p) if g is None else g).flatten().to(dtype) for g, p in zip(grads, params)]
        )
    return flat


def task_gradients(
    model: nn.Module, batch: TaskBatch, schedule: Schedule, target: str, *, micro_batch: int | None = None
) -> Tensor:
    """All K flattened gradients [K, P]; needs K P floats of memory."""
    with eval_mode(model):
        return _stacked(
            lambda k: task_gradient(model, batch, schedule, target, k, micro_batch=micro_batch), range(batch.num_tasks)
        )


def _stacked(grad: Callable[[int], Tensor], tasks: range) -> Tensor:
    """Gradients of `tasks` as rows of one preallocated matrix (no second copy, unlike torch.stack)."""
    first = grad(tasks[0])
    out = first.new_empty(len(tasks), first.numel())
    out[0] = first
    del first
    for j, k in enumerate(tasks[1:], start=1):
        out[j] = grad(k)
    return out


def dot64(a: Tensor, b: Tensor) -> Tensor:
    """a [m, P] @ b [n, P]^T accumulated in float64, converting P-chunks so no float64 copy of a is made."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for s in range(0, a.shape[1], _DOT_CHUNK):
        out += a[:, s : s + _DOT_CHUNK].double() @ b[:, s : s + _DOT_CHUNK].double().T
    return out


def gram_matrix(
    model: nn.Module,
    batch: TaskBatch,
    schedule: Schedule,
    target: str,
    *,
    block: int | None = None,
    micro_batch: int | None = None,
    progress: bool = False,
) -> Tensor:
    """G_kl = <g_k, g_l> [K, K] float64 on the CPU, holding at most `block` gradients (None: all K) at once."""
    k_total = batch.num_tasks
    block = k_total if block is None else max(1, min(block, k_total))
    gram = torch.zeros(k_total, k_total, dtype=torch.float64)
    starts = range(0, k_total, block)
    total = sum(k_total - s for s in starts)  # gradient computations, recomputations included
    with eval_mode(model), tqdm(total=total, desc="task gradients", disable=not progress) as bar:

        def grad(k: int) -> Tensor:
            bar.update()
            return task_gradient(model, batch, schedule, target, k, micro_batch=micro_batch)

        for s in starts:
            e = min(s + block, k_total)
            held = _stacked(grad, range(s, e))  # [e - s, P]
            gram[s:e, s:e] = dot64(held, held).cpu()
            for other in range(e, k_total):  # stream the remaining tasks past the held block
                col = dot64(held, grad(other)[None]).cpu()[:, 0]
                gram[s:e, other] = col
                gram[other, s:e] = col
            del held
    return (gram + gram.T) / 2


def auto_block(model: nn.Module, num_tasks: int) -> int:
    """Gradients to hold at once: all K on the CPU; on CUDA as many as fit in half the free memory."""
    params = trainable(model)
    device = params[0].device
    if device.type != "cuda":
        return num_tasks
    free, _ = torch.cuda.mem_get_info(device)
    per_grad = 4 * sum(p.numel() for p in params)
    return max(1, min(num_tasks, int(0.5 * free) // per_grad))
