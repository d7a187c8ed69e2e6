"""`python -m minsnr.quickcheck RUN_DIR`: does the quickstart model draw the digit it is asked for?

Trains the small CNN of `minsnr train-classifier` on scikit-learn's digits (seconds), samples
--per-class images of every digit from the run's EMA model with the run's sampler settings, and reports
the share classified as their conditioning label (chance: 10%), per class and overall. Writes
RUN_DIR/quickcheck.json and RUN_DIR/quickcheck.png (one row per digit).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minsnr.checkpoint import load_model
from minsnr.evaluate.classifier import accuracy, classify, load_labelled, train_classifier
from minsnr.evaluate.grid import save_grid
from minsnr.evaluate.sample import sample_images
from minsnr.evaluate.util import HelpFormatter


def check(checkpoint: str | Path, per_class: int = 50, seed: int = 0, classifier_epochs: int = 8) -> dict[str, Any]:
    model, cfg = load_model(checkpoint)
    if cfg.data.source != "digits" or cfg.model.num_classes != 10:
        raise ValueError(f"{checkpoint} is not a class-conditional digits model (data.source={cfg.data.source})")
    x_train, y_train, x_test, y_test = load_labelled("digits")
    clf = train_classifier(x_train, y_train, epochs=classifier_epochs, seed=seed)
    labels = np.repeat(np.arange(10), per_class)
    images = sample_images(model, cfg, labels, len(labels), seed, device=torch.device("cpu"))
    _, pred = classify(clf, [images], images.shape[1:])
    hit = pred == labels
    return {
        "classifier_test_accuracy": accuracy(clf, x_test, y_test),
        "sample_accuracy": float(hit.mean()),
        "per_class": [float(hit[labels == c].mean()) for c in range(10)],
        "samples": len(labels),
        "images": images,
        "per_class_n": per_class,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minsnr.quickcheck", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "run_dir",
        nargs="?",
        default="runs/quickstart",
        type=os.path.expanduser,
        help="run folder of a class-conditional digits model",
    )
    p.add_argument("--per-class", type=int, default=50, help="samples of each digit")
    p.add_argument("--seed", type=int, default=0, help="seed of the classifier and the noise")
    args = p.parse_args(argv)
    run = Path(args.run_dir)
    try:
        result = check(run / "checkpoints" / "latest.pt", args.per_class, args.seed)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"quickcheck: error: {err}", file=sys.stderr)
        return 1
    images = result.pop("images")
    rows = images.reshape(10, result.pop("per_class_n"), *images.shape[1:])[:, :10]  # samples come class by class
    save_grid(rows.reshape(-1, *images.shape[1:]), run / "quickcheck.png", nrow=rows.shape[1], min_width=320)
    (run / "quickcheck.json").write_text(json.dumps(result, indent=2))
    print(f"digit classifier: {100 * result['classifier_test_accuracy']:.1f}% on held-out real digits")
    print(
        f"samples drawn as their conditioning digit: {100 * result['sample_accuracy']:.1f}% "
        f"of {result['samples']} (chance 10%)"
    )
    print("per digit: " + "  ".join(f"{c}:{100 * a:.0f}%" for c, a in enumerate(result["per_class"])))
    print(f"wrote {run / 'quickcheck.json'} and {run / 'quickcheck.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
