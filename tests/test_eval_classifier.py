"""fid_cls on MNIST: the small classifier is accurate and its Frechet distance orders degradations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from minsnr.evaluate import classifier, fid
from minsnr.evaluate.frechet import feature_stats

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"


@pytest.fixture(scope="module")
def mnist():
    if not MNIST.is_file():
        pytest.skip(f"{MNIST} not found (shared test data)")
    with np.load(MNIST) as z:
        return {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}


@pytest.fixture(scope="module")
def trained(mnist, tmp_path_factory) -> Path:
    """Trained once through the CLI: 2 epochs on a seeded 20K subset (MNIST is stored sorted by class)."""
    out = tmp_path_factory.mktemp("cls") / "mnist"
    assert classifier.main([str(MNIST), "--out", str(out), "--epochs", "2", "--limit", "20000"]) == 0
    return out


def test_classifier_files_and_accuracy(trained, mnist):
    meta = json.loads(trained.with_suffix(".json").read_text())
    assert meta["image_shape"] == [28, 28, 1] and meta["num_classes"] == 10 and meta["train_images"] == 20000
    assert trained.with_suffix(".safetensors").is_file() and not list(trained.parent.glob("*.pt"))
    model, meta = classifier.load_classifier(trained.with_suffix(".safetensors"))
    acc = classifier.accuracy(model, mnist["x_test"], mnist["y_test"])
    assert acc >= 0.97 and acc == pytest.approx(meta["test_accuracy"], abs=1e-9)


def _degrade(x: np.ndarray) -> dict[str, np.ndarray]:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    blurred = gaussian_filter(x.astype(np.float64), sigma=(0, 1, 1, 0))
    noisy = x + rng.normal(0, 64, x.shape)
    return {
        "test": x,
        "blurred": np.clip(np.round(blurred), 0, 255).astype(np.uint8),
        "noisy": np.clip(np.round(noisy), 0, 255).astype(np.uint8),
        "uniform": rng.integers(0, 256, x.shape, dtype=np.uint8),
    }


def test_fid_cls_orders_degradations(trained, mnist):
    model, meta = classifier.load_classifier(trained)
    train = mnist["x_train"]
    feats, _ = classifier.classify(model, (train[i : i + 2000] for i in range(0, len(train), 2000)), (28, 28, 1))
    ref = feature_stats(feats)
    x, y = mnist["x_test"], mnist["y_test"]
    res = {
        k: classifier.fid_cls(model, meta, (v[i : i + 2000] for i in range(0, len(v), 2000)), ref, y)
        for k, v in _degrade(x).items()
    }
    order = [res[k]["fid_cls"] for k in ("test", "blurred", "noisy", "uniform")]
    assert order == sorted(order) and len(set(order)) == 4, res
    assert res["test"]["fid_cls"] < 2.0 and res["test"]["cls_acc"] >= 0.97
    assert res["uniform"]["cls_acc"] < 0.3


def test_fid_cli_classifier_features_with_cache(trained, mnist, tmp_path, monkeypatch):
    x, y = mnist["x_test"], mnist["y_test"]
    pick = np.random.default_rng(0).permutation(len(x))
    np.savez(tmp_path / "ref.npz", x_train=x[pick[:3000]], y_train=y[pick[:3000]])
    labels = y[pick[3000:4000]].copy()
    labels[:100] = (labels[:100] + 1) % 10  # 100 of 1000 samples do not show their label
    np.savez(tmp_path / "samples.npz", arr_0=x[pick[3000:4000]], arr_1=labels)
    calls = []
    real = fid.compute_stats
    monkeypatch.setattr(fid, "compute_stats", lambda batches, fn: calls.append(1) or real(batches, fn))
    kw = dict(features="classifier", classifier=trained, device="cpu", batch_size=500, cache_dir=tmp_path / "cache")
    first = fid.compute_fid(tmp_path / "samples.npz", tmp_path / "ref.npz", **kw)
    second = fid.compute_fid(tmp_path / "samples.npz", tmp_path / "ref.npz", **kw)
    assert len(calls) == 1 and len(list((tmp_path / "cache").glob("ref.npz.*.fid_cls-*.stats.npz"))) == 1
    assert first == second and first["num_samples"] == 1000
    assert 0.8 <= first["cls_acc"] <= 0.9  # ~98% of the 900 correctly labelled samples
    assert 0 < first["fid_cls"] < 5


def test_classifier_rejects_other_image_shapes(trained):
    model, meta = classifier.load_classifier(trained)
    with pytest.raises(ValueError, match=r"\(32, 32, 3\)"):
        classifier.classify(model, [np.zeros((2, 32, 32, 3), np.uint8)], meta["image_shape"])
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        classifier.load_classifier(trained.parent / "missing")


def test_digits_split_matches_the_data_layer():
    from minsnr.config import DataConfig
    from minsnr.data import build_dataset
    from minsnr.evaluate.images import to_uint8

    x, y, xt, yt = classifier.load_labelled("digits")
    assert x.shape[1:] == (8, 8, 1) and x.dtype == np.uint8 and x.max() == 255
    for split, (images, labels) in {"train": (x, y), "test": (xt, yt)}.items():
        ds = build_dataset(DataConfig(source="digits", hflip=False), split=split)
        xs, ys, _ = ds.get_batch(list(range(len(ds))))
        assert np.array_equal(to_uint8(xs), images) and np.array_equal(ys.numpy(), labels)


def test_npz_without_test_split_holds_out_a_tenth(tmp_path):
    x = np.arange(50 * 4 * 4, dtype=np.int64).reshape(50, 4, 4).astype(np.uint8)
    np.savez(tmp_path / "d.npz", arr_0=x, arr_1=np.arange(50) % 3)
    xa, ya, xb, yb = classifier.load_labelled(str(tmp_path / "d.npz"))
    assert xa.shape == (45, 4, 4, 1) and xb.shape == (5, 4, 4, 1)
    assert sorted(np.concatenate([ya, yb]).tolist()) == sorted((np.arange(50) % 3).tolist())
    with pytest.raises(KeyError, match="arrays in the file"):
        np.savez(tmp_path / "e.npz", images=x)
        classifier.load_labelled(str(tmp_path / "e.npz"))
