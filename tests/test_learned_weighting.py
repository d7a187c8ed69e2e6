"""loss.weighting=learned (EDM2's uncertainty weighting, minsnr.adaptive.LearnedWeight): its equilibrium,
the model gradient it gives, exact resume, export and sampling from such a run."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from minsnr.adaptive import LearnedWeight, make_adaptive
from minsnr.checkpoint import CheckpointError, load_checkpoint, load_model
from minsnr.config import ConfigError, load_config
from minsnr.loss import diffusion_loss
from minsnr.schedule import make_schedule
from minsnr.train import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import ROOT, straight_and_resumed, tiny_cfg  # noqa: E402

T = 20


def offset_model(truth: torch.Tensor, offsets: torch.Tensor):
    """A 'model' whose prediction is truth + offsets[i] for sample i: its MSE is offsets^2 exactly."""
    return lambda x_t, t, labels: truth + offsets.view(-1, *([1] * (truth.dim() - 1)))


@pytest.mark.parametrize("target", ["x0", "eps", "v"])
def test_u_gradient_vanishes_exactly_at_the_conditional_mean(target):
    """With u a free table, d/du_t of the batch loss mean_i exp(-u_t) b m_i + u_t is (1/B) sum_{i: t_i = t}
    (1 - exp(-u_t) b m_i): zero for every t exactly when exp(u_t) = mean_{i: t_i = t} b m_i, the
    conditional mean (base b = 1 in the target's own space: the plain MSE)."""
    sched = make_schedule("cosine", T)
    reps = 3
    t = torch.arange(T).repeat(reps)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(T * reps, 1, 2, 2, generator=gen, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    alpha, sigma = sched.alpha(t).view(-1, 1, 1, 1), sched.sigma(t).view(-1, 1, 1, 1)
    truth = {"x0": x0, "eps": noise, "v": alpha * noise - sigma * x0}[target]
    offsets = 0.1 + torch.rand(T * reps, generator=gen, dtype=torch.float64)
    model = offset_model(truth, offsets)
    m = offsets.square()
    cond_mean = m.view(reps, T).mean(0)

    def grad_at(u_table: torch.Tensor) -> torch.Tensor:
        u = u_table.clone().requires_grad_(True)
        out = diffusion_loss(
            model,
            x0,
            None,
            sched,
            target=target,
            weighting="learned",
            t=t,
            noise=noise,
            adaptive=lambda tt: (torch.exp(-u[tt]), u[tt]),
        )
        out.loss.backward()
        return u.grad

    assert torch.allclose(grad_at(cond_mean.log()), torch.zeros(T, dtype=torch.float64), atol=1e-8)
    u = cond_mean.log() + torch.linspace(-0.5, 0.5, T, dtype=torch.float64)
    want = (1 - torch.exp(-u)[t] * m).view(reps, T).sum(0) / (T * reps)
    got = grad_at(u)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-8)
    assert bool((got.abs() > 1e-4).all())  # every u_t is off its equilibrium, so every gradient is not zero


def test_module_gradient_is_the_closed_form():
    """Through LearnedWeight: dL/d(weight, bias) = (1/B) sum_i (1 - exp(-u_i) m_i) (features[t_i], 1)."""
    sched = make_schedule("cosine", T)
    lw = LearnedWeight(sched)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        lw.weight.normal_(0, 0.1, generator=gen)
        lw.bias.fill_(-0.3)
    t = torch.randint(0, T, (64,), generator=gen)
    x0 = torch.randn(64, 1, 2, 2, generator=gen)
    offsets = 0.2 + torch.rand(64, generator=gen)
    out = diffusion_loss(offset_model(x0, offsets), x0, None, sched, target="x0", weighting="learned", t=t, adaptive=lw)
    out.loss.backward()
    feats = lw.features.double()[t]
    u = feats @ lw.weight.detach().double() + lw.bias.detach().double()
    r = (1 - torch.exp(-u) * offsets.double().square()) / 64
    assert torch.allclose(lw.weight.grad.double(), (r[:, None] * feats).sum(0), rtol=1e-5, atol=1e-7)
    assert torch.allclose(lw.bias.grad.double(), r.sum(), rtol=1e-5, atol=1e-7)
    # at u = ln c for a constant conditional mean c the gradient vanishes; bias ln c + 0.1 gives 1 - e^-0.1
    for shift, want in ((0.0, 0.0), (0.1, 1 - math.exp(-0.1))):
        lw.zero_grad()
        with torch.no_grad():
            lw.weight.zero_()
            lw.bias.fill_(math.log(0.49) + shift)
        diffusion_loss(
            offset_model(x0, torch.full((64,), 0.7)),
            x0,
            None,
            sched,
            target="x0",
            weighting="learned",
            t=t,
            adaptive=lw,
        ).loss.backward()
        assert abs(float(lw.bias.grad) - want) < 1e-6
        assert torch.allclose(lw.weight.grad.double(), want * feats.mean(0), atol=1e-6)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.emb = nn.Embedding(T, 1)

    def forward(self, x, t, labels):
        return self.conv(x) * (1 + self.emb(t).view(-1, 1, 1, 1))


@pytest.mark.parametrize("target", ["x0", "eps"])
def test_model_gradient_is_the_exp_minus_u_weighted_gradient(target):
    """The model sees weight exp(-u(t)) x (plain MSE of the target): the same gradient as diffusion_loss with
    the callable x0-space weight exp(-u(t(SNR))) x plain (1 for x0, SNR for eps, appendix B)."""
    sched = make_schedule("cosine", T)
    lw = LearnedWeight(sched)
    torch.manual_seed(3)
    with torch.no_grad():
        lw.weight.normal_(0, 0.5)
    net = TinyNet()
    x0 = torch.randn(32, 1, 4, 4)
    t = torch.randint(0, T, (32,))
    noise = torch.randn_like(x0)
    out = diffusion_loss(net, x0, None, sched, target=target, weighting="learned", t=t, noise=noise, adaptive=lw)
    grads = torch.autograd.grad(out.loss, list(net.parameters()))
    snr_table = sched.snr(torch.arange(T)).float()
    u_table = lw.u(torch.arange(T)).detach()

    def weight(snr: torch.Tensor) -> torch.Tensor:
        idx = (snr[:, None] - snr_table[None]).abs().argmin(1)  # the t of each SNR (SNR is monotone in t)
        return torch.exp(-u_table[idx]) * (1 if target == "x0" else snr)

    ref = diffusion_loss(net, x0, None, sched, target=target, weighting=weight, t=t, noise=noise)
    ref_grads = torch.autograd.grad(ref.loss, list(net.parameters()))
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-7)
    assert torch.allclose(out.loss - lw.u(t).mean(), ref.loss, rtol=1e-5)  # the u term adds to the loss, no more


