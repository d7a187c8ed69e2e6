"""Image folders: ImageNet layout (one sub-folder per class) or a flat folder (unconditional).

Labels are the positions of the sorted class-folder names; images inside a class folder are found
recursively. JPEG, PNG and WebP through Pillow. Items are RGB, or grayscale when every image in a
sample of up to 16 spread across the folder is grayscale (e.g. MNIST written as PNGs).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minsnr.data.base import BadImagesError, Fetched, ImageDataset, UnreadableImage
from minsnr.data.transforms import Key, check_crop, flips, prepare, split_key, to_float

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
# What Pillow raises on a truncated or corrupt file.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _images_under(folder: str, root: str) -> list[str]:
    """Image paths under `folder`, recursively, relative to `root`, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.relpath(os.path.join(dirpath, f), root) for f in sorted(filenames) if _is_image(f)]
    return found


def scan_folder(root: str | Path) -> tuple[list[str], list[int], list[str]]:
    """(relative image paths, labels, class names); class names are [] for a flat folder."""
    root = str(root)
    if not os.path.exists(root):
        raise FileNotFoundError(f"data.path {root!r} does not exist")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"data.path {root!r} is not a folder of images")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    top = [e.name for e in entries if e.is_file() and _is_image(e.name)]
    subdirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    if top and subdirs:
        raise ValueError(
            f"{root} holds both images and sub-folders ({', '.join(subdirs[:3])}); use either "
            "one sub-folder per class or a flat folder of images"
        )
    if top:
        return top, [0] * len(top), []
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(subdirs):
        found = _images_under(os.path.join(root, name), root)
        if not found:
            raise ValueError(f"class folder {os.path.join(root, name)} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += found
        labels += [label] * len(found)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}")
    return files, labels, subdirs


def _header(path: str) -> tuple[str, tuple[int, int]] | None:
    """(mode, (W, H)) from the file header, None when even that cannot be read."""
    try:
        with Image.open(path) as img:
            return img.mode, img.size
    except DECODE_ERRORS:
        return None


class FolderDataset(ImageDataset):
    """Images from a folder, preprocessed by `transforms.prepare(crop, resolution)`."""

    def __init__(
        self,
        root: str | Path,
        *,
        resolution: int | None = None,
        crop: str = "none",
        hflip: bool = True,
        conditional: bool = True,
        max_bad_fraction: float = 0.01,
    ) -> None:
        check_crop(crop, resolution)
        self.root = str(root)
        files, labels, class_names = scan_folder(root)
        # Byte strings in one numpy array: no per-path Python objects for workers to copy.
        self.files = np.array([os.fsencode(f) for f in files])
        use_labels = conditional and len(class_names) > 0
        self.labels = np.array(labels if use_labels else [0] * len(files), dtype=np.int64)
        self.num_classes = len(class_names) if use_labels else 0
        self.class_names = class_names if use_labels else []
        self.crop, self.resolution, self.hflip = crop, resolution, hflip
        self.max_bad_fraction = max_bad_fraction
        sample = [_header(self.path(int(i))) for i in np.linspace(0, len(files) - 1, min(16, len(files)))]
        modes = [h[0] for h in sample if h is not None]
        self.mode = "L" if modes and all(m in GRAY_MODES for m in modes) else "RGB"
        channels = 1 if self.mode == "L" else 3
        if resolution is None and crop == "none":
            w, h = self._common_size()
            self.shape = (channels, h, w)
        else:
            self.shape = (channels, resolution, resolution)  # type: ignore[assignment]

    def path(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.files[index]))

    def _common_size(self) -> tuple[int, int]:
        """All images must share one size when nothing resizes them; checked from the headers."""
        first: tuple[str, tuple[int, int]] | None = None
        for i in range(len(self.files)):
            head = _header(self.path(i))
            if head is None:
                continue  # unreadable: skipped and counted when loaded
            if first is None:
                first = (self.path(i), head[1])
            elif head[1] != first[1]:
                (w0, h0), (w1, h1) = first[1], head[1]
                raise ValueError(
                    f"images differ in size: {first[0]} is {w0}x{h0}, {self.path(i)} is {w1}x{h1}; "
                    "set data.resolution (and data.crop) to bring them to one size"
                )
        if first is None:
            raise ValueError(f"no readable image in {self.root}")
        return first[1]

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> np.ndarray:
        """Decoded and preprocessed image `index`, uint8 [H, W, C]; UnreadableImage if Pillow fails."""
        path = self.path(index)
        try:
            with Image.open(path) as img:
                img = img.convert(self.mode)
        except DECODE_ERRORS as err:
            raise UnreadableImage(path, str(err)) from None
        arr = prepare(img, self.crop, self.resolution)
        if arr.shape[:2] != self.shape[1:]:
            raise ValueError(
                f"{path} is {arr.shape[1]}x{arr.shape[0]}, the dataset's size is "
                f"{self.shape[2]}x{self.shape[1]}; set data.resolution to resize"
            )
        return arr[:, :, None] if arr.ndim == 2 else arr

    def get_batch(self, keys: Sequence[Key]) -> Fetched:
        n = len(self.files)
        tries = min(n, int(self.max_bad_fraction * n) + 1)
        index, aug = zip(*map(split_key, keys))
        arrays, labels, bad = [], [], []
        for i, flip in zip(index, flips(aug, self.hflip)):
            for step in range(tries):  # replace an unreadable image by the next readable one
                j = (i + step) % n
                try:
                    arr = self.read(j)
                    break
                except UnreadableImage as err:
                    bad.append((err.path, err.error))
            else:
                raise BadImagesError(
                    f"{tries} unreadable images in a row from {self.path(i)}, more than "
                    f"data.max_bad_fraction={self.max_bad_fraction} of {n} allows; remove or "
                    f"repair them, or raise data.max_bad_fraction"
                )
            arrays.append(arr[:, ::-1] if flip else arr)
            labels.append(self.labels[j])
        x = to_float(torch.from_numpy(np.stack(arrays)))
        return x, torch.from_numpy(np.array(labels, dtype=np.int64)), bad
