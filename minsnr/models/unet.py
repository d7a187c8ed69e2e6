"""The ADM UNet (Dhariwal & Nichol 2021) as the paper uses it (section 4.1, appendix C.1).

Residual blocks whose second GroupNorm is scaled and shifted by the embedding of (t, class), self-attention
at chosen feature-map sizes, down/up-sampling inside residual blocks, skip connections between the two
halves. Defaults are the paper's ablation setting: base 192, multipliers 1,2,2,2, 3 blocks per resolution,
attention at 16 and 8, 4 heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minsnr.models.layers import Attention, TimestepMLP, labels_or_null

GROUPS = 32  # GroupNorm groups, as ADM


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """x [B, Cin, S, S], emb [B, E] -> [B, Cout, S', S'] with S' = 2S (up), S/2 (down) or S.

    h = conv(resample(SiLU(GN(x)))); h = GN(h) * (1 + scale) + shift with (scale, shift) = Linear(SiLU(emb));
    h = conv(dropout(SiLU(h))) (zero-init); out = skip(resample(x)) + h.
    """

    def __init__(self, in_ch: int, emb_dim: int, out_ch: int, dropout: float, resample: str = "none") -> None:
        super().__init__()
        self.in_norm = nn.GroupNorm(GROUPS, in_ch)
        self.resample = {
            "none": nn.Identity(),
            "up": nn.Upsample(scale_factor=2, mode="nearest"),
            "down": nn.AvgPool2d(2),
        }[resample]
        self.in_conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.out_norm = nn.GroupNorm(GROUPS, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_conv(self.resample(F.silu(self.in_norm(x))))  # [B, Cout, S', S']
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # each [B, Cout, 1, 1]
        h = self.out_norm(h) * (1 + scale) + shift
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(self.resample(x)) + h


class AttentionBlock(nn.Module):
    """x [B, C, S, S] -> x + Attn(GN(x)) over the S*S positions; output projection zero-init."""

    def __init__(self, ch: int, num_heads: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(GROUPS, ch)
        self.attn = Attention(ch, num_heads)
        _zero(self.attn.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, s, _ = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, S*S, C]
        return x + self.attn(tokens).transpose(1, 2).reshape(b, c, s, s)


class EmbedSequential(nn.ModuleList):
    """Runs its layers in order, giving the embedding to the residual blocks."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """(x [B, C, H, W], t [B] float, labels [B] long | None) -> prediction [B, C, H, W].

    attention_resolutions are feature-map side lengths (e.g. 16 and 8 on a 32x32 input). num_classes = 0
    makes the model unconditional; otherwise the class table has num_classes + 1 rows, the last being the
    null label of classifier-free guidance (labels=None means the null label).
    """

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        num_classes: int,
        base_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 3,
        attention_resolutions: Sequence[int] = (16, 8),
        num_heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        levels = len(channel_mult)
        if levels < 1 or input_size % 2 ** (levels - 1):
            raise ValueError(
                f"input_size={input_size} must be divisible by 2**(len(channel_mult) - 1) = "
                f"{2 ** (levels - 1)} (channel_mult={list(channel_mult)})"
            )
        sizes = [input_size // 2**i for i in range(levels)]
        bad = sorted(set(attention_resolutions) - set(sizes))
        if bad:
            raise ValueError(f"attention_resolutions {bad} are not feature-map sizes of this UNet; valid: {sizes}")
        widths = [base_channels * m for m in channel_mult]
        if any(w % GROUPS for w in widths):
            raise ValueError(f"channel widths {widths} must be multiples of {GROUPS} (GroupNorm groups)")
        if num_classes < 0:
            raise ValueError(f"num_classes={num_classes} must be >= 0 (0: unconditional)")
        self.num_classes = num_classes
        emb_dim = 4 * base_channels
        self.time_embed = TimestepMLP(base_channels, emb_dim)
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

        def block(in_ch: int, out_ch: int, size: int) -> list[nn.Module]:
            layers: list[nn.Module] = [ResBlock(in_ch, emb_dim, out_ch, dropout)]
            if size in attention_resolutions:
                layers.append(AttentionBlock(out_ch, num_heads))
            return layers

        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch = [base_channels], base_channels  # channels of each saved skip activation
        for level, (width, size) in enumerate(zip(widths, sizes)):
            for _ in range(num_res_blocks):
                self.down.append(EmbedSequential(block(ch, width, size)))
                ch = width
                skips.append(ch)
            if level < levels - 1:
                self.down.append(EmbedSequential([ResBlock(ch, emb_dim, ch, dropout, "down")]))
                skips.append(ch)
        self.middle = EmbedSequential(
            [ResBlock(ch, emb_dim, ch, dropout), AttentionBlock(ch, num_heads), ResBlock(ch, emb_dim, ch, dropout)]
        )
        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            for i in range(num_res_blocks + 1):
                layers = block(ch + skips.pop(), widths[level], sizes[level])
                ch = widths[level]
                if level > 0 and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb_dim, ch, dropout, "up"))
                self.up.append(EmbedSequential(layers))
        self.out_norm = nn.GroupNorm(GROUPS, ch)
        self.out_conv = _zero(nn.Conv2d(ch, in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(t)  # [B, E]
        if self.class_embed is not None:
            emb = emb + self.class_embed(labels_or_null(labels, self.num_classes, x))
        h = self.input_conv(x)  # [B, base, H, W]
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        h = self.middle(h, emb)  # [B, C_last, H / 2^(levels-1), ...]
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(h)))  # [B, C, H, W]