def test_stateful_weighting_needs_its_state_and_refuses_importance_sampling(tmp_path):
    sched = make_schedule("cosine", T)
    x0 = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="stateful"):
        diffusion_loss(lambda x, t, y: x, x0, None, sched, weighting="learned")
    with pytest.raises(ValueError, match="is fixed"):
        diffusion_loss(
            lambda x, t, y: x, x0, None, sched, weighting="min_snr", adaptive=make_adaptive("learned", sched)
        )
    with pytest.raises(ConfigError, match="importance"):
        load_config(ROOT / "configs" / "quickstart.yaml", ["loss.weighting=learned", "loss.timesteps=importance"])
    with pytest.raises(ConfigError, match="learned.*pareto|pareto.*learned"):
        load_config(ROOT / "configs" / "quickstart.yaml", ["loss.weighting=learnd"])
    with pytest.raises(ConfigError, match="adapt_every"):
        load_config(ROOT / "configs" / "quickstart.yaml", ["loss.weighting=pareto", "loss.adapt_every=0"])


LEARNED = ["loss.weighting=learned", "sample.steps=2"]


def test_resume_is_bit_exact_and_the_export_carries_u(tmp_path):
    from minsnr.evaluate import sample

    a, b = straight_and_resumed(tmp_path, *LEARNED)
    assert a["loss_weighting"].keys() == b["loss_weighting"].keys() == {"features", "weight", "bias"}
    for k in a["loss_weighting"]:
        assert torch.equal(a["loss_weighting"][k], b["loss_weighting"][k]), k
    assert float(a["loss_weighting"]["bias"]) != 0.0  # u(t) was trained
    assert len(a["optimizer"]["param_groups"]) == 2 and a["optimizer"]["param_groups"][1]["weight_decay"] == 0.0
    assert all(not k.startswith(("weight", "bias", "features")) for k in a["ema"])  # not in the EMA
    # the export: u(t) beside the EMA weights, with the same step; the EMA file still loads and samples
    run = tmp_path / "one"
    exported = load_file(str(run / "loss_weight.safetensors"))
    assert exported.keys() == {f"loss_weight.{k}" for k in a["loss_weighting"]}
    for k, v in a["loss_weighting"].items():
        assert torch.equal(exported[f"loss_weight.{k}"], v)
    model, cfg = load_model(run / "ema.safetensors")
    assert cfg.loss.weighting == "learned"
    out = tmp_path / "samples.npz"
    assert (
        sample.main([str(run / "ema.safetensors"), "--num", "4", "--batch", "4", "--out", str(out), "--device", "cpu"])
        == 0
    )
    with np.load(out) as z:
        assert z["arr_0"].shape[0] == 4
    records = (run / "metrics.jsonl").read_text().splitlines()
    assert all("learned_u/000-099" in line for line in records)  # u per bin at every log step


