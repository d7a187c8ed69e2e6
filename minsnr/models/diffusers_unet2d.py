"""A diffusers `UNet2DModel` behind minsnr's model interface, so a run trains a network that diffusers'
pipelines load as they are (`minsnr export RUN --to diffusers OUT/`).

The adapter only translates: input_size -> sample_size, in_channels -> in_channels and out_channels, the
class label -> UNet2DModel's class embedding (num_class_embeds = num_classes + 1: the last row is the null
label of classifier-free guidance, as in minsnr.models.vit), and `.sample` out. Weights are initialised as
diffusers does (no zero-initialised output layer). The timestep enters through diffusers' sinusoidal
embedding, which takes fractional timesteps, so minsnr's samplers can call it between integer steps.
diffusers is imported when the model is built (the `latent` extra), never when minsnr.models is imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from minsnr.extras import require
from minsnr.models.layers import labels_or_null

# The preset of "diffusers_unet2d" in minsnr.models.MODELS: two levels (8x8 -> 4x4 on the digits), attention
# at the lower one and in the middle block; about 0.7M parameters with one input channel.
SMALL: dict[str, Any] = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8,
    norm_num_groups=8,
)


class DiffusersUNet2D(nn.Module):
    """(x [B, C, H, W], t [B] int or float, labels [B] long | None) -> prediction [B, C, H, W].

    num_classes = 0 makes the model unconditional (no class embedding, labels ignored); otherwise labels=None
    means the null label (index num_classes) for the whole batch. The other arguments are UNet2DModel's.
    """

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        num_classes: int,
        block_out_channels: Sequence[int],
        layers_per_block: int,
        down_block_types: Sequence[str],
        up_block_types: Sequence[str],
        attention_head_dim: int,
        norm_num_groups: int,
        dropout: float = 0.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes={num_classes} must be >= 0 (0: unconditional)")
        levels = len(block_out_channels)
        if levels < 1 or input_size % 2 ** (levels - 1):
            raise ValueError(
                f"input_size={input_size} must be divisible by 2**(len(block_out_channels) - 1) = {2 ** (levels - 1)}"
                f" (block_out_channels={list(block_out_channels)})"
            )
        if any(c % norm_num_groups for c in block_out_channels):
            raise ValueError(
                f"block_out_channels={list(block_out_channels)} must be multiples of norm_num_groups={norm_num_groups}"
            )
        if not len(down_block_types) == len(up_block_types) == levels:
            raise ValueError(
                f"down_block_types ({len(down_block_types)}), up_block_types ({len(up_block_types)}) and "
                f"block_out_channels ({levels}) must have the same length"
            )
        diffusers = require("diffusers", "model.name=diffusers_unet2d")
        self.num_classes = num_classes
        self.unet = diffusers.UNet2DModel(
            sample_size=input_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            dropout=dropout,
            num_class_embeds=num_classes + 1 if num_classes > 0 else None,
        )
        if grad_checkpointing:
            self.unet.enable_gradient_checkpointing()

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        # UNet2DModel refuses labels without a class embedding: an unconditional model ignores them
        labels = labels_or_null(labels, self.num_classes, x) if self.num_classes > 0 else None
        return self.unet(x, t, class_labels=labels).sample
