"""In-memory image arrays: `.npz` files and scikit-learn's embedded digits (the quickstart data).

npz: uint8 NHWC (or NHW) under `x` or `x_train`, optional integer labels under `y` / `y_train`;
split="test" reads `x_test` / `y_test`; an optional `class_names` array names the classes.
digits: sklearn.datasets.load_digits, 1797 8x8 images with values 0..16 (scaled exactly to [-1, 1]),
10 classes; split="train" is the first 1617 images (90%), split="test" the last 180.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minsnr.data.base import Fetched, ImageDataset
from minsnr.data.transforms import Key, check_crop, flips, prepare, split_key, to_float
from minsnr.files import truncated_zip

DIGITS_TRAIN = 1617  # first 90% of the 1797 digits; the rest is the held-out test split


class ArrayDataset(ImageDataset):
    """uint8 images [N, H, W, C] with values 0..levels, held in memory; fetched a batch at a time."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None,
        *,
        num_classes: int,
        class_names: list[str],
        levels: int = 255,
        hflip: bool = True,
        conditional: bool = True,
        crop: str = "none",
        resolution: int | None = None,
    ) -> None:
        check_crop(crop, resolution)
        if crop != "none" or resolution is not None:
            if levels != 255:  # Pillow resamples 8-bit images: spread the values over 0..255 first
                images, levels = np.round(images * (255.0 / levels)).astype(np.uint8), 255
            images = np.stack(
                [prepare(Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im), crop, resolution) for im in images]
            )
            images = images[..., None] if images.ndim == 3 else images
        use_labels = conditional and labels is not None and num_classes > 0
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(labels.astype(np.int64) if use_labels else np.zeros(len(images), np.int64))
        self.num_classes = num_classes if use_labels else 0
        self.class_names = class_names if use_labels else []
        self.levels, self.hflip = levels, hflip
        self.shape = (images.shape[3], images.shape[1], images.shape[2])

    def __len__(self) -> int:
        return len(self.images)

    def get_batch(self, keys: Sequence[Key]) -> Fetched:
        index, aug = zip(*map(split_key, keys))
        idx = torch.tensor(index, dtype=torch.long)
        return to_batch(self.images[idx], torch.from_numpy(flips(aug, self.hflip)), self.levels), self.labels[idx], []


def to_batch(images: torch.Tensor, flip: torch.Tensor, levels: float) -> torch.Tensor:
    """uint8 [B, H, W, C] with values 0..levels and bool [B] -> float32 [B, C, H, W] in [-1, 1], mirrored
    where `flip`; on the images' device (the loader's and the device-resident path share these ops)."""
    x = to_float(images, levels)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def load_digits(split: str = "train", **options: object) -> ArrayDataset:
    """scikit-learn's bundled 8x8 digits (no download)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = d.images.astype(np.uint8)[..., None]
    part = slice(0, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
    return ArrayDataset(
        images[part], d.target[part], num_classes=10, class_names=[str(i) for i in range(10)], levels=16, **options
    )  # type: ignore[arg-type]


def _pick(keys: list[str], names: tuple[str, ...]) -> str | None:
    return next((k for k in names if k in keys), None)


class Npz:
    """An .npz file, read without pickle: a file that is not one (text, a pickle, a truncated file) or an array
    that does not read raises ValueError naming the file, never numpy's advice to load it unsafely."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._file = np.load(self.path, allow_pickle=False)
        except OSError:
            raise
        except Exception:
            raise ValueError(not_npz(self.path)) from None
        if not isinstance(self._file, np.lib.npyio.NpzFile):  # a single .npy array
            raise ValueError(f"{self.path} is an .npy array, not an .npz file")
        self.files: list[str] = list(self._file.files)

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.files:
            raise KeyError(f"{self.path} has no array {key!r}; its arrays: {', '.join(self.files)}")
        try:
            return self._file[key]
        except Exception:  # a damaged member, or an array of Python objects
            raise ValueError(
                f"{self.path}: array {key!r} does not read (damaged, or not an array of numbers)"
            ) from None

    def __enter__(self) -> Npz:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def not_npz(path: Path) -> str:
    """Why `path` (a file np.load refused) is not an .npz file, in words."""
    cut = truncated_zip(path)
    return f"{path} is not a complete .npz file (truncated or damaged)" if cut else f"{path} is not an .npz file"


def load_npz(path: str | Path, split: str = "train", **options: object) -> ArrayDataset:
    """Images (uint8 NHWC) and labels from an .npz file; see the module docstring for the keys."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data.path {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"data.path {str(path)!r} is a folder, not an .npz file (data.source=folder reads folders)")
    with Npz(path) as f:
        keys = f.files
        x_key = _pick(keys, ("x", "x_train") if split == "train" else ("x_test",))
        y_key = _pick(keys, ("y", "y_train") if split == "train" else ("y_test",))
        if x_key is None:
            want = "x or x_train" if split == "train" else "x_test"
            raise KeyError(f"{path} has no {want} array for split={split!r}; its keys: {', '.join(keys)}")
        images = f[x_key]
        labels = f[y_key] if y_key else None
        all_labels = [f[k] for k in ("y", "y_train", "y_test") if k in keys]
        names = [str(n) for n in f["class_names"]] if "class_names" in keys else None
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise ValueError(
            f"{path}:{x_key} must be uint8 [N, H, W] or [N, H, W, 1|3]; got {images.dtype} {list(images.shape)}"
        )
    images = images[..., None] if images.ndim == 3 else images
    if labels is not None and (
        labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0
    ):
        raise ValueError(
            f"{path}:{y_key} must hold {len(images)} integer labels >= 0; got {labels.dtype} {list(labels.shape)}"
        )
    num_classes = int(max(int(y.max()) for y in all_labels)) + 1 if labels is not None else 0
    names = names if names is not None and len(names) == num_classes else [str(i) for i in range(num_classes)]
    return ArrayDataset(images, labels, num_classes=num_classes, class_names=names, **options)  # type: ignore[arg-type]
