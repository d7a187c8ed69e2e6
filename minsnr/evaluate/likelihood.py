"""Bits per dimension: the variational bound on the negative log-likelihood of 8-bit images under the
discrete-time diffusion model (Ho et al. 2020, eq. 5; Kingma et al. 2021, "Variational Diffusion Models",
eq. 11-13), a score that needs no labels, no classifier and no downloaded weights.

With z_t = alpha_t x + sigma_t eps (t = 0..T-1) and p(z_{t-1} | z_t) = q(z_{t-1} | z_t, x = x_hat(z_t, t)),
    -log p(x) <= KL(q(z_{T-1} | x) || N(0, I))                                      prior
               + sum_{t=1}^{T-1} E_eps 1/2 (SNR(t-1) - SNR(t)) ||x - x_hat(z_t, t)||^2   diffusion (VDM eq. 13)
               - E_eps log p(x | z_0)                                                 decoder
with the decoder of VDM: each pixel is the 8-bit value v (x_v = v / 127.5 - 1) with probability
proportional to exp(-SNR(0) / 2 (z_0 / alpha_0 - x_v)^2), the exact posterior under a flat prior.
x_hat is the model's x0 estimate, converted from whatever it predicts (x0, eps or v). The bound is the
same functional of the model whatever weighting trained it: it scores every run of a race by one rule.

The sum over t is estimated with K stratified draws per image from p(t) proportional to the step in
log SNR, lambda(t-1) - lambda(t), where the summand is roughly flat (||x - x_hat||^2 ~ 1/SNR at low noise),
each divided by K p(t). Timesteps and noise come from a fixed seed: every checkpoint sees the same ones
(common random numbers), so two models' bounds differ by their predictions only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from minsnr.objective import predict_x0
from minsnr.schedule import Schedule

DEFAULT_DRAWS = 32
LEVELS = 256  # 8-bit images


def quantize(x: Tensor) -> Tensor:
    """Images in [-1, 1] -> the nearest 8-bit value, as x_v = v / 127.5 - 1 (float64)."""
    v = ((x.double().clamp(-1, 1) + 1) * 127.5).round()
    return v / 127.5 - 1


def prior_kl(x: Tensor, schedule: Schedule) -> Tensor:
    """KL(q(z_{T-1} | x) || N(0, I)) summed over dimensions, nats [B]."""
    a = schedule.alphas_cumprod[-1].double()  # alpha^2
    return 0.5 * (a * x.double().square() + (1 - a) - 1 - torch.log1p(-a)).flatten(1).sum(1)


def decoder_nll(x: Tensor, z0: Tensor, schedule: Schedule) -> Tensor:
    """-log p(x | z_0) of 8-bit images x (float64, quantized) summed over dimensions, nats [B]. The
    categorical over the 256 values is evaluated on a window of values around z_0 / alpha_0 wide enough
    that the values left out weigh less than exp(-50) each."""
    snr0 = schedule.snr(torch.zeros((), dtype=torch.long, device=schedule.alphas_cumprod.device)).double()
    centre = z0.double() / schedule.alpha(torch.zeros((), dtype=torch.long, device=z0.device)).double()
    half = min(LEVELS - 1, math.ceil(10.0 / math.sqrt(float(snr0)) * 127.5) + 1)
    nearest = ((centre.clamp(-1, 1) + 1) * 127.5).round()
    offsets = torch.arange(-half, half + 1, dtype=torch.float64, device=x.device)
    values = nearest.unsqueeze(-1) + offsets  # [..., W]
    ok = (values >= 0) & (values <= LEVELS - 1)
    logits = -0.5 * snr0 * (centre.unsqueeze(-1) - (values / 127.5 - 1)).square()
    logits = logits.masked_fill(~ok, -math.inf)
    log_norm = torch.logsumexp(logits, dim=-1)
    mine = -0.5 * snr0 * (centre - x.double()).square()
    return (log_norm - mine).flatten(1).sum(1)


def importance(schedule: Schedule) -> Tensor:
    """p(t) for t = 1..T-1 (index 0 unused, 0): proportional to lambda(t-1) - lambda(t), float64 [T]."""
    log_snr = torch.log(schedule.snr(torch.arange(schedule.num_timesteps, device=schedule.alphas_cumprod.device)))
    p = torch.zeros_like(log_snr)
    p[1:] = (log_snr[:-1] - log_snr[1:]).clamp(min=0)
    return p / p.sum()


def draw_timesteps(p: Tensor, num: int, draws: int, generator: torch.Generator) -> Tensor:
    """Stratified draws [num, draws]: image j, stratum k gets the inverse CDF of p at (k + u_jk) / draws."""
    u = (
        torch.arange(draws, dtype=torch.float64) + torch.rand(num, draws, dtype=torch.float64, generator=generator)
    ) / draws
    cdf = torch.cumsum(p.cpu(), 0)
    return torch.searchsorted(cdf, u.clamp(max=float(cdf[-1]) * (1 - 1e-12))).clamp(1, len(p) - 1)


@torch.no_grad()
def bits_per_dim(
    model: nn.Module,
    schedule: Schedule,
    target: str,
    x: Tensor,
    labels: Tensor | None,
    *,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    batch_size: int = 250,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """The bound in bits per dimension of the images x (float [N, C, H, W] in [-1, 1], quantized to 8 bits
    here), averaged over the images, and its three terms. `model(x_t, t, labels)` predicts `target`."""
    schedule = schedule.to(device)
    gen = torch.Generator().manual_seed(seed)
    xq = quantize(x)
    n, dims = len(xq), xq[0].numel()
    p = importance(schedule)
    t_all = draw_timesteps(p, n, draws, gen)
    snr = schedule.snr(torch.arange(schedule.num_timesteps, device=device))
    weight = torch.zeros_like(snr)
    weight[1:] = 0.5 * (snr[:-1] - snr[1:]) / (draws * p[1:].clamp(min=1e-300))  # w_t / (K p(t))
    noise0 = torch.randn(xq.shape, dtype=torch.float64, generator=gen)
    totals = {"prior": 0.0, "diffusion": 0.0, "decoder": 0.0}
    for k in range(draws):
        noise = torch.randn(xq.shape, generator=gen)
        for i in range(0, n, batch_size):
            s = slice(i, i + batch_size)
            x0 = xq[s].to(device)
            t = t_all[s, k].to(device)
            alpha = schedule.alpha(t).view(-1, *[1] * (x0.dim() - 1))
            sigma = schedule.sigma(t).view(-1, *[1] * (x0.dim() - 1))
            x_t = (alpha * x0 + sigma * noise[s].to(device)).float()
            y = None if labels is None else labels[s].to(device)
            pred = model(x_t, t, y).double()
            x_hat = predict_x0(pred, x_t.double(), alpha, sigma, target)
            totals["diffusion"] += float((weight[t] * (x0 - x_hat).square().flatten(1).sum(1)).sum())
    for i in range(0, n, batch_size):
        x0 = xq[i : i + batch_size].to(device)
        zero = torch.zeros(len(x0), dtype=torch.long, device=device)
        a0 = schedule.alpha(zero).view(-1, *[1] * (x0.dim() - 1))
        s0 = schedule.sigma(zero).view(-1, *[1] * (x0.dim() - 1))
        z0 = a0 * x0 + s0 * noise0[i : i + batch_size].to(device)
        totals["prior"] += float(prior_kl(x0, schedule).sum())
        totals["decoder"] += float(decoder_nll(x0, z0, schedule).sum())
    scale = 1.0 / (n * dims * math.log(2))
    out = {k: v * scale for k, v in totals.items()}
    return {"bpd": sum(out.values()), **{f"bpd_{k}": v for k, v in out.items()}}


def held_out_images(cfg: object, num: int, seed: int = 0) -> tuple[Tensor, Tensor | None, str]:
    """Up to `num` images for the bound: the data's test split, or its training images when it has none
    (-> images, labels or None, the split used)."""
    from minsnr.evaluate.losses import held_out

    try:
        x, labels = held_out(cfg, None, "test", num, seed)  # type: ignore[arg-type]
        return x, labels, "test"
    except (KeyError, ValueError):
        x, labels = held_out(cfg, None, "train", num, seed)  # type: ignore[arg-type]
        return x, labels, "train"


__all__ = ["bits_per_dim", "held_out_images", "prior_kl", "decoder_nll", "importance", "quantize"]
