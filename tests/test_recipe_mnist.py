"""configs/mnist.yaml: the 28x28 recipe builds, trains and samples at MNIST's shape (the full recipe's
quality is measured by benchmarks/mnist_recipe.sh, ~10 minutes; far too long for the suite)."""

from pathlib import Path

import numpy as np
import torch

from minsnr.checkpoint import load_model
from minsnr.config import load_config
from minsnr.evaluate.sample import sample_images
from minsnr.train import train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "minsnr" / "configs" / "mnist.yaml"


def fake_mnist(path: Path, n: int = 40) -> Path:
    """MNIST's layout (uint8 [N, 28, 28, 1] under x_train, labels 0..9 under y_train), random pixels."""
    rng = np.random.default_rng(0)
    np.savez(
        path, x_train=rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), y_train=np.arange(n, dtype=np.uint8) % 10
    )
    return path


def test_mnist_config_settings():
    cfg = load_config(CONFIG)
    assert cfg.data.source == "npz" and not cfg.data.hflip  # a mirrored digit is another glyph
    assert (cfg.model.input_size, cfg.model.in_channels, cfg.model.num_classes) == (28, 1, 10)
    assert cfg.sample.sigma_max is not None and cfg.sample.sigma_max <= 80  # not the cosine schedule's 20,291
    assert cfg.loss.label_dropout > 0 or cfg.sample.cfg_scale == 1.0  # guidance needs the null label trained


def test_mnist_config_trains_and_samples_28x28(tmp_path):
    data = fake_mnist(tmp_path / "mnist.npz")
    cfg = load_config(
        CONFIG,
        [
            f"data.path={data}",
            f"run_dir={tmp_path / 'run'}",
            "train.steps=2",
            "train.batch_size=8",
            "log.preview_every=0",
            "log.tensorboard=false",
        ],
    )
    out = train(cfg)
    assert out["step"] == 2
    model, saved = load_model(tmp_path / "run" / "checkpoints" / "latest.pt")
    images = sample_images(model, saved, np.arange(3), 3, seed=0, device=torch.device("cpu"), steps=2)
    assert images.shape == (3, 28, 28, 1) and images.dtype == np.uint8
