"""`minsnr train CONFIG.yaml [key=value ...]`: load and check the config, wire the periodic hooks
(EMA preview grid, optional fid_cls evaluation and Pareto monitor), train, say where everything went.
The hooks live in higher layers (evaluate, pareto), so they are assembled here and not in train."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from minsnr.checkpoint import CheckpointError
from minsnr.config import Config, ConfigError, load_config
from minsnr.data import BadImagesError
from minsnr.train import Hook, HookContext, NonFiniteLoss, train


@functools.lru_cache(maxsize=1)
def _vae(name: str, device: str) -> torch.nn.Module:
    """Load the VAE once per run, not at every preview."""
    from minsnr.data.latent import load_vae

    return load_vae(name, device)


def preview_images(ctx: HookContext) -> tuple[torch.Tensor, int]:
    """EMA samples at a fixed seed: one row per class (first 10 classes) or an 8x8 grid; images in [-1, 1]."""
    from minsnr.sampling import generate

    cfg, m = ctx.cfg, ctx.cfg.model
    cols = 8
    labels = None
    rows = 8
    if m.num_classes > 0:
        rows = min(m.num_classes, 10)
        labels = torch.arange(rows, device=ctx.device).repeat_interleave(cols)
    gen = torch.Generator(device=ctx.device).manual_seed(cfg.train.seed)
    x = generate(ctx.ema, ctx.schedule, cfg.loss.target, labels, shape=(rows * cols, m.in_channels, m.input_size, m.input_size),
                 sampler=cfg.sample.sampler, steps=cfg.sample.steps, cfg_scale=cfg.sample.cfg_scale,
                 num_classes=m.num_classes, generator=gen, sigma_max=cfg.sample.sigma_max, device=ctx.device)
    if cfg.data.source == "latent":
        from minsnr.data.latent import decode_latents, read_meta

        meta = read_meta(cfg.data.path)  # type: ignore[arg-type]
        x = decode_latents(_vae(meta["vae"], str(ctx.device)), x, meta["scale_factor"])
    return x, cols


def preview_hook(ctx: HookContext) -> None:
    from minsnr.evaluate.grid import save_grid

    x, cols = preview_images(ctx)
    path = ctx.run_dir / "previews" / f"step_{ctx.step:09d}.png"
    save_grid(x, path, nrow=cols, min_width=320)
    shutil.copyfile(path, ctx.run_dir / "samples.png")


def build_hooks(cfg: Config) -> tuple[Hook, ...]:
    hooks = []
    if cfg.log.preview_every > 0:
        hooks.append(Hook(cfg.log.preview_every, preview_hook))
    if cfg.log.eval_every > 0:
        from minsnr.evaluate.periodic import make_eval_hook

        hooks.append(Hook(cfg.log.eval_every, make_eval_hook(cfg)))
    if cfg.train.pareto_every > 0:
        from minsnr.pareto.monitor import make_pareto_hook

        hooks.append(Hook(cfg.train.pareto_every, make_pareto_hook(cfg)))
    return tuple(hooks)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="minsnr train", description="Train a diffusion model.",
                                     epilog="Overrides are dotted keys, e.g. loss.weighting=min_snr train.steps=1000; "
                                            "see README.md for every key.")
    parser.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, build_hooks(cfg))
    except (ConfigError, CheckpointError, NonFiniteLoss, BadImagesError, FileNotFoundError, ValueError) as err:
        print(f"minsnr train: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    finally:
        if dist.is_initialized():  # a clean stop on every rank, also when one rank failed alone
            dist.destroy_process_group()
    run = Path(result["run_dir"])
    if os.environ.get("RANK", "0") == "0":  # torchrun sets RANK; print once
        print(f"\ntrained to step {result['step']}; outputs in {run}/:")
        for name, what in [("samples.png", "latest EMA sample grid"), ("checkpoints/latest.pt", "checkpoint (resume=auto)"),
                           ("ema.safetensors", "EMA weights"), ("metrics.jsonl", "metrics"),
                           ("config.yaml", "resolved config"), ("tensorboard", "tensorboard --logdir " + str(run / "tensorboard"))]:
            if (run / name).exists():
                print(f"  {run / name}: {what}")
    return 0
