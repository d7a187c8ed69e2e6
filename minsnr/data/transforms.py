"""The paper's preprocessing (section 4.1), on PIL images, returning uint8 HWC arrays.

- ``adm``: ADM's ``center_crop_arr`` (ImageNet): halve with a box filter while the short side is at
  least twice the target, bicubic-resize the short side to the target, center crop.
- ``celeba``: ScoreSDE's CelebA recipe: center crop 140x140, resize to the target with an antialiased
  bilinear filter (tf.image.resize(antialias=True); Pillow's BILINEAR is the same triangle filter).
  ScoreSDE keeps floats after the resize; here the result is rounded to uint8 (at most 0.5/255 apart).
- ``none``: keep the image; with a resolution, a plain bicubic resize to resolution x resolution.

Scaling to [-1, 1] and the horizontal flip work on whole batches (`to_float`, `split_key`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from minsnr.registry import lookup

CELEBA_CROP = 140  # ScoreSDE datasets.py: central_crop(img, 140)

# A dataset key: an index (no augmentation, deterministic) or (index, aug_seed) drawn by the loader.
Key = int | tuple[int, int]


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's guided_diffusion/image_datasets.py center_crop_arr, verbatim in behaviour."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def celeba_crop(pil_image: Image.Image, image_size: int, crop: int = CELEBA_CROP) -> np.ndarray:
    """ScoreSDE's CelebA preprocessing: central 140x140 crop, then resize to image_size."""
    w, h = pil_image.size
    if min(w, h) < crop:
        raise ValueError(f"data.crop=celeba needs images of at least {crop}x{crop}; got {w}x{h}")
    top, left = (h - crop) // 2, (w - crop) // 2
    pil_image = pil_image.crop((left, top, left + crop, top + crop))
    return np.array(pil_image.resize((image_size, image_size), resample=Image.BILINEAR))


def keep_or_resize(pil_image: Image.Image, resolution: int | None) -> np.ndarray:
    """No crop: the image as it is, or a plain bicubic resize to resolution x resolution."""
    if resolution is not None and pil_image.size != (resolution, resolution):
        pil_image = pil_image.resize((resolution, resolution), resample=Image.BICUBIC)
    return np.asarray(pil_image)


# name -> crop(PIL image, resolution) -> uint8 [H, W(, 3)]; `data.crop` chooses one.
CROPS: dict[str, Callable[..., np.ndarray]] = {"none": keep_or_resize, "adm": center_crop_arr, "celeba": celeba_crop}


def check_crop(crop: str, resolution: int | None) -> None:
    lookup(CROPS, crop, "data.crop")
    if crop != "none" and resolution is None:
        raise ValueError(f"data.crop={crop} needs data.resolution (e.g. 64 or 256)")
    if resolution is not None and resolution <= 0:
        raise ValueError(f"data.resolution={resolution} must be a positive side length")


def prepare(pil_image: Image.Image, crop: str, resolution: int | None) -> np.ndarray:
    """Apply one of CROPS; returns uint8 [H, W] (grayscale) or [H, W, 3]."""
    check_crop(crop, resolution)
    return CROPS[crop](pil_image, resolution)


def empty_batch(*shape: int) -> torch.Tensor:
    """Uninitialised float32 tensor; inside a loader worker it is allocated in shared memory, so sending
    it to the main process costs no copy (as torch's default_collate does)."""
    if get_worker_info() is None:
        return torch.empty(shape)
    storage = torch.empty(0)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0).new(storage).view(shape)


def to_float(x: torch.Tensor, levels: float = 255.0) -> torch.Tensor:
    """uint8 [B, H, W, C] with values 0..levels -> float32 [B, C, H, W] in [-1, 1], on x's device."""
    b, h, w, c = x.shape
    out = empty_batch(b, c, h, w) if x.device.type == "cpu" else torch.empty((b, c, h, w), device=x.device)
    out.copy_(x.permute(0, 3, 1, 2))  # one strided pass, then contiguous ones
    return out.mul_(2.0 / levels).sub_(1.0)


def split_key(key: Key) -> tuple[int, int | None]:
    """(index, aug_seed or None). Bit 0 of aug_seed is the flip, the rest seeds other randomness."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), None


def flips(aug: Sequence[int | None], hflip: bool) -> np.ndarray:
    """Boolean flip decision per key: random (bit 0 of aug_seed) when hflip, never for plain indices."""
    return np.array([hflip and a is not None and bool(a & 1) for a in aug], dtype=bool)
