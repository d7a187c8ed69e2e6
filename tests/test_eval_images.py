"""Streaming npz writer/reader (ADM's arr_0/arr_1 format), image folders, uint8 conversion, grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from minsnr.evaluate.grid import make_grid, save_grid
from minsnr.evaluate.images import open_images, to_uint8, write_npz


def test_write_npz_streams_batches_that_np_load_reads(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 5, 6, 3), dtype=np.uint8)
    y = rng.integers(0, 7, 10)
    write_npz(tmp_path / "s.npz", (x[i : i + 4] for i in range(0, 10, 4)), 10, y)
    with np.load(tmp_path / "s.npz") as z:
        assert z.files == ["arr_0", "arr_1"] and np.array_equal(z["arr_0"], x) and np.array_equal(z["arr_1"], y)
    images = open_images(tmp_path / "s.npz")
    assert (images.count, images.shape, images.key) == (10, (5, 6, 3), "arr_0")
    assert np.array_equal(np.concatenate(list(images.batches(3))), x) and np.array_equal(images.labels, y)
    with pytest.raises(ValueError, match="expected 11 images"):
        write_npz(tmp_path / "t.npz", [x], 11, None)
    assert not (tmp_path / "t.npz").exists()


def test_open_images_npz_keys_grayscale_and_errors(tmp_path):
    x = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    np.savez_compressed(tmp_path / "m.npz", x_train=x, y_train=np.array([3, 1]), x_test=x[:1])
    images = open_images(tmp_path / "m.npz")
    assert images.key == "x_train" and images.shape == (4, 4, 1) and images.labels.tolist() == [3, 1]
    assert np.array_equal(next(images.batches(5))[..., 0], x)
    assert open_images(tmp_path / "m.npz", "x_test").count == 1
    np.savez(tmp_path / "f.npz", arr_0=x.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        open_images(tmp_path / "f.npz")
    with pytest.raises(KeyError, match="arrays in the file"):
        open_images(tmp_path / "m.npz", "nope")


def test_open_images_folder(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (3, 6, 5, 3), dtype=np.uint8)
    (tmp_path / "sub").mkdir()
    for i, img in enumerate(x):
        Image.fromarray(img).save(tmp_path / ("sub" if i == 2 else ".") / f"{i}.png")
    images = open_images(tmp_path)
    assert images.count == 3 and images.shape == (6, 5, 3) and images.labels is None
    assert np.array_equal(np.concatenate(list(images.batches(2))), x)
    Image.fromarray(x[0, :4]).save(tmp_path / "sub" / "9.png")
    with pytest.raises(ValueError, match="9.png"):
        list(open_images(tmp_path).batches(4))


def test_to_uint8_rounds_to_nearest():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5]).view(1, 1, 1, 6)
    assert to_uint8(x).ravel().tolist() == [0, 0, 128, 191, 255, 255]
    levels = torch.arange(256).float() / 127.5 - 1  # exact inverse of x / 127.5 - 1
    assert to_uint8(levels.view(1, 1, 1, -1)).ravel().tolist() == list(range(256))


def test_grid_layout_and_file(tmp_path):
    images = np.stack([np.full((2, 3, 1), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = make_grid(images, nrow=3, padding=1)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1)
    assert grid[1, 1, 0] == 10 and grid[1, 5, 0] == 20 and grid[4, 1, 0] == 40 and grid[4, 9, 0] == 0
    save_grid(torch.zeros(4, 3, 8, 8), tmp_path / "g" / "grid.png", nrow=2)
    with Image.open(tmp_path / "g" / "grid.png") as im:
        assert im.size == (2 * 10 + 2, 2 * 10 + 2) and im.mode == "RGB"
    small = make_grid(images, nrow=3)[..., 0]  # 17 px wide -> enlarged 6x to reach 100, pixels kept
    save_grid(images, tmp_path / "big.png", nrow=3, min_width=100)
    with Image.open(tmp_path / "big.png") as im:
        big = np.asarray(im)
    assert big.shape == (6 * small.shape[0], 6 * small.shape[1]) and (big[::6, ::6] == small).all()
