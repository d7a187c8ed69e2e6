"""Image sets on disk for evaluation: npz arrays (ADM's `arr_0`/`arr_1` format, read and written in streaming
batches so 50K x 256^2 images never sit in memory at once) and image folders."""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from numpy.lib import format as npy_format

from minsnr.data.arrays import not_npz

IMAGE_KEYS = ("arr_0", "x_train", "images", "x")  # default npz key order
LABEL_KEYS = {"arr_0": "arr_1", "x_train": "y_train", "x_test": "y_test", "images": "labels", "x": "y"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], [B, C, H, W] -> uint8 [B, H, W, C], rounding to nearest (as EDM's generate.py)."""
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _npy_header(fp) -> tuple[tuple[int, ...], np.dtype]:
    version = npy_format.read_magic(fp)
    read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
    shape, fortran, dtype = read(fp)
    if fortran:
        raise ValueError("Fortran-ordered arrays are not supported; save the images in C order")
    return shape, dtype


def open_npz(path: str | Path) -> zipfile.ZipFile:
    """An .npz file as the zip it is; ValueError naming it when it is not one (text, a pickle, truncated)."""
    path = Path(path)
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(not_npz(path)) from None


def read_npy(zf: zipfile.ZipFile, key: str) -> np.ndarray:
    """Array `key` of an open npz, without pickle; ValueError naming the file when it does not read."""
    try:
        with zf.open(f"{key}.npy") as f:
            return npy_format.read_array(f, allow_pickle=False)
    except Exception:  # a damaged member, or an array of Python objects
        raise ValueError(f"{zf.filename}: array {key!r} does not read (damaged, or not an array of numbers)") from None


def write_npz(path: str | Path, batches: Iterable[np.ndarray], count: int, labels: np.ndarray | None) -> None:
    """Write `count` images from uint8 NHWC `batches` as `arr_0` (and `labels` as `arr_1`), one batch at a
    time, into an uncompressed npz that np.load and ADM's evaluator read; atomic (temporary file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                written = _write_images(f, batches, count)
            if written != count:
                raise ValueError(f"expected {count} images, got {written}")
            if labels is not None:
                with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                    npy_format.write_array(f, np.asarray(labels, dtype=np.int64))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def _write_images(f: BinaryIO, batches: Iterable[np.ndarray], count: int) -> int:
    """.npy header for uint8 [count, H, W, C] (shape from the first batch), then the batches' bytes."""
    written, shape = 0, None
    for batch in batches:
        if shape is None:
            shape = (count, *batch.shape[1:])
            npy_format.write_array_header_1_0(
                f, {"descr": npy_format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
            )
        if batch.dtype != np.uint8 or batch.shape[1:] != shape[1:]:
            raise ValueError(f"batch {batch.dtype} {batch.shape} does not match uint8 {shape}")
        f.write(np.ascontiguousarray(batch).tobytes())
        written += len(batch)
    return written


@dataclass
class ImageSet:
    """A set of uint8 images [N, H, W, C] stored in an npz array or an image folder."""

    path: Path
    key: str | None  # npz array name; None for a folder
    count: int
    shape: tuple[int, int, int]  # H, W, C
    labels: np.ndarray | None
    files: list[Path] | None = None

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 [B, H, W, C] batches in stored order."""
        if self.files is not None:
            for i in range(0, self.count, batch_size):
                yield np.stack([_read_image(p, self.shape) for p in self.files[i : i + batch_size]])
            return
        with open_npz(self.path) as zf, zf.open(f"{self.key}.npy") as f:
            _npy_header(f)
            per_image = int(np.prod(self.shape))
            for i in range(0, self.count, batch_size):
                n = min(batch_size, self.count - i)
                data = bytearray(f.read(n * per_image))
                if len(data) < n * per_image:
                    raise ValueError(
                        f"{self.path}: {self.key} ends before image {i + len(data) // per_image + 1} (truncated)"
                    )
                yield np.frombuffer(data, np.uint8).reshape(n, *self.shape)


def _read_image(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB" if shape[2] == 3 else "L"))
    a = a.reshape(*a.shape[:2], shape[2])
    if a.shape != shape:
        raise ValueError(
            f"{path}: image of size {a.shape[1]}x{a.shape[0]} differs from the folder's first image "
            f"({shape[1]}x{shape[0]}); resize all images to one size first"
        )
    return a


def open_images(path: str | Path, key: str | None = None) -> ImageSet:
    """Open an npz of uint8 images (key: `key` or the first of IMAGE_KEYS present; [N,H,W,C] or [N,H,W])
    with labels from the matching LABEL_KEYS entry, or a folder of image files (searched recursively)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in folder {path}")
        from PIL import Image

        with Image.open(files[0]) as im:
            channels = 1 if im.mode in ("L", "I", "1") else 3
            shape = (im.height, im.width, channels)
        return ImageSet(path, None, len(files), shape, None, files)
    if not path.is_file():
        raise FileNotFoundError(f"image set not found: {path} (expected an .npz file or a folder of images)")
    with open_npz(path) as zf:
        names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        if key is None:
            key = next((k for k in IMAGE_KEYS if k in names), None)
        if key not in names:
            raise KeyError(f"{path}: no image array {key or ' / '.join(IMAGE_KEYS)}; arrays in the file: {names}")
        try:
            with zf.open(f"{key}.npy") as f:
                shape, dtype = _npy_header(f)
        except (ValueError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path}: array {key!r} does not read ({err})") from None
        label_key = LABEL_KEYS.get(key)
        labels = read_npy(zf, label_key).astype(np.int64) if label_key in names else None
    if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
        raise ValueError(f"{path}:{key} must be uint8 [N, H, W, C] with C in (1, 3) or [N, H, W]; got {dtype} {shape}")
    hwc = (shape[1], shape[2], shape[3] if len(shape) == 4 else 1)
    if labels is not None and labels.shape != (shape[0],):
        raise ValueError(f"{path}: {label_key} has shape {labels.shape}, expected ({shape[0]},)")
    return ImageSet(path, key, shape[0], hwc, labels)
