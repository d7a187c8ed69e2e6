"""The exponential moving average of the weights that the paper samples from (section 4.1, EMA 0.9999)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` in eval mode, to be updated by `update_ema`."""
    return copy.deepcopy(model).requires_grad_(False).eval()


def ema_decay(decay: float, warmup: bool, step: int) -> float:
    """The decay after `step` optimiser steps: `decay`, or with warm-up min(decay, (1 + step) / (10 + step))."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters (one foreach kernel); buffers copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    for eb, b in zip(ema.buffers(), model.buffers()):
        eb.copy_(b)
