"""Checkpoints: atomic writes, strict loads, no pickle on load, EMA weights also as safetensors.

A checkpoint is a dict saved with torch.save and read back with torch.load(weights_only=True):
    model, ema, optimizer: state dicts; step: int; config: identity_config(Config); rng: {"torch", "numpy",
    "python"}; rng_ranks: each rank's {"torch", "cuda"} streams; data: Batches.state_dict(); class_names; version.
Writes go through minsnr.files.atomic_write (a fsynced temporary `.NAME.tmp`, renamed over the target), so
a kill -9 at any moment leaves the previous file intact (at worst with a stale temporary beside it, which
minsnr.resume removes at the next start). `latest.pt` is a hard link to the newest step. A write that
fails (disk full ...) raises minsnr.files.WriteError naming the file.
The stored config leaves run_dir empty: where a run lives is no part of what its weights are, so two
identical runs in different folders write identical ema.safetensors bytes.
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors
from torch import nn

from minsnr.config import Config, from_dict, to_dict
from minsnr.files import WriteError, atomic_write, fsync_dir, truncated_zip
from minsnr.models import build_model

VERSION = 1
EMA_EXPORT = "ema.safetensors"  # RUN_DIR/: the EMA weights for sharing (load_model, minsnr sample read it)
LOSS_WEIGHT_EXPORT = "loss_weight.safetensors"  # RUN_DIR/: a stateful weighting's state, keys "loss_weight.*"
STEP_FILE = re.compile(r"step_(\d{9})\.pt$")
REQUIRED = ("model", "ema", "optimizer", "step", "config", "rng", "rng_ranks", "data")  # what resume reads


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, *, mmap: bool = False) -> Any:
    """A checkpoint's contents, read without unpickling arbitrary objects (weights_only=True; `mmap`: the
    weights are mapped, not read). CheckpointError naming the file when it is missing or is not a checkpoint
    (a text file, a foreign pickle, a truncated file), and never the loader's advice to read it unsafely."""
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"checkpoint {p} is a folder, not a file")
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle's protocol before refusing it
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {p}: {err.strerror or err}") from None
    except Exception:  # a text file, a foreign pickle, a truncated file: torch's message would advise unsafe loading
        what = "a complete minsnr checkpoint (truncated or damaged)" if truncated_zip(p) else "a minsnr checkpoint"
        raise CheckpointError(f"cannot read checkpoint {p}: not {what}") from None


def read_step(path: Path) -> int:
    """The step a checkpoint holds, read through a memory map (the weights are not read); CheckpointError if the
    file is truncated, not weights-only, or not a minsnr training checkpoint."""
    state = load_checkpoint(path, mmap=True)
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a minsnr training checkpoint (no {', '.join(missing)})")
    return int(state["step"])


def step_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step_{step:09d}.pt"


def step_of(path: Path) -> int:
    """The step in a step file's name."""
    m = STEP_FILE.search(path.name)
    if m is None:
        raise ValueError(f"{path} is not named step_NNNNNNNNN.pt")
    return int(m.group(1))


def step_files(ckpt_dir: Path) -> list[Path]:
    """Step checkpoints, oldest first."""
    return sorted(p for p in ckpt_dir.glob("step_*.pt") if STEP_FILE.search(p.name))


def link_latest(ckpt_dir: Path, path: Path) -> None:
    """Atomically point checkpoints/latest.pt at `path` (hard link, no second copy on disk)."""
    tmp = ckpt_dir / ".latest.pt.tmp"
    try:
        tmp.unlink(missing_ok=True)
        os.link(path, tmp)
        os.replace(tmp, ckpt_dir / "latest.pt")
        fsync_dir(ckpt_dir)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WriteError(ckpt_dir / "latest.pt", err) from err


def identity_config(cfg: Config) -> dict[str, Any]:
    """The config as stored with weights: everything that defines them, not the folder they were written to."""
    return {**to_dict(cfg), "run_dir": ""}


def rng_state() -> dict[str, Any]:
    """The streams every rank shares: numpy, python, and rank 0's torch CPU stream (also in rng_ranks[0])."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved; each rank's own streams are `set_rank_rng_state`'s."""
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


# Each rank's own streams (what dropout draws from: the noise, timesteps and label drops of a step come from a
# generator seeded by (train.seed, step), minsnr.train): its torch CPU stream and, when it trains on CUDA, the
# stream of its one device. The checkpoint's rng_ranks holds them by rank, gathered from every rank at a save;
# a resume gives each rank its own back. A rank the checkpoint has no stream for (more ranks than it was
# written with; a CPU checkpoint resumed on CUDA) is re-seeded with train.seed + rank, as minsnr.run seeds a
# fresh run; the streams of ranks beyond the new world end. `rng_resume_note` says so in one line.


def rank_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's own streams: {"torch": CPU state, "cuda": the state of `device`, when it is a CUDA device}."""
    own = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(device)
    return own