def test_resuming_with_another_weighting_is_refused(tmp_path):
    train(tiny_cfg(tmp_path / "r", "train.steps=2", *LEARNED))
    with pytest.raises(CheckpointError, match="stateful loss weighting"):
        train(tiny_cfg(tmp_path / "r", "train.steps=4", "loss.weighting=min_snr"))


def test_torchrun_two_ranks_train_u_like_one(tmp_path):
    """u(t) lives outside DDP; its gradients are averaged by hand, so two ranks of 8 match one of 16."""
    from conftest import torchrun
    from test_train import TINY

    common = [*TINY, "train.steps=4", "checkpoint.every=4", "data.num_workers=0", "loss.weighting=learned"]
    res = torchrun(
        "train", str(ROOT / "configs" / "quickstart.yaml"), *common, "train.batch_size=8", f"run_dir={tmp_path / 'ddp'}"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    train(
        load_config(
            ROOT / "configs" / "quickstart.yaml", [*common, "train.batch_size=16", f"run_dir={tmp_path / 'one'}"]
        )
    )
    a = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "one" / "checkpoints" / "latest.pt")
    for name in ("weight", "bias"):
        torch.testing.assert_close(a["loss_weighting"][name], b["loss_weighting"][name], rtol=1e-4, atol=1e-5, msg=name)
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_missing_loss_weight_export_is_rewritten_at_resume(tmp_path, capsys):
    """A kill between the two exports leaves loss_weight.safetensors behind; the next start rewrites it."""
    run = tmp_path / "k"
    train(tiny_cfg(run, "train.steps=2", *LEARNED))
    want = load_file(str(run / "loss_weight.safetensors"))
    (run / "loss_weight.safetensors").unlink()
    train(tiny_cfg(run, "train.steps=2", *LEARNED))  # already at its last step: nothing trains, nothing saves
    assert (
        "loss_weight.safetensors is missing; rewrote it with the loss weighting state of step 2"
        in capsys.readouterr().out
    )
    got = load_file(str(run / "loss_weight.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
