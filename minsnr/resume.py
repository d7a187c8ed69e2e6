"""Resume and save for the training loop: which checkpoint a run continues from, what a checkpoint holds,
and how a save puts it in place, so that a kill at any moment loses no finished checkpoint, and nothing it
leaves behind is used, ignored or deleted without a line saying so.

At start-up a run continues from the newest checkpoint that reads (by step, latest.pt and step files alike);
each unreadable one is named with the reason, and when checkpoints exist but none reads the run refuses and
deletes nothing. Then the temporaries of killed saves are removed, and latest.pt and the EMA export, when missing or
behind the checkpoint, are brought up to it. A save writes the step file, points latest.pt at it, exports the EMA weights with
their step, and only then prunes the checkpoints that the new, re-read one supersedes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

import minsnr.checkpoint as ck
from minsnr.config import Config, ConfigError
from minsnr.loss import TrainingLoss

Say = Callable[[str], None]


@dataclass
class Found:
    path: Path
    state: dict[str, Any]


def _check_state(path: Path, state: Any, step: int | None) -> None:
    missing = [k for k in ck.REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise ck.CheckpointError(f"{path} is not a minsnr training checkpoint (no {', '.join(missing)})")
    if step is not None and int(state["step"]) != step:
        raise ck.CheckpointError(f"{path} holds step {int(state['step'])}, not the step {step} of its name")


def _unreadable(path: Path, step: int | None) -> str | None:
    """Why the checkpoint's header does not read or holds another step than its name; None when it is fine."""
    try:
        got = ck.read_step(path)
    except ck.CheckpointError as err:
        return str(err)
    return None if step is None or got == step else f"{path} holds step {got}, not the step {step} of its name"


def _candidates(ckpt_dir: Path, skipped: list[tuple[Path, str]]) -> list[tuple[int, Path]]:
    """Every checkpoint of the folder as (step, path), newest first. Step files are dated by their name;
    latest.pt, usually a hard link to one of them, only when it is a file of its own (its step read from it)."""
    found = [(ck.step_of(p), p) for p in ck.step_files(ckpt_dir)]
    latest = ckpt_dir / "latest.pt"
    if latest.is_file() and not any(latest.samefile(p) for _, p in found):
        try:
            found.append((ck.read_step(latest), latest))
        except ck.CheckpointError as err:
            skipped.append((latest, str(err)))
    return sorted(found, key=lambda c: (c[0], c[1].name != "latest.pt"), reverse=True)


def newest_checkpoint(ckpt_dir: Path, say: Say) -> Found | None:
    """The newest checkpoint that loads completely. Each newer one that does not is named in a warning with
    the reason; when there are checkpoints and none loads: CheckpointError (nothing is deleted)."""
    skipped: list[tuple[Path, str]] = []
    found, older = None, []
    candidates = _candidates(ckpt_dir, skipped)
    for i, (step, path) in enumerate(candidates):
        try:
            state = ck.load_checkpoint(path)
            _check_state(path, state, None if path.name == "latest.pt" else step)
        except ck.CheckpointError as err:
            skipped.append((path, str(err)))
            continue
        found, older = Found(path, state), candidates[i + 1 :]
        break
    if found is None and skipped:
        raise ck.CheckpointError(
            f"no checkpoint in {ckpt_dir} can be read: "
            + "; ".join(why for _, why in skipped)
            + ". Nothing was deleted: move the unreadable files away to start again from "
            "step 0, or give resume=PATH"
        )
    for path, why in skipped:
        say(f"warning: skipped {path}: {why}")
    for step, path in older:  # not needed now, but named: the next save deletes them
        why = _unreadable(path, None if path.name == "latest.pt" else step)
        if why is not None:
            say(f"warning: older checkpoint {path} cannot be read: {why}")
    return found


def last_good(ckpt_dir: Path) -> tuple[Path, int] | None:
    """(path, step) of the newest checkpoint whose header reads; for messages, the weights are not read."""
    for step, path in _candidates(ckpt_dir, []):
        if _unreadable(path, None if path.name == "latest.pt" else step) is None:
            return path, step
    return None


def describe_last_good(ckpt_dir: Path) -> str:
    last = last_good(ckpt_dir)
    if last is None:
        return f"no readable checkpoint in {ckpt_dir} yet"
    return f"the last good checkpoint {last[0]} (step {last[1]}) is intact"


