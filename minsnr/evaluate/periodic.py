"""Evaluation during training (log.eval_every): FID against training steps, as in figure 5.

Every call draws log.eval_num class-balanced samples from the EMA model with the run's sampler settings
and the same seed (so the curve shows the model changing, not the noise), then scores them against the
training images: `fid_cls` and `cls_acc` with the classifier log.eval_classifier (from `minsnr
train-classifier`), or the Inception `fid` when no classifier is set. The reference statistics (up to
50,000 training images, evenly spaced) are computed once and cached in RUN_DIR/eval/.
log.eval_metric=bpd logs instead the variational bound in bits per dimension of log.eval_num held-out
images (minsnr.evaluate.likelihood), which needs no sampling, labels or classifier.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from minsnr.config import Config
from minsnr.evaluate.classifier import classifier_paths, feature_fn, fid_cls, load_classifier
from minsnr.evaluate.fid import cached_stats, compute_stats, file_tag, inception_fn, load_inception
from minsnr.evaluate.frechet import frechet_distance
from minsnr.evaluate.images import to_uint8
from minsnr.evaluate.sample import balanced_labels, sample_images
from minsnr.extras import require

MAX_REFERENCE = 50_000


def reference_batches(dataset: Any, batch_size: int, limit: int = MAX_REFERENCE) -> Iterator[np.ndarray]:
    """Un-augmented training images as uint8 [B, H, W, C] batches (at most `limit`, evenly spaced)."""
    idx = np.unique(np.linspace(0, len(dataset) - 1, min(limit, len(dataset))).astype(np.int64))
    for i in range(0, len(idx), batch_size):
        yield to_uint8(dataset.get_batch(idx[i : i + batch_size].tolist())[0])


def draw_samples(
    model: nn.Module, cfg: Config, num: int, device: torch.device, batch_size: int = 250, seed: int | None = None
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """`num` class-balanced samples (uint8 batches) and their labels, from `seed` (None: cfg.train.seed)."""
    seed = cfg.train.seed if seed is None else seed
    k = cfg.model.num_classes
    labels = balanced_labels(num, k, seed) if k > 0 else None
    batches = []
    for lo in range(0, num, batch_size):
        y = None if labels is None else labels[lo : lo + batch_size]
        batches.append(sample_images(model, cfg, y, min(batch_size, num - lo), seed, first=lo, device=device))
    return batches, labels


def make_scorer(
    path: str | None, dataset: Any, cache_dir: Path, cfg: Config, device: torch.device
) -> Callable[[list[np.ndarray], np.ndarray | None], dict[str, float]]:
    """(sample batches, labels) -> {"fid_cls", "cls_acc"} with the classifier at `path`, else {"fid"};
    reference statistics of `dataset` computed once and cached in cache_dir."""
    if path:
        model, meta = load_classifier(path, device)
        features = feature_fn(model, meta, device)
        tag = f"fid_cls-{file_tag(classifier_paths(path)[0])}"
    else:
        features = inception_fn(load_inception(None, device), device)
        tag = "inception"
    source = json.dumps({"data": vars(cfg.data), "count": len(dataset)}, sort_keys=True)
    ref = cached_stats(
        cache_dir / f"ref.{tag}.stats.npz",
        source,
        lambda: compute_stats(reference_batches(dataset, cfg.train.batch_size), features),
    )
    if path:
        return lambda batches, labels: fid_cls(model, meta, batches, ref, labels, device)
    return lambda batches, labels: {"fid": frechet_distance(*compute_stats(batches, features), *ref)}


def metric_of(cfg: Config) -> str:
    """The score log.eval_every logs: log.eval_metric, with auto = fid_cls when a classifier is set, else fid."""
    if cfg.log.eval_metric != "auto":
        return cfg.log.eval_metric
    return "fid_cls" if cfg.log.eval_classifier else "fid"


def make_bpd_scorer(cfg: Config, device: torch.device) -> Callable[..., dict[str, float]]:
    """(EMA model, seed=cfg.train.seed) -> {"bpd", "bpd_prior", "bpd_diffusion", "bpd_decoder"} on log.eval_num
    held-out images (the test split, else training images, said once): the same images at every call, and the
    same timesteps and noise for the same seed."""
    from minsnr.evaluate.likelihood import bits_per_dim, held_out_images
    from minsnr.schedule import schedule_of

    x, labels, split = held_out_images(cfg, cfg.log.eval_num)
    if split != "test":
        print(f"bits/dim: data.source={cfg.data.source} has no test split; scoring {len(x)} training images")
    schedule = schedule_of(cfg.schedule)
    return lambda model, seed=cfg.train.seed: bits_per_dim(
        model, schedule, cfg.loss.target, x, labels, seed=seed, batch_size=cfg.train.batch_size, device=device
    )


def make_eval_hook(cfg: Config) -> Callable[[Any], dict[str, float]]:
    """A minsnr.train Hook function: ctx (ema, device, run_dir, dataset) -> metrics to log."""
    if cfg.data.source == "latent":
        raise ValueError(
            "log.eval_every > 0 is for pixel-space runs; evaluate latent models with "
            "`minsnr sample` + `minsnr fid` on their checkpoints"
        )
    if cfg.log.eval_num < 2:
        raise ValueError(f"log.eval_num={cfg.log.eval_num} must be >= 2")
    metric = metric_of(cfg)
    if metric == "fid":  # before training, not at the first evaluation
        require("torch_fidelity", "the Inception FID of log.eval_every; or set log.eval_classifier")
    scorer: list[Callable[..., dict[str, float]]] = []

    def hook(ctx: Any) -> dict[str, float]:
        if metric == "bpd":
            if not scorer:
                scorer.append(make_bpd_scorer(cfg, ctx.device))
            return scorer[0](ctx.ema)
        if not scorer:
            path = cfg.log.eval_classifier if metric == "fid_cls" else None
            scorer.append(make_scorer(path, ctx.dataset, Path(ctx.run_dir) / "eval", cfg, ctx.device))
        return scorer[0](*draw_samples(ctx.ema, cfg, cfg.log.eval_num, ctx.device, cfg.train.batch_size))

    return hook
