"""Backbones by name: the paper's vanilla ViTs (table 6), the ADM UNet (appendix C.1), and a diffusers
UNet2DModel (`diffusers_unet2d`, for runs to export to diffusers; diffusers is imported only when one is built).

model = create_model("vit_b", input_size=32, in_channels=4, num_classes=1000, patch_size=2)
x0_hat = model(x_t, t, labels)  # x_t [B, C, H, W], t [B] in [0, T): int64 in training, fractional float when sampling, labels long [B] or None
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Protocol

from torch import nn

from minsnr.models.diffusers_unet2d import SMALL, DiffusersUNet2D
from minsnr.models.unet import UNet
from minsnr.models.vit import ViT
from minsnr.registry import lookup

# name -> (class, preset arguments); `create_model(..., **args)` may override any preset argument.
MODELS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "vit_tiny": (ViT, dict(depth=4, width=64, num_heads=4)),  # CPU tests and the quickstart (8x8 digits)
    # table 6 says 6 heads for ViT-S, which does not divide 512; 8 heads as U-ViT-Small.
    "vit_s": (ViT, dict(depth=13, width=512, num_heads=8)),
    "vit_b": (ViT, dict(depth=12, width=768, num_heads=12)),
    "vit_l": (ViT, dict(depth=21, width=1024, num_heads=16)),
    "vit_xl": (ViT, dict(depth=28, width=1152, num_heads=16)),
    # appendix C.1 ablation UNet on 32x32x4 latents
    "unet_adm_ablation": (
        UNet,
        dict(
            base_channels=192, channel_mult=(1, 2, 2, 2), num_res_blocks=3, attention_resolutions=(16, 8), num_heads=4
        ),
    ),
    "unet_tiny": (
        UNet,
        dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_heads=2),
    ),  # CPU tests, 8x8 inputs
    "diffusers_unet2d": (DiffusersUNet2D, SMALL),  # diffusers.UNet2DModel (minsnr[latent]); 8x8 inputs and up
}


def create_model(name: str, *, input_size: int, in_channels: int, num_classes: int, **args: Any) -> nn.Module:
    """Build the named backbone; `args` override its preset (e.g. patch_size, dropout, grad_checkpointing)."""
    cls, preset = lookup(MODELS, name, "model.name")
    valid = [p for p in inspect.signature(cls).parameters if p not in ("input_size", "in_channels", "num_classes")]
    bad = sorted(set(args) - set(valid))
    if bad:
        raise ValueError(f"model {name!r} has no argument(s) {bad}; valid arguments: {', '.join(valid)}")
    return cls(input_size=input_size, in_channels=in_channels, num_classes=num_classes, **{**preset, **args})


def resolved_args(name: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """The preset of `name` overridden by `args` (tuples as lists): every architecture argument, so a run's
    config and checkpoints stay loadable if a preset changes later."""
    preset = lookup(MODELS, name, "model.name")[1]
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in preset.items()}, **args}


class ModelSpec(Protocol):
    """What `build_model` reads: the `model` section of a run's config."""

    name: str
    input_size: int
    in_channels: int
    num_classes: int
    args: dict[str, Any]


def build_model(spec: ModelSpec) -> nn.Module:
    """The backbone a config's `model` section describes."""
    return create_model(
        spec.name, input_size=spec.input_size, in_channels=spec.in_channels, num_classes=spec.num_classes, **spec.args
    )