def find_checkpoint(cfg: Config, ckpt_dir: Path, say: Say) -> Found | None:
    """What resume=auto | never | PATH continues from; None: start at step 0."""
    if cfg.resume == "auto":
        return newest_checkpoint(ckpt_dir, say)
    if cfg.resume != "never":
        path = Path(cfg.resume)
        state = ck.load_checkpoint(path)
        _check_state(path, state, None)
        return Found(path, state)
    if ck.step_files(ckpt_dir) or (ckpt_dir / "latest.pt").exists():
        raise ConfigError(
            f"{ckpt_dir} already holds checkpoints and resume=never; "
            "use resume=auto to continue or choose another run_dir"
        )
    return None


def clean_temporaries(run_dir: Path, say: Say) -> None:
    """Remove the temporaries (.NAME.tmp) that killed saves left in this run's folder and checkpoints/."""
    stale = sorted(p for d in (run_dir, run_dir / "checkpoints") if d.is_dir() for p in d.glob(".*.tmp") if p.is_file())
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        names = ", ".join(str(p.relative_to(run_dir)) for p in stale)
        say(f"removed {len(stale)} temporary file(s) left by interrupted saves in {run_dir}: {names}")


def repair_export(
    run_dir: Path, ema: nn.Module, loss: TrainingLoss, cfg: Config, step: int, class_names: Sequence[str], say: Say
) -> None:
    """Rewrite ema.safetensors (and loss_weight.safetensors for a stateful weighting) when missing, unreadable
    or behind the checkpoint resumed from (a kill during the last export leaves the previous one, and a run
    already at its last step saves no more)."""
    files = [(ck.EMA_EXPORT, "EMA weights", ema.state_dict())]
    exported = loss.export_tensors()
    if exported is not None:
        files.append((ck.LOSS_WEIGHT_EXPORT, "loss weighting state", exported))
    for name, what, tensors in files:
        path = run_dir / name
        have = ck.export_step(path)
        if have is not None and have >= step:
            if have > step:
                say(f"{path} holds step {have}, past the checkpoint at step {step}; the next save replaces it")
            continue
        why = (
            "is missing" if not path.exists() else f"holds step {have}" if have is not None else "has no readable step"
        )
        ck.export_safetensors(path, tensors, cfg, step, class_names)
        say(f"{path} {why}; rewrote it with the {what} of step {step}")


def repair_latest(ckpt_dir: Path, path: Path, say: Say) -> None:
    """Point latest.pt at the step file resumed from, when a kill left it behind (or missing): a run already at
    its last step saves no more, and `minsnr sample .../latest.pt` must not get older weights."""
    latest = ckpt_dir / "latest.pt"
    if path.parent != ckpt_dir or path == latest or (latest.is_file() and latest.samefile(path)):
        return
    ck.link_latest(ckpt_dir, path)
    say(f"{latest} was behind; it now points at {path.name}")


def prune(ckpt_dir: Path, keep: int, newest: Path, step: int, say: Say) -> None:
    """Once `newest` (step `step`) reads back, delete what it supersedes: every unreadable step file (said, with
    the reason), then the readable older ones beyond the newest `keep` in all. Readable later steps stay."""
    why = _unreadable(newest, step)
    if why is not None:
        say(f"warning: kept every older checkpoint, the new one does not read back: {why}")
        return
    readable: list[Path] = []
    for path in ck.step_files(ckpt_dir):
        if path == newest:
            continue
        why = _unreadable(path, ck.step_of(path))
        if why is not None:
            say(f"warning: deleted {path}, which cannot be read ({why}); {newest.name} supersedes it")
            path.unlink(missing_ok=True)
        elif ck.step_of(path) < step:
            readable.append(path)
    for path in readable[: max(0, len(readable) - (keep - 1))]:
        path.unlink(missing_ok=True)


def save(state: dict[str, Any], ema: nn.Module, loss: TrainingLoss, cfg: Config, run_dir: Path, say: Say) -> Path:
    """Install the checkpoint of state["step"] (rank 0 only): step file, latest.pt, the exports (EMA weights,
    the loss weighting's state, minsnr.loss), prune."""
    ckpt_dir, step = run_dir / "checkpoints", int(state["step"])
    path = ck.step_path(ckpt_dir, step)
    ck.save_checkpoint(path, state)
    ck.link_latest(ckpt_dir, path)
    ck.export_safetensors(run_dir / ck.EMA_EXPORT, ema.state_dict(), cfg, step, state["class_names"])
    exported = loss.export_tensors()
    if exported is not None:
        ck.export_safetensors(run_dir / ck.LOSS_WEIGHT_EXPORT, exported, cfg, step, state["class_names"])
    prune(ckpt_dir, cfg.checkpoint.keep, path, step, say)
    return path


__all__ = [
    "Found",
    "newest_checkpoint",
    "last_good",
    "describe_last_good",
    "find_checkpoint",
    "clean_temporaries",
    "repair_export",
    "repair_latest",
    "prune",
    "save",
]
