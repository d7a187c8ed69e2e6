"""The fid_cls classifier of a comparison: a given file, the Inception FID, or (auto) the small CNN of
`minsnr train-classifier` trained on the config's own data and cached in RUN_DIR/classifier/."""

from __future__ import annotations

import json
import time
from pathlib import Path

from minsnr.compare.presets import Settings
from minsnr.config import Config, ConfigError


def _data_id(base: Config) -> str:
    if base.data.source == "digits":
        return "digits"
    if base.data.source == "npz" and base.data.path:
        return base.data.path
    raise ConfigError(f"--classifier auto trains on digits or an .npz, not data.source={base.data.source}; train one "
                      "with `minsnr train-classifier` and pass --classifier PATH (or --classifier inception)")


def ensure_classifier(base: Config, settings: Settings, run_dir: Path, device: str = "cpu") -> str | None:
    """-> the classifier path for log.eval_classifier, or None for the Inception FID."""
    from minsnr.evaluate.classifier import accuracy, classifier_paths, load_labelled, save_classifier, train_classifier

    choice = settings.classifier
    if choice == "inception":
        return None
    want = [base.model.input_size, base.model.input_size, base.model.in_channels]
    if choice != "auto":
        weights, meta_path = classifier_paths(choice)
        if not weights.is_file() or not meta_path.is_file():
            raise ConfigError(f"--classifier {choice}: {weights} or {meta_path} not found "
                              "(train one with `minsnr train-classifier`)")
        shape = json.loads(meta_path.read_text()).get("image_shape")
        if shape != want:
            raise ConfigError(f"--classifier {choice} takes images {shape} (H, W, C), the model makes {want}")
        return str(Path(choice).resolve())
    data = _data_id(base)
    stem = run_dir / "classifier" / "fid_cls"
    weights, meta_path = classifier_paths(stem)
    if weights.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("data") == data and meta.get("epochs") == settings.classifier_epochs:
            return str(stem.resolve())
        raise ConfigError(f"{meta_path} was trained on {meta.get('data')!r} for {meta.get('epochs')} epochs, this "
                          f"comparison needs {data!r} for {settings.classifier_epochs}; choose another run_dir")
    start = time.perf_counter()
    x, y, x_test, y_test = load_labelled(data)
    if list(x.shape[1:]) != want:
        raise ConfigError(f"{data} holds images {list(x.shape[1:])} (H, W, C) but the model makes {want} (data.resolution "
                          "resizes them): train a classifier on resized images and pass --classifier PATH")
    model = train_classifier(x, y, epochs=settings.classifier_epochs, seed=base.train.seed, device=device)
    acc = accuracy(model, x_test, y_test, device)
    save_classifier(model, stem, {"image_shape": list(x.shape[1:]), "num_classes": int(y.max()) + 1, "width": 16,
                                  "feature_dim": model.head.in_features, "test_accuracy": acc, "data": data,
                                  "train_images": len(x), "epochs": settings.classifier_epochs})
    print(f"fid_cls classifier: {100 * acc:.1f}% on {len(x_test)} held-out images, trained in "
          f"{time.perf_counter() - start:.0f} s, cached in {stem}.*")
    return str(stem.resolve())