def rank_rng_states(state: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """A checkpoint's rng_ranks as one {"torch", "cuda"} dict per rank. Checkpoints written before CUDA streams
    were kept per rank hold each rank's CPU state, and rng["cuda"]: rank 0's states of every device it saw, of
    which only device 0, its own, was rank 0's stream."""
    ranks = [dict(r) if isinstance(r, dict) else {"torch": r} for r in state["rng_ranks"]]
    legacy = state["rng"].get("cuda")
    if ranks and legacy and "cuda" not in ranks[0]:
        ranks[0]["cuda"] = legacy[0]
    return ranks


def set_rank_rng_state(state: dict[str, Any], rank: int, device: torch.device, seed: int) -> None:
    """Give `rank` (training on `device`) its own streams back from the checkpoint `state`; those it has no
    saved stream for are re-seeded with seed + rank."""
    ranks = rank_rng_states(state)
    own = ranks[rank] if rank < len(ranks) else {}
    if "torch" in own:
        torch.set_rng_state(own["torch"])
    else:
        torch.default_generator.manual_seed(seed + rank)  # the CPU stream only
    if device.type != "cuda":
        return
    if "cuda" in own:
        torch.cuda.set_rng_state(own["cuda"], device)
    else:
        torch.cuda.manual_seed_all(seed + rank)  # this process trains on `device` alone


def rng_resume_note(state: dict[str, Any], world: int, cuda: bool) -> str | None:
    """One line naming the ranks whose streams a resume on `world` ranks (on CUDA or not) cannot continue
    exactly; None when every rank's stream is continued."""
    ranks = rank_rng_states(state)
    fresh = [r for r in range(world) if r >= len(ranks) or (cuda and "cuda" not in ranks[r])]
    ended = list(range(world, len(ranks)))
    if not fresh and not ended:
        return None
    said = []
    if fresh:
        said.append(
            f"the RNG streams of rank(s) {_ranks(fresh)} cannot be continued and are re-seeded from train.seed + rank"
        )
    if ended:
        said.append(f"those of the checkpoint's rank(s) {_ranks(ended)} end here")
    return (
        f"note: the checkpoint was written by {len(ranks)} rank(s) and resumes on {world}{' (CUDA)' if cuda else ''}: "
        + "; ".join(said)
        + ". Only dropout draws from them: noise, timesteps, label drops and data order continue exactly"
    )


def _ranks(ranks: list[int]) -> str:
    """'1' / '2, 3' / '2-7' for a list of rank numbers."""
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ", ".join(map(str, ranks))


def strict_load(module: Any, state: dict[str, torch.Tensor], what: str) -> None:
    """module.load_state_dict(state, strict=True) (a module, or a minsnr.loss.TrainingLoss), or CheckpointError
    naming `what` and the first keys that do not fit."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        more = f"\n  ... and {len(lines) - 6} more" if len(lines) > 6 else ""
        raise CheckpointError(
            f"{what} does not fit the model {type(module).__name__}:\n  " + "\n  ".join(lines[:6]) + more
        ) from None


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, memoryview]:
    """The safetensors file as (header, data), with the JSON header's keys sorted: safetensors writes its
    metadata in hash order, which changes from process to process, and identical weights must give identical
    bytes. The header stays padded with spaces to a multiple of 8 bytes, as the format asks."""
    raw = safetensors.torch.save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header, memoryview(raw)[8 + n :]


def export_safetensors(
    path: str | Path, weights: dict[str, torch.Tensor], cfg: Config, step: int, class_names: Sequence[str] = ()
) -> None:
    """EMA weights for sharing: safetensors, with the run's identity config, step and the data's class
    names (label i is class_names[i]) as metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    meta = {
        "config": json.dumps(identity_config(cfg)),
        "format": "minsnr",
        "version": str(VERSION),
        "step": str(step),
        "class_names": json.dumps(list(class_names)),
    }
    header, data = _safetensors_bytes(tensors, meta)

    def write(f: BinaryIO) -> None:
        f.write(header)
        f.write(data)

    atomic_write(Path(path), write)


def export_step(path: Path) -> int | None:
    """The step an ema.safetensors export holds; None if it is missing, unreadable or has no step."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {})["step"])
    except Exception:  # missing, torn, or written before exports carried their step
        return None


def load_model(
    path: str | Path, *, ema: bool = True, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, Config]:
    """Model (EMA weights by default) and config from a .pt checkpoint or an exported .safetensors file."""
    p = Path(path)
    if p.suffix == ".safetensors":
        meta, weights = _read_export(p)
        if "config" not in meta:
            raise CheckpointError(f"{p} is not a minsnr export (no config in its metadata)")
        cfg = from_dict(json.loads(meta["config"]))
    else:
        ckpt = load_checkpoint(p)
        if not isinstance(ckpt, dict) or "config" not in ckpt:
            raise CheckpointError(f"{p} is not a minsnr checkpoint (no 'config' key)")
        cfg = from_dict(ckpt["config"])
        key = "ema" if ema and "ema" in ckpt else "model"
        weights = ckpt[key]
    model = build_model(cfg.model)
    strict_load(model, weights, f"{p}")
    return model.to(map_location).eval(), cfg


def _read_export(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a .safetensors file; CheckpointError naming it when it is missing or is not one."""
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return meta, load_safetensors(str(path))
    except Exception:  # safetensors' own error type: a text file, a pickle, a truncated file
        raise CheckpointError(f"cannot read {path}: not a complete .safetensors file") from None
