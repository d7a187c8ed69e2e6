"""Min-SNR-gamma in a diffusers training loop: the loop of diffusers' example scripts, on scikit-learn's
bundled 8x8 digits, with the loss weight in one line from minsnr.

    pip install -e ".[latent]"                      # minsnr + diffusers
    python examples/diffusers_min_snr.py            # 50 steps, about 8 s of CPU time on one core
    python examples/diffusers_min_snr.py --prediction-type v_prediction --zero-terminal-snr

The weight follows the scheduler's prediction_type (appendix B of Hang et al.): epsilon min(SNR, gamma)/SNR,
v_prediction min(SNR, gamma)/(SNR + 1), sample min(SNR, gamma), finite at SNR = 0.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from sklearn.datasets import load_digits

from minsnr.integrations.diffusers import PREDICTION_TYPES, loss_weight


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="training steps (default 50)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prediction-type", choices=list(PREDICTION_TYPES), default="epsilon")
    parser.add_argument("--gamma", type=float, default=5.0, help="Min-SNR gamma (default 5, the paper's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zero-terminal-snr", action="store_true", help="rescale_betas_zero_snr=True")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the loss is compared between the first and last steps)")
    if args.zero_terminal_snr and args.prediction_type == "epsilon":
        # Lin et al. 2024: at SNR = 0 the input is pure noise, so predicting the noise is trivial there and
        # x0 = (x_t - sigma eps) / alpha divides by alpha = 0.
        parser.error(
            "--zero-terminal-snr needs --prediction-type v_prediction or sample: at SNR = 0 an epsilon model's x0 divides by alpha = 0"
        )
    return args


def digits() -> torch.Tensor:
    """The 1,797 digits as float32 [N, 1, 8, 8] in [-1, 1]; values 0..16, scaled as minsnr.data does."""
    images = torch.from_numpy(load_digits().images).float()
    return (images * (2 / 16) - 1).unsqueeze(1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    data = digits()
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",  # the cosine schedule of the paper (section 4.1)
        prediction_type=args.prediction_type,
        rescale_betas_zero_snr=args.zero_terminal_snr,
    )
    model = UNet2DModel(  # 8x8 -> 4x4 -> 8x8, about 0.3M parameters
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    every = max(1, args.steps // 10)
    losses = []
    for step in range(1, args.steps + 1):
        x0 = data[torch.randint(len(data), (args.batch_size,))]
        noise = torch.randn_like(x0)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(x0),))
        noisy = scheduler.add_noise(x0, noise, timesteps)
        if args.prediction_type == "epsilon":
            target = noise
        elif args.prediction_type == "v_prediction":
            target = scheduler.get_velocity(x0, noise, timesteps)
        else:
            target = x0
        pred = model(noisy, timesteps).sample

        weight = loss_weight(scheduler, timesteps, "min_snr", gamma=args.gamma)  # the whole of Min-SNR
        loss = (weight * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()

        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % every == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    k = max(1, args.steps // 5)  # average the first and the last fifth: one step's loss depends on its t draw
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    if last < first:
        print(f"loss fell: mean of the first {k} steps {first:.4f}, of the last {k} steps {last:.4f}")
        return 0
    print(f"loss did not fall: mean of the first {k} steps {first:.4f}, of the last {k} steps {last:.4f}")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
