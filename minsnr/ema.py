"""The exponential moving average of the weights that the paper samples from (section 4.1, EMA 0.9999)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def ema_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` in eval mode, to be updated by `update_ema`."""
    return copy.deepcopy(model).requires_grad_(False).eval()


def ema_decay(decay: float, warmup: bool, step: int) -> float:
    """The decay after `step` optimiser steps: `decay`, or with warm-up min(decay, (1 + step) / (10 + step))."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, weight: Tensor) -> None:
    """ema <- ema + weight * (model - ema) for parameters, weight = 1 - decay a 0-dim tensor on their device
    (three foreach kernels that read the weight on the device, so a captured step sees it change); buffers copied."""
    e, m = list(ema.parameters()), list(model.parameters())
    delta = torch._foreach_sub(m, e)
    torch._foreach_mul_(delta, weight)
    torch._foreach_add_(e, delta)
    for eb, b in zip(ema.buffers(), model.buffers()):
        eb.copy_(b)
