"""Image grids with PIL + numpy only (the core product does not need torchvision)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from minsnr.evaluate.images import to_uint8


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*(H+p)+p, nrow*(W+p)+p, C] image, `nrow` images per row
    (default: a square-ish grid), separated by black `padding` pixels."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), np.uint8)
    for i, img in enumerate(images):
        y, x = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[y : y + h, x : x + w] = img
    return grid


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, nrow: int | None = None, min_width: int = 0) -> None:
    """Save a grid of images: a float tensor [N, C, H, W] in [-1, 1] or uint8 [N, H, W, C] (C = 1 or 3).
    Grids narrower than `min_width` pixels are enlarged by a whole factor (nearest neighbour), so 8x8
    digits stay visible."""
    from PIL import Image

    arr = to_uint8(images) if isinstance(images, torch.Tensor) else np.asarray(images)
    grid = make_grid(arr, nrow)
    factor = max(1, -(-min_width // grid.shape[1]))
    grid = grid.repeat(factor, axis=0).repeat(factor, axis=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid).save(path)
