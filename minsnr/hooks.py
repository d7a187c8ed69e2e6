"""The periodic work of a training run, assembled from the layers above `train` (evaluate, pareto):
EMA preview grids, periodic fid_cls / FID, the Pareto monitor. Used by `minsnr train` and `minsnr compare`."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import numpy as np

from minsnr.config import Config
from minsnr.extras import optional
from minsnr.train import Hook, HookContext


def make_preview_hook(cfg: Config) -> Callable[[HookContext], None]:
    """EMA samples at a fixed seed with the run's sampler settings: one row per class (the first 10
    classes) or an 8x8 grid, saved as previews/step_*.png and samples.png; latents decoded by the VAE
    (loaded at the first preview, then kept)."""
    from minsnr.evaluate.grid import save_grid
    from minsnr.evaluate.sample import latent_decoder, sample_images

    m, cols = cfg.model, 8
    rows = min(m.num_classes, 10) if m.num_classes > 0 else 8
    labels = np.repeat(np.arange(rows), cols) if m.num_classes > 0 else None
    decoders: list[Any] = []

    def hook(ctx: HookContext) -> None:
        if not decoders:
            decoders.append(latent_decoder(cfg, ctx.device))
        images = sample_images(ctx.ema, cfg, labels, rows * cols, cfg.train.seed, device=ctx.device, decode=decoders[0])
        path = ctx.run_dir / "previews" / f"step_{ctx.step:09d}.png"
        save_grid(images, path, nrow=cols, min_width=320)
        shutil.copyfile(path, ctx.run_dir / "samples.png")

    return hook


def build_hooks(cfg: Config) -> tuple[Hook, ...]:
    """The periodic work of `minsnr train`. log.preview_every=0 turns off the periodic previews but not the
    final samples.png: a hook due every train.steps steps runs once, after the last step."""
    hooks = []
    if cfg.data.source != "latent" or optional(
        "diffusers", "no previews or samples.png (they decode latents with the SD-VAE)"
    ):
        hooks.append(Hook(cfg.log.preview_every or cfg.train.steps, make_preview_hook(cfg)))
    if cfg.log.eval_every > 0:
        from minsnr.evaluate.periodic import make_eval_hook

        hooks.append(Hook(cfg.log.eval_every, make_eval_hook(cfg)))
    if cfg.train.pareto_every > 0:
        from minsnr.pareto.monitor import make_pareto_hook

        hooks.append(Hook(cfg.train.pareto_every, make_pareto_hook(cfg)))
    return tuple(hooks)
