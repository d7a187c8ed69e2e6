"""Min-SNR-gamma (and every other minsnr weighting) for a diffusers training loop, in one line:

    weight = loss_weight(noise_scheduler, timesteps, "min_snr", gamma=5.0)
    loss = (weight * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()

The scheduler's own `config.prediction_type` picks the space the weight applies in (appendix B): epsilon
-> min(SNR, gamma)/SNR, v_prediction -> min(SNR, gamma)/(SNR + 1), sample -> min(SNR, gamma). The formulas
live in minsnr.weighting alone; this module only reads the scheduler (`alphas_cumprod`, `config`), so it
imports no diffusers and works with any object shaped like a DDPM-style scheduler.

Why not diffusers' own recipe: its example scripts built the v weight wrongly for a long time (the eps
formula, then min(SNR + 1, gamma)/(SNR + 1)) and divide 0 by 0 at the last timestep under
`rescale_betas_zero_snr=True`; here SNR = 0 gives the documented finite value (docs/math.md, "Limits" in
minsnr.weighting): 1 for epsilon (its true limit), 1e-10 for v_prediction and sample.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from minsnr.registry import check, lookup
from minsnr.weighting import ADAPTIVE, DEFAULT_WEIGHTING, STRATEGIES, check_parameter
from minsnr.weighting import loss_weight as target_space_weight

# diffusers' prediction_type -> minsnr's target (the space the loss is measured in, appendix B)
PREDICTION_TYPES: dict[str, str] = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _alphas_cumprod(scheduler: object) -> Tensor:
    """The scheduler's alpha-bar_t as float64 on the CPU (float64 is not available on every device, e.g. MPS;
    the table is T numbers, so computing it on the CPU costs microseconds)."""
    table = getattr(scheduler, "alphas_cumprod", None)
    if table is None:
        raise ValueError(
            f"{type(scheduler).__name__} has no alphas_cumprod: loss_weight needs a variance-preserving "
            "(DDPM-style) scheduler such as DDPMScheduler or DDIMScheduler"
        )
    a = torch.as_tensor(table).detach().to("cpu", torch.float64)
    if a.ndim != 1 or len(a) == 0 or not bool(((a >= 0) & (a <= 1)).all()):
        raise ValueError(f"{type(scheduler).__name__}.alphas_cumprod must be a non-empty 1-D table in [0, 1]")
    return a


def _target(scheduler: object) -> str:
    """minsnr's target for the scheduler's config.prediction_type (a diffusers FrozenDict or any mapping)."""
    config = getattr(scheduler, "config", None)
    kind = config.get("prediction_type") if isinstance(config, Mapping) else getattr(config, "prediction_type", None)
    check(kind, PREDICTION_TYPES, f"{type(scheduler).__name__}.config.prediction_type")
    return PREDICTION_TYPES[kind]


def _timesteps(timesteps: Tensor | int | list[int], steps: int) -> Tensor:
    """Integer timesteps in [0, steps); ValueError otherwise. The range check reads two numbers back from the
    device (one host sync): an index past the table would otherwise be a device-side assert on CUDA."""
    t = torch.as_tensor(timesteps)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"timesteps must be integers (got {t.dtype}); diffusers draws them with torch.randint")
    if t.numel():
        low, high = (int(v) for v in torch.aminmax(t))
        if low < 0 or high >= steps:
            bad = low if low < 0 else high
            raise ValueError(f"timestep {bad} is outside [0, {steps}): the scheduler has {steps} timesteps")
    return t


def _strategy(name: str, gamma: float | None) -> str:
    """The STRATEGIES name, after checking gamma with minsnr.weighting's own rules (a parameterless weighting
    refuses any gamma; gamma None means the weighting's default)."""
    if name in ADAPTIVE:
        raise ValueError(
            f"weighting {name!r} has no fixed weight per timestep (its state is trained with the model, "
            f"minsnr.adaptive); choose one of: {', '.join(STRATEGIES)}"
        )
    lookup(STRATEGIES, name, "weighting")
    if gamma is not None:
        check_parameter(name, gamma)
    return name


def loss_weight(
    scheduler: object,
    timesteps: Tensor | int | list[int],
    weighting: str = DEFAULT_WEIGHTING,
    gamma: float | None = None,
) -> Tensor:
    """Per-sample weight on the MSE of the scheduler's prediction_type, float32 on the timesteps' device,
    shaped like timesteps.

    weighting: any fixed strategy of minsnr.weighting.STRATEGIES (default min_snr); gamma: its one
    parameter (gamma, b or sigma_data), None for its default (5 for min_snr). Computed from
    scheduler.alphas_cumprod in float64 (never in the model's half precision, where SNR underflows) and
    finite for every timestep, SNR = 0 included."""
    a = _alphas_cumprod(scheduler)  # first: a flow-matching scheduler has no prediction_type either
    target = _target(scheduler)
    name = _strategy(weighting, gamma)
    t = _timesteps(timesteps, len(a))
    # One weight per timestep of the schedule, then a lookup: the timesteps stay on their device.
    table = target_space_weight(a / (1 - a), name, gamma, target)  # appendix B conversion; SNR = 0 clamped
    return table.to(device=t.device, dtype=torch.float32)[t]
