"""Pieces shared by the backbones: the class labels, sinusoidal timestep features, the timestep MLP, self-attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def labels_or_null(labels: torch.Tensor | None, num_classes: int, x: torch.Tensor) -> torch.Tensor:
    """`labels`, or the null label for x's whole batch when None: index num_classes, the extra row of every
    backbone's class table (classifier-free guidance drops labels to it)."""
    if labels is not None:
        return labels
    return torch.full((x.shape[0],), num_classes, dtype=torch.long, device=x.device)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [B, dim] of (possibly fractional) timesteps t [B], computed in float32.

    Half cosines, half sines over geometrically spaced frequencies 1 .. 1/max_period (ADM, DiT).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2*half]
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepMLP(nn.Module):
    """t [B] -> sinusoidal features [B, freq_dim] -> Linear -> SiLU -> Linear -> [B, out_dim]."""

    def __init__(self, freq_dim: int, out_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


class Attention(nn.Module):
    """Multi-head self-attention over tokens [B, N, D] through scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)  # [B, N, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, Dh]
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(Dh)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # [B, N, D]
