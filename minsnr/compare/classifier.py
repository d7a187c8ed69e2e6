"""The score of a comparison: fid_cls with a given classifier file, fid_cls with the small CNN of `minsnr
train-classifier` trained on the images the runs see (auto; cached in RUN_DIR/classifier/), the Inception
FID, or bits/dim (minsnr.evaluate.likelihood), which needs no labels. `--metric auto` picks fid_cls for
labelled data and bits/dim for unlabelled data."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from minsnr.compare.presets import Settings
from minsnr.config import Config, ConfigError

METRICS = ("auto", "fid_cls", "fid", "bpd")
MAX_CLASSIFIER_IMAGES = 50_000


def data_id(base: Config) -> str:
    """What the auto classifier was trained on: the data settings that change the images the runs see."""
    d = base.data
    return json.dumps({"source": d.source, "path": d.path, "resolution": d.resolution, "crop": d.crop}, sort_keys=True)


def _labels_of(base: Config) -> int:
    from minsnr.data import build_dataset

    return build_dataset(dataclasses.replace(base.data, conditional=True)).num_classes


def resolve_metric(base: Config, settings: Settings) -> str:
    """The race's score (fid_cls, fid or bpd), refusing one the data cannot give before anything trains."""
    choice = "fid" if settings.classifier == "inception" else settings.metric
    if choice not in METRICS:
        raise ConfigError(f"--metric {choice!r} is not valid; choose one of: {', '.join(METRICS)}")
    if choice in ("fid", "bpd") or (choice == "fid_cls" and settings.classifier not in ("auto", "inception")):
        return choice
    labelled = _labels_of(base) >= 2
    if choice == "auto":
        if not labelled:
            print(
                f"the data ({base.data.source} {base.data.path or ''}) has no labels: racing on bits/dim "
                "(--metric bpd); --classifier PATH scores fid_cls with a classifier of your own"
            )
        return "fid_cls" if labelled else "bpd"
    if not labelled:
        raise ConfigError(
            f"--metric fid_cls trains its classifier on the data's labels, and {base.data.source} "
            f"{base.data.path or ''} has none: use --metric bpd, or --classifier PATH"
        )
    return choice


def labelled_images(base: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The images the runs see (data.resolution and data.crop applied, no flips), as uint8 NHWC, with their
    labels -> x_train, y_train, x_test, y_test; without a test split the last 10% of a seeded shuffle."""
    from minsnr.data import build_dataset
    from minsnr.evaluate.images import to_uint8

    data = dataclasses.replace(base.data, conditional=True, hflip=False)

    def read(split: str) -> tuple[np.ndarray, np.ndarray]:
        ds = build_dataset(data, split=split)
        idx = np.unique(np.linspace(0, len(ds) - 1, min(MAX_CLASSIFIER_IMAGES, len(ds))).astype(np.int64))
        xs, ys = [], []
        for i in range(0, len(idx), 512):
            x, y, _ = ds.get_batch(idx[i : i + 512].tolist())
            xs.append(to_uint8(x))
            ys.append(y.numpy())
        return np.concatenate(xs), np.concatenate(ys).astype(np.int64)

    x, y = read("train")
    try:
        x_test, y_test = read("test")
    except (KeyError, ValueError):
        perm = np.random.default_rng(0).permutation(len(x))
        test, train = perm[: len(x) // 10], perm[len(x) // 10 :]
        return x[train], y[train], x[test], y[test]
    return x, y, x_test, y_test


def ensure_classifier(base: Config, settings: Settings, metric: str, run_dir: Path, device: str = "cpu") -> str | None:
    """-> the classifier path for log.eval_classifier (fid_cls), or None (fid, bpd)."""
    from minsnr.evaluate.classifier import accuracy, classifier_paths, save_classifier, train_classifier

    if metric != "fid_cls":
        return None
    choice = settings.classifier
    want = [base.model.input_size, base.model.input_size, base.model.in_channels]
    if choice != "auto":
        weights, meta_path = classifier_paths(choice)
        if not weights.is_file() or not meta_path.is_file():
            raise ConfigError(
                f"--classifier {choice}: {weights} or {meta_path} not found "
                "(train one with `minsnr train-classifier`, or use --classifier auto)"
            )
        shape = json.loads(meta_path.read_text()).get("image_shape")
        if shape != want:
            raise ConfigError(
                f"--classifier {choice} takes images {shape} (H, W, C), the runs make {want}: use "
                "--classifier auto (trained on the images the runs see) or one trained at this size"
            )
        return str(Path(choice).resolve())
    data = data_id(base)
    stem = run_dir / "classifier" / "fid_cls"
    weights, meta_path = classifier_paths(stem)
    if weights.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("data") == data and meta.get("epochs") == settings.classifier_epochs:
            return str(stem.resolve())
        raise ConfigError(
            f"{meta_path} was trained on {meta.get('data')} for {meta.get('epochs')} epochs, this "
            f"comparison needs {data} for {settings.classifier_epochs}; choose another run_dir"
        )
    start = time.perf_counter()
    x, y, x_test, y_test = labelled_images(base)
    if list(x.shape[1:]) != want:
        raise ConfigError(
            f"the data gives images {list(x.shape[1:])} (H, W, C) but the model makes {want}: set "
            "model.input_size / model.in_channels (or data.resolution) to match"
        )
    model = train_classifier(x, y, epochs=settings.classifier_epochs, seed=base.train.seed, device=device)
    acc = accuracy(model, x_test, y_test, device)
    save_classifier(
        model,
        stem,
        {
            "image_shape": list(x.shape[1:]),
            "num_classes": int(y.max()) + 1,
            "width": 16,
            "feature_dim": model.head.in_features,
            "test_accuracy": acc,
            "data": data,
            "train_images": len(x),
            "test_images": len(x_test),
            "epochs": settings.classifier_epochs,
        },
    )
    print(
        f"fid_cls classifier: {100 * acc:.1f}% on {len(x_test)} held-out images, trained in "
        f"{time.perf_counter() - start:.0f} s, cached in {stem}.*"
    )
    return str(stem.resolve())
