"""Periodic fid_cls during training: reference statistics of the training images, cached; fixed-seed samples."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from minsnr.config import load_config
from minsnr.data import build_dataset
from minsnr.evaluate import classifier, periodic
from minsnr.evaluate.frechet import feature_stats

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.args={patch_size: 2, depth: 1, width: 16, num_heads: 2}",
    "train.batch_size=16",
    "log.every=2",
    "log.preview_every=0",
    "log.tensorboard=false",
    "checkpoint.every=2",
    "sample.steps=2",
    "log.eval_num=40",
]


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory) -> Path:
    x, y, _, _ = classifier.load_labelled("digits")
    model = classifier.train_classifier(x, y, epochs=2)
    path = tmp_path_factory.mktemp("cls") / "digits"
    classifier.save_classifier(
        model, path, {"image_shape": [8, 8, 1], "num_classes": 10, "width": 16, "feature_dim": 128}
    )
    return path


def test_eval_hook_scores_samples_against_cached_training_stats(digits_classifier, tmp_path, monkeypatch):
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [*TINY, f"log.eval_classifier={digits_classifier}"])
    from minsnr.models import build_model

    torch.manual_seed(0)
    ema = build_model(cfg.model).eval()
    ctx = SimpleNamespace(ema=ema, device=torch.device("cpu"), run_dir=tmp_path, dataset=build_dataset(cfg.data))
    refs = []
    real = periodic.reference_batches
    monkeypatch.setattr(periodic, "reference_batches", lambda *a, **k: refs.append(1) or real(*a, **k))

    hook = periodic.make_eval_hook(cfg)
    first = hook(ctx)
    assert set(first) == {"fid_cls", "cls_acc"} and first["fid_cls"] > 0 and 0 <= first["cls_acc"] <= 1
    assert hook(ctx) == first  # same seed, same model: same samples
    assert periodic.make_eval_hook(cfg)(ctx) == first and len(refs) == 1  # a new hook reads the cache
    [cache] = (tmp_path / "eval").glob("ref.fid_cls-*.stats.npz")

    # the cached reference is the classifier's view of the 1617 training digits
    model, meta = classifier.load_classifier(digits_classifier)
    x, _, _, _ = classifier.load_labelled("digits")
    mu, sigma = feature_stats(classifier.classify(model, [x], meta["image_shape"])[0])
    with np.load(cache) as z:
        np.testing.assert_allclose(z["mu"], mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(z["sigma"], sigma, rtol=1e-4, atol=1e-5 * np.abs(sigma).max())


def test_eval_hook_logs_from_the_training_loop(digits_classifier, tmp_path):
    from minsnr.train import Hook, train

    cfg = load_config(
        ROOT / "configs" / "quickstart.yaml",
        [*TINY, f"log.eval_classifier={digits_classifier}", f"run_dir={tmp_path}", "train.steps=2"],
    )
    train(cfg, (Hook(2, periodic.make_eval_hook(cfg)),))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and np.isfinite(records[-1]["fid_cls"]) and "cls_acc" in records[-1]


def test_eval_hook_rejects_latent_runs():
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["data.source=latent", "data.path=/nowhere"])
    with pytest.raises(ValueError, match="minsnr sample"):
        periodic.make_eval_hook(cfg)
