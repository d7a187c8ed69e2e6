"""The training objective and the target conversions of appendix B, in float64."""

import pytest
import torch

from minsnr.loss import diffusion_loss
from minsnr.objective import convert, drop_labels, make_target, predict_eps, predict_x0
from minsnr.schedule import make_schedule
from minsnr.weighting import STRATEGIES, TARGETS, loss_weight

SCHED = make_schedule("cosine")


def x0_space_weight(snr: torch.Tensor, strategy: str) -> torch.Tensor:
    """Section 3.4 names, written out here independently of minsnr.weighting."""
    return {
        "const": torch.ones_like(snr),
        "snr": snr,
        "max_snr": torch.maximum(snr, torch.ones_like(snr)),
        "min_snr": torch.minimum(snr, torch.full_like(snr, 5.0)),
        "soft_min_snr": snr * 5.0 / (snr + 5.0),
        "sigmoid": snr / (1 + snr),  # eps-space sigmoid(0 - ln SNR) = 1 / (1 + SNR), times SNR
        "p2": snr / (1 + snr),  # eps-space 1 / (1 + SNR)^1
        "debiased": snr.sqrt(),  # eps-space 1 / sqrt(SNR)
        "edm": snr + 4.0,  # lambda(sigma) = 1/sigma^2 + 1/0.5^2
    }[strategy]


def random_problem(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (n,), generator=g)
    x0_hat = x0 + 0.3 * torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    a = SCHED.alpha(t).view(-1, 1, 1, 1)
    s = SCHED.sigma(t).view(-1, 1, 1, 1)
    return x0, eps, t, x0_hat, a, s


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "plain"])  # plain differs per target by design
def test_weighted_target_mse_equals_x0_objective(strategy):
    """Appendix B: w_target * ||target - pred||^2 == w_x0 * ||x0 - x0_hat||^2 for every target."""
    x0, eps, t, x0_hat, a, s = random_problem()
    x_t = a * x0 + s * eps
    eps_hat = (x_t - a * x0_hat) / s  # the same prediction, expressed as noise
    preds = {"x0": (x0, x0_hat), "eps": (eps, eps_hat), "v": (a * eps - s * x0, a * eps_hat - s * x0_hat)}
    snr = SCHED.snr(t)
    x0_objective = x0_space_weight(snr, strategy) * (x0 - x0_hat).square().mean(dim=(1, 2, 3))
    for target, (true, pred) in preds.items():
        weighted = loss_weight(snr, strategy, target=target) * (true - pred).square().mean(dim=(1, 2, 3))
        torch.testing.assert_close(weighted, x0_objective, rtol=1e-9, atol=0, msg=f"{strategy}/{target}")


def test_conversions_are_exact_inverses():
    x0, eps, t, x0_hat, a, s = random_problem(seed=1)
    x_t = a * x0 + s * eps
    for target in TARGETS:
        true = make_target(x0, eps, a, s, target)
        torch.testing.assert_close(predict_x0(true, x_t, a, s, target), x0, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(predict_eps(true, x_t, a, s, target), eps, rtol=1e-8, atol=1e-8)
        for dst in TARGETS:
            torch.testing.assert_close(
                convert(true, x_t, a, s, target, dst), make_target(x0, eps, a, s, dst), rtol=1e-8, atol=1e-8
            )
    v = a * eps - s * x0  # the definition, written out
    torch.testing.assert_close(make_target(x0, eps, a, s, "v"), v)


class X0Model(torch.nn.Module):
    """Fixed x0 predictor exposed in any target's parameterisation (float64)."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target

    def forward(self, x_t, t, labels):
        tl = t.long()
        a = SCHED.alpha(tl).view(-1, 1, 1, 1)
        s = SCHED.sigma(tl).view(-1, 1, 1, 1)
        x0_hat = torch.tanh(x_t) * 0.5 + 0.1 * t.view(-1, 1, 1, 1) / 1000
        eps_hat = (x_t - a * x0_hat) / s
        return {"x0": x0_hat, "eps": eps_hat, "v": a * eps_hat - s * x0_hat}[self.target]


@pytest.mark.parametrize("strategy", ["min_snr", "max_snr", "const", "snr", "soft_min_snr"])
def test_diffusion_loss_same_objective_for_every_target(strategy):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(64, 2, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (64,), generator=g)
    outs = {
        tg: diffusion_loss(X0Model(tg), x0, None, SCHED, target=tg, weighting=strategy, t=t, noise=noise)
        for tg in TARGETS
    }
    # reference: the x0-space objective of section 3.4 computed by hand
    a, s = SCHED.alpha(t).view(-1, 1, 1, 1), SCHED.sigma(t).view(-1, 1, 1, 1)
    x0_hat = X0Model("x0")(a * x0 + s * noise, t.double(), None)
    mse = (x0_hat - x0).square().mean(dim=(1, 2, 3))
    expected = (x0_space_weight(SCHED.snr(t), strategy) * mse).mean()
    for tg, out in outs.items():
        torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=0, msg=tg)
        torch.testing.assert_close(out.mse_x0.double(), mse, rtol=1e-6, atol=1e-12)
        assert torch.equal(out.t, t)
        assert not out.mse_x0.requires_grad


def test_diffusion_loss_draws_uniform_timesteps_and_uses_generator():
    x0 = torch.zeros(20000, 1, 1, 1)
    model = lambda x, t, y: x  # noqa: E731
    out1 = diffusion_loss(model, x0, None, SCHED, generator=torch.Generator().manual_seed(7))
    out2 = diffusion_loss(model, x0, None, SCHED, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out1.t, out2.t) and torch.equal(out1.loss, out2.loss)
    counts = torch.bincount(out1.t // 100, minlength=10).double()
    assert out1.t.min() >= 0 and out1.t.max() <= 999
    assert (counts / counts.sum() - 0.1).abs().max() < 0.015  # ten equal bins, 20k draws


def test_drop_labels_rate_and_null():
    labels = torch.randint(0, 10, (100000,), generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(labels, 0.15, null_label=10, generator=torch.Generator().manual_seed(1))
    frac = (dropped == 10).double().mean().item()
    assert abs(frac - 0.15) < 0.005
    kept = dropped != 10
    assert torch.equal(dropped[kept], labels[kept])
    assert torch.equal(drop_labels(labels, 0.0, 10), labels)


def test_unknown_target():
    with pytest.raises(ValueError, match="x0, eps, v"):
        diffusion_loss(lambda x, t, y: x, torch.zeros(2, 1, 2, 2), None, SCHED, target="score")


def test_model_receives_integer_timesteps_so_an_embedding_of_t_works():
    """diffusion_loss hands the model the int64 timesteps that index the schedule (nn.Embedding needs them)."""
    seen = []

    class EmbedT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(SCHED.num_timesteps, 1)

        def forward(self, x, t, y):
            seen.append(t)
            return x * self.emb(t).view(-1, 1, 1, 1)

    t = torch.tensor([0, 5, 999])
    out = diffusion_loss(EmbedT(), torch.randn(3, 1, 2, 2), None, SCHED, t=t)
    assert seen[0].dtype == torch.int64 and torch.equal(seen[0], t)
    assert torch.isfinite(out.loss)
