"""Per-task gradients, the float64 Gram matrix, the figure-4 weights and the training monitor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from minsnr.config import Config
from minsnr.data import ArrayDataset
from minsnr.gram import gram_matrix, make_task_batch, sampled_ranges, task_gradients, task_losses
from minsnr.pareto.compare import FIGURE4, compare, fixed_weights, instability
from minsnr.pareto.monitor import make_pareto_hook, pareto_metrics
from minsnr.schedule import make_schedule
from minsnr.timesteps import bins
from minsnr.train import HookContext


class TinyNet(nn.Module):
    """forward(x, t, labels) -> same shape, with time and class conditioning and dropout (to be disabled)."""

    def __init__(self, channels: int = 1, num_classes: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(channels, 6, 3, padding=1)
        self.time = nn.Linear(1, 6)
        self.label = nn.Embedding(num_classes + 1, 6)
        self.unused = nn.Linear(2, 2)  # gets no gradient: must count as zeros
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(6, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        cond = self.time(t[:, None].to(x.dtype) / 1000)  # t: int64 in training, float when sampling
        if labels is not None:
            cond = cond + self.label(labels)
        return self.conv2(self.drop(torch.tanh(self.conv1(x) + cond[:, :, None, None])))


def setup(num_tasks: int = 4, images: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = TinyNet().double()
    x0 = torch.rand(images, 1, 6, 6, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, 3, (images,))
    sched = make_schedule("cosine")
    batch = make_task_batch(x0, labels, bins(1000, num_tasks), generator=torch.Generator().manual_seed(1))
    return model, sched, batch


def reference_gradients(model: nn.Module, batch, sched, target: str) -> torch.Tensor:
    """One task at a time by plain autograd, with the forward process written out (eq. 2, appendix B)."""
    model.eval()
    rows = []
    for k in range(batch.num_tasks):
        m = batch.task == k
        x0, eps, t = batch.x0[m], batch.noise[m], batch.t[m]
        a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        x_t = alpha * x0 + sigma * eps
        pred = model(x_t, t.double(), batch.labels[m])
        x0_hat = {"x0": pred, "eps": (x_t - sigma * pred) / alpha, "v": alpha * x_t - sigma * pred}[target]
        model.zero_grad(set_to_none=True)
        ((x0_hat - x0) ** 2).mean().backward()
        rows.append(
            torch.cat(
                [
                    torch.zeros(p.numel(), dtype=p.dtype) if p.grad is None else p.grad.flatten()
                    for p in model.parameters()
                ]
            )
        )
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def test_ranges_and_task_batch():
    assert bins(1000, 3) == [(0, 333), (333, 667), (667, 1000)]
    ranges = sampled_ranges(1000, 5, torch.Generator().manual_seed(0))
    assert all(hi == lo + 1 for lo, hi in ranges) and len({lo for lo, _ in ranges}) == 5
    with pytest.raises(ValueError, match="number of timestep ranges"):
        bins(10, 11)
    x0 = torch.randn(8, 1, 2, 2)
    shared = make_task_batch(x0, None, bins(1000, 4))
    assert shared.x0.shape[0] == 32 and torch.equal(shared.x0[8:16], x0)
    split = make_task_batch(x0, torch.arange(8), bins(1000, 4), share=False)
    assert split.x0.shape[0] == 8 and split.task.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for b in (shared, split):
        lo = torch.tensor([r[0] for r in b.ranges])[b.task]
        hi = torch.tensor([r[1] for r in b.ranges])[b.task]
        assert ((b.t >= lo) & (b.t < hi)).all()
    with pytest.raises(ValueError, match="8 images"):
        make_task_batch(x0, None, bins(1000, 3), share=False)


@pytest.mark.parametrize("target", ["x0", "eps", "v"])
def test_task_gradients_match_plain_autograd(target):
    model, sched, batch = setup()
    model.train()
    ref = reference_gradients(model, batch, sched, target)
    model.train()
    grads = task_gradients(model, batch, sched, target, micro_batch=2)
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())  # training gradients untouched
    torch.testing.assert_close(grads, ref, rtol=1e-6, atol=1e-9)
    assert ref.abs().max() > 1e-3  # a real signal, not zeros
    ref_gram = ref @ ref.T
    for block, micro in ((None, None), (1, 2), (3, None)):  # normal, low-memory (recomputes), blockwise
        gram = gram_matrix(model, batch, sched, target, block=block, micro_batch=micro)
        assert gram.dtype == torch.float64 and torch.equal(gram, gram.T)
        torch.testing.assert_close(gram, ref_gram, rtol=1e-6, atol=1e-9)


def test_gram_objective_is_squared_norm_of_weighted_gradient():
    model, sched, batch = setup(num_tasks=5)
    gram = gram_matrix(model, batch, sched, "eps").numpy()
    w = np.random.default_rng(0).dirichlet(np.ones(5))
    model.eval()
    losses = []  # sum_k w_k L_k by direct autograd, independent of the task-gradient code
    for k in range(5):
        m = batch.task == k
        a = sched.alphas_cumprod[batch.t[m]].view(-1, 1, 1, 1)
        x_t = a.sqrt() * batch.x0[m] + (1 - a).sqrt() * batch.noise[m]
        eps_hat = model(x_t, batch.t[m].double(), batch.labels[m])
        x0_hat = (x_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
        losses.append(float(w[k]) * ((x0_hat - batch.x0[m]) ** 2).mean())
    grads = torch.autograd.grad(sum(losses), list(model.parameters()), allow_unused=True)
    direct = sum(float(g.square().sum()) for g in grads if g is not None)
    assert w @ gram @ w == pytest.approx(direct, rel=1e-6)


def test_compare_entries():
    model, sched, batch = setup(num_tasks=5)
    gram = gram_matrix(model, batch, sched, "x0").numpy()
    lam = 0.1 * np.trace(gram) / 5
    out = compare(gram, sched, batch.ranges, lam)
    assert set(out) == set(FIGURE4) | {"ugd", "frank_wolfe"}
    u = np.full(5, 0.2)
    assert out["const"]["objective"] == pytest.approx(u @ gram @ u + lam * 0.2, rel=1e-9)  # ||u||^2 = 1/5
    assert out["frank_wolfe"]["converged"] and out["ugd"]["converged"]
    best = out["frank_wolfe"]["objective"]
    assert out["ugd"]["objective"] == pytest.approx(best, rel=1e-4)
    assert all(out[name]["objective"] >= best * (1 - 1e-9) for name in FIGURE4)  # the optimum is a lower bound


def test_task_losses_match_reference():
    model, sched, batch = setup()
    losses = task_losses(model, batch, sched, "v", micro_batch=2)
    model.eval()
    for k in range(batch.num_tasks):
        m = batch.task == k
        a = sched.alphas_cumprod[batch.t[m]].view(-1, 1, 1, 1)
        x_t = a.sqrt() * batch.x0[m] + (1 - a).sqrt() * batch.noise[m]
        with torch.no_grad():
            v = model(x_t, batch.t[m].double(), batch.labels[m])
        x0_hat = a.sqrt() * x_t - (1 - a).sqrt() * v
        assert float(losses[k]) == pytest.approx(float(((x0_hat - batch.x0[m]) ** 2).mean()), rel=1e-9)


def test_fixed_weights_closed_forms():
    sched = make_schedule("cosine")
    ranges = bins(1000, 4)
    np.testing.assert_allclose(fixed_weights(sched, ranges, "const"), np.full(4, 0.25))
    snr = (sched.alphas_cumprod / (1 - sched.alphas_cumprod)).numpy()
    for name, (strategy, gamma) in FIGURE4.items():
        x0w = {
            "const": np.ones_like(snr),
            "snr": snr,
            "max_snr": np.maximum(snr, 1.0),
            "min_snr": np.minimum(snr, 5.0),
            "soft_min_snr": 1 / (1 / snr + 1 / 5.0),
        }[name]
        means = np.array([x0w[lo:hi].mean() for lo, hi in ranges])
        np.testing.assert_allclose(fixed_weights(sched, ranges, strategy, gamma), means / means.sum(), rtol=1e-6)
    w = fixed_weights(sched, ranges, "snr")
    assert w[0] > 0.99  # SNR weighting piles the weight on the least noisy task


def test_monitor_matches_independent_computation():
    model, sched, _ = setup()
    model.train()
    x0 = torch.rand(2, 1, 6, 6, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 2])
    cfg = Config()
    cfg.loss.target, cfg.loss.weighting, cfg.loss.gamma = "eps", "min_snr", 3.0
    metrics = pareto_metrics(model, x0, labels, sched, cfg, num_tasks=5, seed=7)
    assert set(metrics) == {"pareto/objective_min_snr", "pareto/objective_ugd", "pareto/neg_cos_frac"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert model.training and all(p.grad is None for p in model.parameters())
    batch = make_task_batch(x0, labels, bins(1000, 5), generator=torch.Generator().manual_seed(7))
    g = reference_gradients(model, batch, sched, "eps").numpy()
    gram = g @ g.T
    negatives = sum(g[k] @ g[j] < 0 for k in range(5) for j in range(k + 1, 5))
    assert 0 <= metrics["pareto/neg_cos_frac"] <= 1
    assert metrics["pareto/neg_cos_frac"] == pytest.approx(negatives / 10)
    snr = (sched.alphas_cumprod / (1 - sched.alphas_cumprod)).numpy()
    w = np.array([np.minimum(snr[lo:hi], 3.0).mean() for lo, hi in bins(1000, 5)])
    w /= w.sum()
    assert metrics["pareto/objective_min_snr"] == pytest.approx(w @ gram @ w, rel=1e-5)
    assert metrics["pareto/objective_ugd"] <= metrics["pareto/objective_min_snr"] * (1 + 1e-9)


def test_instability_shapes_and_spread():
    model, sched, _ = setup()
    pool = torch.rand(50, 1, 6, 6, dtype=torch.float64) * 2 - 1

    def draw(m: int, gen: torch.Generator):
        idx = torch.randint(0, 50, (m,), generator=gen)
        return pool[idx], idx % 3

    out = instability(model, draw, sched, "x0", bins(1000, 3), sizes=[1, 4], repeats=3, seed=0)
    assert [e["samples_per_task"] for e in out] == [1, 4]
    for e in out:
        w = np.array(e["weights"])
        assert w.shape == (3, 3) and np.allclose(w.sum(1), 1) and (w >= 0).all()
        assert e["spread"] == pytest.approx(w.std(0).mean())
        assert e["spread"] > 0  # different images give different optima


def test_training_hook_uses_a_fixed_batch(tmp_path):
    model, sched, _ = setup()
    model.float()
    images = np.random.default_rng(0).integers(0, 256, (20, 6, 6, 1), dtype=np.uint8)
    data = ArrayDataset(images, np.arange(20) % 3, num_classes=3, class_names=["a", "b", "c"], hflip=True)
    cfg = Config()
    cfg.loss.weighting, cfg.train.seed = "soft_min_snr", 3
    hook = make_pareto_hook(cfg, images=4, num_tasks=3)
    ctx = HookContext(10, model, model, cfg, sched, torch.device("cpu"), tmp_path, data)
    first, again = hook(ctx), hook(ctx)
    assert first == again  # same images, timesteps and noise every call
    idx = torch.randperm(20, generator=torch.Generator().manual_seed(3))[:4].tolist()
    x, y, _ = data.get_batch(idx)  # un-augmented items
    assert first == pareto_metrics(model, x, y, sched, cfg, num_tasks=3, seed=3)
    assert set(first) == {"pareto/objective_soft_min_snr", "pareto/objective_ugd", "pareto/neg_cos_frac"}
