"""Image datasets and preprocessing: folders, npz, digits, the ADM and ScoreSDE-CelebA crops, flips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from minsnr.config import DataConfig
from minsnr.data import FolderDataset, build_dataset, load_digits, load_npz
from minsnr.data.transforms import celeba_crop, center_crop_arr, prepare


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB, sinusoids with periods of 20-40 px in [40, 215]: a one-pixel shift changes it a lot."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = []
    for _ in range(3):
        fy, fx = 2 * np.pi / rng.uniform(20, 40, 2)
        chans.append(128 + 45 * np.sin(fy * yy + rng.uniform(0, 6)) + 42 * np.cos(fx * xx + rng.uniform(0, 6)))
    return np.stack(chans, -1).round().astype(np.uint8)


def write(path: Path, arr: np.ndarray, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def constant(value: int, size: int = 8, channels: int = 3) -> np.ndarray:
    return np.full((size, size, channels) if channels > 1 else (size, size), value, np.uint8)


# ---- the two recipes against independent float computations (torch resampling, numpy slicing) ----


def adm_reference(arr: np.ndarray, size: int) -> np.ndarray:
    """center_crop_arr recomputed: exact 2x2 means rounded half up per axis as Pillow's 8-bit box passes
    do (width, then height), antialiased bicubic (a=-0.5, as Pillow), center crop."""
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].double()
    while min(x.shape[-2:]) >= 2 * size:
        assert x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0, "pick test sizes whose halvings are exact"
        x = torch.floor((x[..., 0::2] + x[..., 1::2]) / 2 + 0.5)
        x = torch.floor((x[..., 0::2, :] + x[..., 1::2, :]) / 2 + 0.5)
    x = x.float()
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = round(h * scale), round(w * scale)
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 255)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[0, :, top : top + size, left : left + size].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("w,h,size", [(600, 520, 64), (300, 200, 64), (200, 300, 64), (50, 40, 64), (96, 80, 32)])
def test_adm_center_crop_matches_independent_computation(w: int, h: int, size: int) -> None:
    arr = smooth_image(h, w, seed=w + h)
    ours = center_crop_arr(Image.fromarray(arr), size).astype(np.float64)
    ref = adm_reference(arr, size)
    assert ours.shape == (size, size, 3)
    diff = np.abs(ours - ref)
    assert diff.max() <= 1.5 and diff.mean() < 0.4, (diff.max(), diff.mean())  # uint8 rounding between passes


def test_celeba_crop_matches_scoresde_recipe() -> None:
    arr = smooth_image(218, 178, seed=3)  # CelebA's aligned size, H x W
    top, left = (218 - 140) // 2, (178 - 140) // 2  # ScoreSDE central_crop: 39, 19
    crop = torch.from_numpy(arr[top : top + 140, left : left + 140]).permute(2, 0, 1)[None].float()
    ref = F.interpolate(crop, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)[0].permute(1, 2, 0)
    ours = celeba_crop(Image.fromarray(arr), 64).astype(np.float64)
    diff = np.abs(ours - ref.numpy())
    assert ours.shape == (64, 64, 3) and diff.max() <= 1.5 and diff.mean() < 0.4, (diff.max(), diff.mean())
    with pytest.raises(ValueError, match="at least 140x140"):
        celeba_crop(Image.fromarray(smooth_image(100, 178)), 64)


def test_prepare_checks_crop_and_resolution() -> None:
    img = Image.fromarray(smooth_image(40, 50))
    with pytest.raises(ValueError, match="choose one of: none, adm, celeba"):
        prepare(img, "random", 32)
    with pytest.raises(ValueError, match="needs data.resolution"):
        prepare(img, "adm", None)
    assert prepare(img, "none", 16).shape == (16, 16, 3)
    assert prepare(img, "none", None).shape == (40, 50, 3)


# ---- image folders ----


def test_class_folders_give_sorted_labels_and_exact_scaling(tmp_path: Path) -> None:
    for name, value in (("zebra", 200), ("ant", 10), ("moth", 100)):
        for i in range(2):
            write(tmp_path / name / f"{i}.png", constant(value + i))
    ds = FolderDataset(tmp_path, hflip=False)
    assert ds.class_names == ["ant", "moth", "zebra"] and ds.num_classes == 3 and ds.shape == (3, 8, 8)
    assert len(ds) == 6
    for i in range(6):
        x, y = ds[i]
        expected = {0: 10, 1: 100, 2: 200}[int(y)] + i % 2
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        torch.testing.assert_close(x, torch.full((3, 8, 8), expected / 127.5 - 1))
    unconditional = FolderDataset(tmp_path, conditional=False)
    assert unconditional.num_classes == 0 and unconditional.class_names == [] and int(unconditional[5][1]) == 0


def test_flat_folder_extremes_and_nested_class_images(tmp_path: Path) -> None:
    write(tmp_path / "flat" / "a.png", constant(0))
    write(tmp_path / "flat" / "b.png", constant(255))
    ds = FolderDataset(tmp_path / "flat")
    assert ds.num_classes == 0 and ds.class_names == [] and ds[0][0].min() == -1 and ds[1][0].max() == 1
    write(tmp_path / "tree" / "c0" / "deep" / "x.png", constant(3))
    write(tmp_path / "tree" / "c1" / "y.png", constant(4))
    assert len(FolderDataset(tmp_path / "tree")) == 2


def test_formats_and_grayscale(tmp_path: Path) -> None:
    arr = smooth_image(32, 32)
    write(tmp_path / "rgb" / "a.jpg", arr, quality=95)
    write(tmp_path / "rgb" / "b.webp", arr, lossless=True)
    write(tmp_path / "rgb" / "c.png", arr)
    ds = FolderDataset(tmp_path / "rgb", hflip=False)
    exact = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1
    assert len(ds) == 3 and ds.shape == (3, 32, 32)
    assert (ds[0][0] - exact).abs().mean() < 0.03  # JPEG is lossy
    torch.testing.assert_close(ds[1][0], exact)
    torch.testing.assert_close(ds[2][0], exact)
    for i in range(3):
        write(tmp_path / "gray" / f"{i}.png", arr[..., 0])
    gray = FolderDataset(tmp_path / "gray")
    assert gray.shape == (1, 32, 32) and gray[0][0].shape == (1, 32, 32)


def test_flip_is_the_keys_bit_zero(tmp_path: Path) -> None:
    write(tmp_path / "a.png", smooth_image(16, 24))
    ds = FolderDataset(tmp_path)
    plain = ds[0][0]
    assert not torch.equal(plain, plain.flip(-1))
    torch.testing.assert_close(ds[(0, 7)][0], plain.flip(-1))
    torch.testing.assert_close(ds[(0, 6)][0], plain)
    torch.testing.assert_close(FolderDataset(tmp_path, hflip=False)[(0, 7)][0], plain)


def test_folder_crops_and_resize(tmp_path: Path) -> None:
    arr = smooth_image(218, 178)
    write(tmp_path / "a.png", arr)
    celeba = FolderDataset(tmp_path, resolution=64, crop="celeba", hflip=False)
    expected = celeba_crop(Image.fromarray(arr), 64)
    assert celeba.shape == (3, 64, 64)
    torch.testing.assert_close(celeba[0][0], torch.from_numpy(expected).permute(2, 0, 1).float() / 127.5 - 1)
    adm = FolderDataset(tmp_path, resolution=32, crop="adm")
    assert adm[0][0].shape == (3, 32, 32)


def test_folder_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        FolderDataset(tmp_path / "empty")
    write(tmp_path / "sizes" / "a.png", constant(1, 8))
    write(tmp_path / "sizes" / "b.png", constant(1, 9))
    with pytest.raises(ValueError, match=r"differ in size: .*a.png is 8x8, .*b.png is 9x9"):
        FolderDataset(tmp_path / "sizes")
    assert FolderDataset(tmp_path / "sizes", resolution=8).shape == (3, 8, 8)  # resizing fixes it
    write(tmp_path / "mixed" / "a.png", constant(1))
    write(tmp_path / "mixed" / "cls" / "b.png", constant(1))
    with pytest.raises(ValueError, match="both images and sub-folders"):
        FolderDataset(tmp_path / "mixed")
    (tmp_path / "classes" / "b").mkdir(parents=True)
    write(tmp_path / "classes" / "a" / "x.png", constant(1))
    with pytest.raises(ValueError, match="class folder .*b has no images"):
        FolderDataset(tmp_path / "classes")
    with pytest.raises(NotADirectoryError):
        FolderDataset(tmp_path / "sizes" / "a.png")
    with pytest.raises(ValueError, match="needs data.resolution"):
        FolderDataset(tmp_path / "sizes", crop="adm")


# ---- arrays: digits and npz ----


def test_digits_split_and_scaling() -> None:
    from sklearn.datasets import load_digits as sk

    ref = sk()
    train, test = load_digits("train", hflip=False), load_digits("test", hflip=False)
    assert (len(train), len(test)) == (1617, 180) and train.shape == (1, 8, 8) and train.num_classes == 10
    x, y = train.get_batch(list(range(1617)))[:2]
    torch.testing.assert_close(x[:, 0], torch.from_numpy(ref.images[:1617] / 8 - 1).float())
    assert torch.equal(y, torch.from_numpy(ref.target[:1617]))
    xt, yt = test[179]
    torch.testing.assert_close(xt[0], torch.from_numpy(ref.images[-1] / 8 - 1).float())
    assert int(yt) == ref.target[-1] and x.min() == -1 and x.max() == 1
    assert load_digits("train", resolution=16).shape == (1, 16, 16)


def test_npz_keys_splits_and_checks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    np.savez(
        tmp_path / "d.npz",
        x_train=x_train,
        y_train=np.arange(20) % 4,
        x_test=x_test,
        y_test=np.arange(5) % 2,
        class_names=np.array(["a", "b", "c", "d"]),
    )
    train, test = load_npz(tmp_path / "d.npz", hflip=False), load_npz(tmp_path / "d.npz", "test", hflip=False)
    assert (len(train), len(test), train.num_classes, test.num_classes) == (20, 5, 4, 4)
    assert train.class_names == ["a", "b", "c", "d"] and train.shape == (3, 6, 6)
    torch.testing.assert_close(test[3][0], torch.from_numpy(x_test[3]).permute(2, 0, 1).float() / 127.5 - 1)
    assert int(train[7][1]) == 3
    flipped = load_npz(tmp_path / "d.npz")[(2, 1)][0]
    torch.testing.assert_close(flipped, train[2][0].flip(-1))
    np.savez(tmp_path / "x.npz", x=x_train[..., 0])
    only = load_npz(tmp_path / "x.npz")
    assert only.num_classes == 0 and only.shape == (1, 6, 6) and int(only[0][1]) == 0
    with pytest.raises(KeyError, match="no x_test .* keys: x"):
        load_npz(tmp_path / "x.npz", "test")
    np.savez(tmp_path / "f.npz", x=x_train.astype(np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        load_npz(tmp_path / "f.npz")
    with pytest.raises(FileNotFoundError):
        load_npz(tmp_path / "missing.npz")


def test_build_dataset_dispatch_and_errors(tmp_path: Path) -> None:
    write(tmp_path / "imgs" / "a" / "0.png", constant(5))
    assert build_dataset(DataConfig()).num_classes == 10
    assert len(build_dataset(DataConfig(), split="test")) == 180
    ds = build_dataset(DataConfig(source="folder", path=str(tmp_path / "imgs"), max_bad_fraction=0.3))
    assert isinstance(ds, FolderDataset) and ds.class_names == ["a"] and ds.max_bad_fraction == 0.3
    with pytest.raises(ValueError, match="choose one of: digits, npz, folder, latent"):
        build_dataset(DataConfig(source="lmdb"))
    with pytest.raises(ValueError, match="needs data.path"):
        build_dataset(DataConfig(source="folder"))
    with pytest.raises(ValueError, match="has no test split"):
        build_dataset(DataConfig(source="folder", path=str(tmp_path / "imgs")), split="test")
    with pytest.raises(ValueError, match="split='val'"):
        build_dataset(DataConfig(), split="val")


def test_mnist_from_shared_data_as_npz() -> None:
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} absent (shared data folder not available)")
    ds = build_dataset(DataConfig(source="npz", path=str(path)))
    assert len(ds) == 60000 and ds.shape == (1, 28, 28) and ds.num_classes == 10
    x, y, _ = ds.get_batch(list(range(0, 60000, 97)))
    assert x.min() == -1 and x.max() == 1 and set(y.tolist()) == set(range(10))
