"""Latent path, offline: a tiny random AutoencoderKL, encode -> memmap -> LatentDataset -> decode."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minsnr.config import DataConfig
from minsnr.data import Batches, LatentDataset, build_dataset
from minsnr.data.folder import FolderDataset
from minsnr.data.latent import decode_latents, encode, load_vae, main, read_meta

pytest.importorskip("diffusers")

SIZE = 16  # images 16x16 -> latents 4x8x8 (two encoder blocks: one downsampling)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> object:
    """Tiny convolutions run hundreds of times slower with 2 threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiny VAE folder, image folder: 2 classes, 11 smooth 20x18 images)."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SIZE,
    )
    vae.save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    for i in range(11):
        (root / "imgs" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((20, 18), Image.BICUBIC).save(root / "imgs" / f"class{i % 2}" / f"{i}.png")
    return root / "vae", root / "imgs"


def test_encode_dataset_decode_round_trip(setup: tuple[Path, Path], tmp_path: Path) -> None:
    vae_dir, imgs = setup
    assert encode(str(imgs), tmp_path / "lat", str(vae_dir), SIZE, batch=3, chunk=4, device="cpu", dtype="float32")
    meta = read_meta(tmp_path / "lat")
    assert meta["count"] == 11 and meta["shape"] == [4, 8, 8] and meta["vae"] == str(vae_dir)
    assert meta["scale_factor"] == 0.18215 and meta["class_names"] == ["class0", "class1"] and meta["bad_files"] == []
    moments = np.load(tmp_path / "lat" / "moments.npy", mmap_mode="r")
    assert moments.shape == (11, 2, 2, 4, 8, 8) and moments.dtype == np.float32

    images = FolderDataset(imgs, resolution=SIZE, crop="adm", hflip=False)
    x, labels, _ = images.get_batch(list(range(11)))
    vae = load_vae(str(vae_dir))
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        post_flip = vae.encode(x.flip(-1)).latent_dist
    torch.testing.assert_close(torch.from_numpy(np.array(moments[:, 0, 0])), post.mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(np.array(moments[:, 0, 1])), post.std, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(np.array(moments[:, 1, 0])), post_flip.mean, atol=1e-5, rtol=1e-4)

    ds = LatentDataset(tmp_path / "lat")
    assert (len(ds), ds.shape, ds.num_classes, ds.class_names) == (11, (4, 8, 8), 2, ["class0", "class1"])
    z, y = ds[7]  # a plain index: the scaled posterior mean of the unflipped image
    torch.testing.assert_close(z, 0.18215 * post.mean[7], atol=1e-5, rtol=1e-4)
    assert int(y) == int(labels[7]) == 1  # sorted class folders: 6 images of class0, then class1
    aug = (12345 << 1) | 1  # flip bit set; the noise is seeded by the rest
    z, _ = ds[(5, aug)]
    eps = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(12345))
    torch.testing.assert_close(z, 0.18215 * (post_flip.mean[5] + post_flip.std[5] * eps), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ds[(5, aug)][0], z)  # deterministic per key
    assert not torch.equal(ds[(5, aug + 2)][0], z)  # another seed, another sample

    batch, batch_labels = next(Batches(ds, 4, seed=0))
    assert batch.shape == (4, 4, 8, 8) and batch_labels.dtype == torch.int64
    decoded = decode_latents(vae, batch, ds.scale_factor)
    assert decoded.shape == (4, 3, SIZE, SIZE) and decoded.dtype == torch.float32 and decoded.abs().max() <= 1
    with torch.no_grad():
        expected = vae.decode(batch / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(decoded, expected)


def test_interrupted_encode_resumes_to_identical_files(setup: tuple[Path, Path], tmp_path: Path) -> None:
    vae_dir, imgs = setup
    args = [
        "--data",
        str(imgs),
        "--vae",
        str(vae_dir),
        "--size",
        str(SIZE),
        "--batch",
        "3",
        "--chunk",
        "4",
        "--device",
        "cpu",
        "--workers",
        "0",
    ]
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0
    part = tmp_path / "part"
    assert not encode(str(imgs), part, str(vae_dir), SIZE, batch=3, chunk=4, device="cpu", max_chunks=1)
    assert sorted(p.name for p in (part / "done").iterdir()) == ["000000.json"]
    with pytest.raises(FileNotFoundError, match="unfinished encode"):
        LatentDataset(part)
    first = (part / "done" / "000000.json").stat().st_mtime_ns
    assert main(args + ["--out", str(part)]) == 0
    assert (part / "done" / "000000.json").stat().st_mtime_ns == first  # the finished chunk was not redone
    for name in ("moments.npy", "labels.npy", "meta.json", "encode.json"):
        assert (part / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert np.load(part / "moments.npy").dtype == np.float16
    with pytest.raises(ValueError, match="other settings .*size=16"):
        encode(str(imgs), part, str(vae_dir), 8, batch=3, chunk=4, device="cpu")


def test_build_dataset_latent_source(setup: tuple[Path, Path], tmp_path: Path) -> None:
    vae_dir, imgs = setup
    encode(str(imgs), tmp_path / "lat", str(vae_dir), SIZE, chunk=8, device="cpu")
    ds = build_dataset(DataConfig(source="latent", path=str(tmp_path / "lat"), resolution=SIZE))
    assert isinstance(ds, LatentDataset) and ds.shape == (4, 8, 8)
    unconditional = build_dataset(DataConfig(source="latent", path=str(tmp_path / "lat"), conditional=False))
    assert unconditional.num_classes == 0 and int(unconditional[3][1]) == 0
    with pytest.raises(ValueError, match="do not match"):
        build_dataset(DataConfig(source="latent", path=str(tmp_path / "lat"), resolution=64))
    with pytest.raises(FileNotFoundError, match="not a latent folder"):
        LatentDataset(tmp_path)
    meta = json.loads((tmp_path / "lat" / "meta.json").read_text())  # plain JSON for other tools
    assert {"vae", "scale_factor", "count", "shape", "num_classes", "class_names"} <= set(meta)


def test_missing_diffusers_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"pip install 'minsnr\[latent\]'"):
        load_vae("stabilityai/sd-vae-ft-mse")
