"""minsnr: fast diffusion training with the Min-SNR-gamma loss weighting (Hang et al., 2023).

The library in one loop (README.md, "Use Min-SNR in your own training loop"):

    schedule = minsnr.make_schedule("cosine", 1000)
    out = minsnr.diffusion_loss(model, x0, labels, schedule, target="x0", weighting="min_snr", gamma=5.0)
    out.loss.backward()
    images = minsnr.generate(model, schedule, "x0", labels, shape=x0.shape, num_classes=10)

Every name below is imported on first use (PEP 562), so `import minsnr` and `minsnr --help` stay fast
and do not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "make_schedule": "minsnr.schedule",
    "Schedule": "minsnr.schedule",
    "loss_weight": "minsnr.weighting",
    "x0_weight": "minsnr.weighting",
    "diffusion_loss": "minsnr.loss",
    "TrainingLoss": "minsnr.loss",
    "q_sample": "minsnr.objective",
    "predict_x0": "minsnr.objective",
    "predict_eps": "minsnr.objective",
    "convert": "minsnr.objective",
    "drop_labels": "minsnr.objective",
    "karras_sigmas": "minsnr.sampling",
    "sample_heun": "minsnr.sampling",
    "sample_euler": "minsnr.sampling",
    "sample_ddim": "minsnr.sampling",
    "generate": "minsnr.sampling",
    "VPDenoiser": "minsnr.sampling",
    "CFGDenoiser": "minsnr.sampling",
    "create_model": "minsnr.models",
    "MODELS": "minsnr.models",
    "load_model": "minsnr.checkpoint",
    "load_config": "minsnr.config",
    "Config": "minsnr.config",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time `__getattr__` imports on demand
    from minsnr.checkpoint import load_model
    from minsnr.config import Config, load_config
    from minsnr.loss import TrainingLoss, diffusion_loss
    from minsnr.models import MODELS, create_model
    from minsnr.objective import convert, drop_labels, predict_eps, predict_x0, q_sample
    from minsnr.sampling import CFGDenoiser, VPDenoiser, generate, karras_sigmas, sample_ddim, sample_euler, sample_heun
    from minsnr.schedule import Schedule, make_schedule
    from minsnr.weighting import loss_weight, x0_weight


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'minsnr' has no attribute {name!r}; public names: {', '.join(__all__)}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
