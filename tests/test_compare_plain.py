"""The `plain` weighting: weight 1 on the MSE in the target's own space, the per-target baseline of section
4.2 (plain x0 MSE = const, plain eps MSE = snr, plain v MSE = SNR + 1 in x0 terms)."""

import pytest
import torch

from minsnr.config import ConfigError, load_config
from minsnr.loss import diffusion_loss
from minsnr.schedule import make_schedule
from minsnr.weighting import TARGETS, loss_weight, x0_weight

SCHED = make_schedule("cosine")


class Affine(torch.nn.Module):
    """A fixed, imperfect predictor of any target: 0.7 x_t + 0.1."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return 0.7 * x + 0.1


@pytest.mark.parametrize("target", TARGETS)
def test_plain_is_the_unweighted_target_mse(target):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(256, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (256,), generator=g)
    out = diffusion_loss(Affine(), x0, None, SCHED, target=target, weighting="plain", t=t, noise=noise)
    a = SCHED.alpha(t).double().view(-1, 1, 1, 1)
    s = SCHED.sigma(t).double().view(-1, 1, 1, 1)
    x_t = a * x0 + s * noise
    true = {"x0": x0, "eps": noise, "v": a * noise - s * x0}[target]  # written out here, not imported
    expected = (true - (0.7 * x_t + 0.1)).square().mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=0)


def test_plain_in_x0_terms_and_its_named_equivalents():
    snr = torch.logspace(-4, 4, 200, dtype=torch.float64)
    torch.testing.assert_close(x0_weight(snr, "plain", target="x0"), torch.ones_like(snr))
    torch.testing.assert_close(x0_weight(snr, "plain", target="eps"), snr)
    torch.testing.assert_close(x0_weight(snr, "plain", target="v"), snr + 1)
    # plain x0 MSE is const, plain eps MSE is snr; plain v is neither (SNR + 1, not SNR)
    torch.testing.assert_close(loss_weight(snr, "plain", target="x0"), loss_weight(snr, "const", target="x0"))
    torch.testing.assert_close(loss_weight(snr, "plain", target="eps"), loss_weight(snr, "snr", target="eps"))
    assert not torch.allclose(loss_weight(snr, "plain", target="v"), loss_weight(snr, "snr", target="v"))
    zero = torch.zeros(3)
    assert loss_weight(zero, "plain", target="eps").tolist() == [1.0, 1.0, 1.0]  # finite at SNR = 0
    with pytest.raises(ValueError, match="x0, eps, v"):
        x0_weight(snr, "plain", target="score")


def test_config_accepts_plain_and_lists_it(tmp_path):
    cfg = load_config(None, ["loss.weighting=plain", "loss.target=v"])
    assert cfg.loss.weighting == "plain"
    with pytest.raises(ConfigError, match="edm, plain, learned"):
        load_config(None, ["loss.weighting=plane"])
