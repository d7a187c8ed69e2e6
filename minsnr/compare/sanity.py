"""Is the race's score worth racing on? Measured once per comparison and reported before any verdict:

    floor     the score of log.eval_num real held-out images (what a perfect model would score; fid_cls and
              fid only); training images when the test split is smaller, since a Frechet distance on fewer
              images is biased upward
    ceiling   the score of an untrained model (seed 0's initial weights)
    noise     the spread of the score when one checkpoint (the first reference run's final EMA model) is
              evaluated again with other sampler seeds (bits/dim: other timesteps and noise): the standard
              deviation of the log score, so 0.1 reads as "evaluations move by about 10%"

plus warnings: a fid_cls classifier with few classes or a low held-out accuracy, a score that barely
separates untrained samples from real images, a noisy score, and a curve whose early evaluations score as
well as its end (seen on 16x16 faces with a 2-class classifier: samples after 250 steps scored as well as
after 3,000).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from minsnr.config import Config

NOISE_SEEDS = 3  # extra evaluations of the same checkpoint
FEW_CLASSES = 5
LOW_ACCURACY = 0.9
NOISY = 0.2  # sd of the log score
FEW_EVALUATIONS = 8  # per run: fewer make smoothed readings and the noise estimate coarse


def _scorers(cfg: Config, metric: str, classifier: str | None, cache: Path, device: Any) -> tuple[Any, Any]:
    """((model, seed) -> score, the way a run's evaluation hook scores it; (images, labels) -> score, or None
    for bits/dim, which scores models only)."""
    from minsnr.data import build_dataset
    from minsnr.evaluate.periodic import draw_samples, make_bpd_scorer, make_scorer

    if metric == "bpd":
        bpd = make_bpd_scorer(cfg, device)
        return lambda model, seed: bpd(model, seed)["bpd"], None
    score = make_scorer(classifier if metric == "fid_cls" else None, build_dataset(cfg.data), cache, cfg, device)
    n, batch = cfg.log.eval_num, cfg.train.batch_size
    return (
        lambda model, seed: score(*draw_samples(model, cfg, n, device, batch, seed))[metric],
        lambda images, labels: score(images, labels)[metric],
    )


def bounds(cfg: Config, metric: str, classifier: str | None, run_dir: Path, device: Any) -> dict[str, Any]:
    """Floor (real held-out images) and ceiling (the untrained model) of the score."""
    import torch

    from minsnr.config import with_model_args
    from minsnr.evaluate.images import to_uint8
    from minsnr.evaluate.likelihood import held_out_images
    from minsnr.models import build_model

    cfg = with_model_args(cfg)
    score_model, score_images = _scorers(cfg, metric, classifier, run_dir / "sanity", device)
    torch.manual_seed(cfg.train.seed)  # the initial weights of seed 0's runs (minsnr.train.Trainer)
    untrained = build_model(cfg.model).to(device).eval()
    out: dict[str, Any] = {"ceiling": float(score_model(untrained, cfg.train.seed)), "floor": None, "floor_split": None}
    if score_images is not None:
        x, labels, split = held_out_images(cfg, cfg.log.eval_num)
        if len(x) < cfg.log.eval_num:  # a Frechet distance on fewer images is biased upward: not a floor
            from minsnr.evaluate.losses import held_out

            split = f"train: the test split has only {len(x)} of the {cfg.log.eval_num} images an evaluation scores"
            x, labels = held_out(cfg, None, "train", cfg.log.eval_num, 0)
        y = None if labels is None else labels.numpy()
        out["floor"], out["floor_split"] = float(score_images([to_uint8(x)], y)), split
    return out


def noise(
    cfg: Config, metric: str, classifier: str | None, run_dir: Path, checkpoint: Path, logged: float, device: Any
) -> dict[str, Any]:
    """The score of one checkpoint under NOISE_SEEDS other evaluation seeds, with the logged one."""
    from minsnr.checkpoint import load_model

    model, _ = load_model(checkpoint, ema=True, map_location=device)
    score, _ = _scorers(cfg, metric, classifier, run_dir / "sanity", device)
    seeds = [cfg.train.seed + 1000 + k for k in range(NOISE_SEEDS)]
    scores = [logged] + [float(score(model.eval(), s)) for s in seeds]
    return {
        "checkpoint": str(checkpoint),
        "scores": scores,
        "seeds": [cfg.train.seed, *seeds],
        "sd_log": float(np.std(np.log(scores), ddof=1)),
    }


def classifier_meta(classifier: str | None) -> dict[str, Any] | None:
    if not classifier:
        return None
    from minsnr.evaluate.classifier import classifier_paths

    meta = json.loads(classifier_paths(classifier)[1].read_text())
    return {k: meta.get(k) for k in ("num_classes", "test_accuracy", "test_images", "data")}


def warnings(sanity: dict[str, Any], runs: list[dict[str, Any]], steps: int) -> list[str]:
    """Lines that say why a verdict on this score may mislead. `runs`: report runs (per-seed curves)."""
    out = []
    evaluations = max((len(s["steps"]) for r in runs for s in r["seeds"]), default=0)
    if 0 < evaluations < FEW_EVALUATIONS:
        out.append(
            f"only {evaluations} evaluations per run: early crossings are bounds and the curves' noise "
            f"cannot be told from their trend; use a smaller --eval-every ({FEW_EVALUATIONS} or more)"
        )
    clf = sanity.get("classifier")
    if clf:
        if clf.get("num_classes") is not None and clf["num_classes"] < FEW_CLASSES:
            out.append(
                f"the fid_cls classifier tells only {clf['num_classes']} classes apart: its features may not "
                "measure sample quality; look at the previews, or race on --metric bpd"
            )
        if clf.get("test_accuracy") is not None and clf["test_accuracy"] < LOW_ACCURACY:
            out.append(
                f"the fid_cls classifier is right on only {100 * clf['test_accuracy']:.0f}% of held-out "
                "images: its features may not measure sample quality (--classifier-epochs, or --metric bpd)"
            )
    floor, ceiling = sanity.get("floor"), sanity.get("ceiling")
    if floor is not None and ceiling is not None and ceiling < 3 * floor:
        out.append(f"the score barely separates an untrained model ({ceiling:.4g}) from real images ({floor:.4g})")
    nz = sanity.get("noise")
    if nz and nz["sd_log"] > NOISY:
        out.append(
            f"one checkpoint scores {100 * nz['sd_log']:.0f}% apart under other sampler seeds: raise "
            "--eval-num for curves that can be told apart"
        )
    for run in runs:
        for s in run["seeds"]:
            st, v = np.array(s["steps"]), np.array(s["values"])
            early = st <= steps / 4
            if len(v) < 4 or not early.any() or early.all():
                continue
            end = float(np.exp(np.mean(np.log(v[-2:]))))
            i = int(np.argmin(np.where(early, v, np.inf)))
            if v[i] <= end:
                out.append(
                    f"seed{s['seed']}/{run['name']}: its evaluation at step {st[i]:.0f} ({v[i]:.4g}) scores "
                    f"as well as its last two ({end:.4g}): the score may not measure sample quality"
                )
    return out
