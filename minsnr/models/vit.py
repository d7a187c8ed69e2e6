"""The paper's vanilla ViT denoiser (section 4.1, appendix C.1, table 6).

The timestep and the class enter as two extra input tokens ("we incorporate the timestep t and class
condition c as learnable input tokens", section 4.1); everything else is a plain pre-norm ViT. The two
extra tokens are dropped before the head, which maps each patch token back to its p x p x C pixels.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minsnr.models.layers import Attention, TimestepMLP, labels_or_null

TIME_FREQ_DIM = 256  # sinusoidal features of t fed to the time-token MLP (as DiT)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)); tokens [B, N, D]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """(x [B, C, H, W], t [B] float, labels [B] long | None) -> prediction [B, C, H, W].

    num_classes = 0 makes the model unconditional (no class token, labels ignored). Otherwise the class
    table has num_classes + 1 rows; row num_classes is the null label of classifier-free guidance, and
    labels=None means the null label for the whole batch.
    """

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        num_classes: int,
        depth: int,
        width: int,
        num_heads: int,
        patch_size: int = 2,
        mlp_ratio: float = 4.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if patch_size < 1 or input_size % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide input_size={input_size}")
        if num_classes < 0:
            raise ValueError(f"num_classes={num_classes} must be >= 0 (0: unconditional)")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.grid = input_size // patch_size
        self.grad_checkpointing = grad_checkpointing
        self.num_extra = 2 if num_classes > 0 else 1  # time token (+ class token)

        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.time_embed = TimestepMLP(TIME_FREQ_DIM, width)
        self.class_embed = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_extra + self.grid**2, width))
        self.blocks = nn.ModuleList([Block(width, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch_size * patch_size * in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer on flattened patches
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        nn.init.zeros_(self.head.weight)  # zero-init output: the model starts by predicting 0 (DiT)
        nn.init.zeros_(self.head.bias)

    def unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        """[B, L, p*p*C] -> [B, C, g*p, g*p] with L = g*g."""
        b, g, p, c = h.shape[0], self.grid, self.patch_size, self.in_channels
        h = h.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # [B, C, g, p, g, p]
        return h.reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        tokens = [self.time_embed(t)[:, None]]  # [B, 1, D]
        if self.class_embed is not None:
            tokens.append(self.class_embed(labels_or_null(labels, self.num_classes, x))[:, None])  # [B, 1, D]
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, L, D], L = (H/p)(W/p)
        h = torch.cat([*tokens, patches], dim=1) + self.pos_embed  # [B, num_extra + L, D]
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                h = checkpoint(block, h, use_reentrant=False)
            else:
                h = block(h)
        h = self.head(self.norm(h[:, self.num_extra :]))  # drop time/class tokens: [B, L, p*p*C]
        return self.unpatchify(h)
