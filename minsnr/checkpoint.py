"""Checkpoints: atomic writes, strict loads, no pickle on load, EMA weights also as safetensors.

A checkpoint is a dict saved with torch.save and read back with torch.load(weights_only=True):
    model, ema, optimizer: state dicts; step: int; config: minsnr.config.to_dict(Config);
    rng: {"torch", "cuda", "numpy", "python"}; data: Batches.state_dict(); class_names; version.
Writes go to a temporary file in the same folder, are fsynced, then renamed over the target, so a
kill -9 at any moment leaves the previous file intact. `latest.pt` is a hard link to the newest step.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, BinaryIO

import numpy as np
import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn

from minsnr.config import Config, from_dict
from minsnr.models import build_model

VERSION = 1
STEP_FILE = re.compile(r"step_(\d{9})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise CheckpointError(f"could not write {path}: {err} (disk full?); the previous checkpoint is intact") from err
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    _atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint without unpickling arbitrary objects (weights_only=True)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, foreign pickle, ...
        raise CheckpointError(f"cannot read checkpoint {p}: {type(err).__name__}: {str(err)[:300]}") from err


def step_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step_{step:09d}.pt"


def step_files(ckpt_dir: Path) -> list[Path]:
    """Step checkpoints, oldest first."""
    return sorted(p for p in ckpt_dir.glob("step_*.pt") if STEP_FILE.search(p.name))


def link_latest(ckpt_dir: Path, path: Path) -> None:
    """Atomically point checkpoints/latest.pt at `path` (hard link, no second copy on disk)."""
    tmp = ckpt_dir / f".latest.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.link(path, tmp)
    os.replace(tmp, ckpt_dir / "latest.pt")


def prune(ckpt_dir: Path, keep: int) -> None:
    for old in step_files(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)


def find_resumable(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads: latest.pt, else step files newest first."""
    for p in [ckpt_dir / "latest.pt", *reversed(step_files(ckpt_dir))]:
        if p.is_file():
            try:
                return p, load_checkpoint(p)
            except CheckpointError:
                continue
    return None


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


def strict_load(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        more = f"\n  ... and {len(lines) - 6} more" if len(lines) > 6 else ""
        raise CheckpointError(f"{what} does not fit the model {type(module).__name__}:\n  "
                              + "\n  ".join(lines[:6]) + more) from None


def export_safetensors(path: str | Path, weights: dict[str, torch.Tensor], cfg: Config) -> None:
    """EMA weights for sharing: safetensors, with the run's config as JSON metadata."""
    from minsnr.config import to_dict

    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    meta = {"config": json.dumps(to_dict(cfg)), "format": "minsnr", "version": str(VERSION)}
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    save_safetensors(tensors, str(tmp), metadata=meta)
    os.replace(tmp, p)


def load_model(path: str | Path, *, ema: bool = True, map_location: str | torch.device = "cpu") -> tuple[nn.Module, Config]:
    """Model (EMA weights by default) and config from a .pt checkpoint or an exported .safetensors file."""
    p = Path(path)
    if p.suffix == ".safetensors":
        if not p.is_file():
            raise CheckpointError(f"weights file not found: {p}")
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise CheckpointError(f"{p} has no minsnr config in its metadata")
        cfg = from_dict(json.loads(meta["config"]))
        weights = load_safetensors(str(p))
    else:
        ckpt = load_checkpoint(p)
        if "config" not in ckpt:
            raise CheckpointError(f"{p} is not a minsnr checkpoint (no 'config' key)")
        cfg = from_dict(ckpt["config"])
        key = "ema" if ema and "ema" in ckpt else "model"
        weights = ckpt[key]
    model = build_model(cfg.model)
    strict_load(model, weights, f"{p}")
    return model.to(map_location).eval(), cfg
