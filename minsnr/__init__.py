"""minsnr: fast diffusion training with the Min-SNR-gamma loss weighting (Hang et al., 2023)."""

__version__ = "0.1.0"
