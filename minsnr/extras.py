"""Optional dependencies (the extras in pyproject.toml): import one, or say in one line which extra
installs it. `require` is for uses that cannot go on without the package (an error), `optional` for
those that can (one warning, then the caller goes on without it)."""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

logger = logging.getLogger(__name__)

# module -> (pip package, minsnr extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "matplotlib": ("matplotlib", "plots"),
    "torch.utils.tensorboard": ("tensorboard", "tensorboard"),
    "torch_fidelity": ("torch-fidelity", "fid"),
    "diffusers": ("diffusers", "latent"),
    "submitit": ("submitit", "slurm"),
}


class MissingExtra(ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def install_hint(module: str) -> str:
    package, extra = EXTRAS[module]
    return f"{package} not installed: pip install 'minsnr[{extra}]'"


def require(module: str, needed_for: str) -> ModuleType:
    """The module, or MissingExtra('PACKAGE not installed: pip install 'minsnr[EXTRA]' (needed for ...)')."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtra(f"{install_hint(module)} (needed for {needed_for})") from err


def optional(module: str, without: str) -> ModuleType | None:
    """The module, or None after one warning 'PACKAGE not installed: pip install ...; WITHOUT'."""
    try:
        return importlib.import_module(module)
    except ImportError:
        logger.warning("%s; %s", install_hint(module), without)
        return None
