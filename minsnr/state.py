"""What a checkpoint holds: the sum of a run's stateful parts, saved and restored with one call each.

    model, ema, optimizer   state dicts
    loss_weighting          the stateful loss weighting's state (learned u(t), Pareto weights), if any
    step, rng, rng_ranks    the optimiser step; the numpy/python streams, and each rank's own torch CPU and
                            CUDA streams (minsnr.checkpoint: a resume on another number of ranks says which
                            ranks' streams it cannot continue)
    data                    the batch iterator's position (epoch, index, skipped files)
    config, class_names, version

`TrainState.state_dict()` gathers every rank's own streams (collective under DDP: every rank calls it);
`load_state_dict()` loads every part strictly and names the part that does not fit. minsnr.resume decides
which checkpoint file to load and puts saved files in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import minsnr.checkpoint as ck
from minsnr.config import Config, to_dict
from minsnr.loss import TrainingLoss


@dataclass
class TrainState:
    cfg: Config
    model: nn.Module
    ema: nn.Module
    opt: torch.optim.Optimizer
    loss: TrainingLoss
    batches: Any
    class_names: Sequence[str]
    rank: int = 0
    world: int = 1
    step: int = 0
    device: torch.device | None = None  # where this rank trains; None: the model's device

    def _device(self) -> torch.device:
        return self.device if self.device is not None else next(self.model.parameters()).device

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs (collective under DDP: every rank gathers the RNG streams)."""
        rng = ck.rng_state()
        own = ck.rank_rng_state(self._device())
        ranks: list[Any] = [own]
        if self.world > 1:
            ranks = [None] * self.world
            dist.all_gather_object(ranks, own)  # by rank: CPU byte tensors, pickled through the process group
        state = {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "config": ck.identity_config(self.cfg),
            "rng": rng,
            "rng_ranks": ranks,
            "data": self.batches.state_dict(),
            "class_names": list(self.class_names),
            "version": ck.VERSION,
        }
        loss_state = self.loss.state_dict()  # not part of the EMA (docs/math.md)
        if loss_state is not None:
            state["loss_weighting"] = loss_state
        return state

    def load_state_dict(self, state: dict[str, Any], path: Path, say: Callable[[str], None] = print) -> None:
        """Load model, EMA, optimiser, loss weighting, data position, RNG streams and step strictly;
        CheckpointError naming `path` and the part that does not fit. Rank 0 says in one line which ranks'
        RNG streams cannot be continued (another number of ranks than the checkpoint's)."""
        cfg = self.cfg
        stored = state["config"].get("model")
        if stored != to_dict(cfg)["model"]:
            raise ck.CheckpointError(
                f"{path} was trained with model {stored}, but this config says "
                f"{to_dict(cfg)['model']}; use another run_dir or the same model section"
            )
        ck.strict_load(self.model, state["model"], f"{path} (model)")
        ck.strict_load(self.ema, state["ema"], f"{path} (ema)")
        has = "loss_weighting" in state
        if (self.loss.adaptive is not None) != has:
            raise ck.CheckpointError(
                f"{path} was trained {'with' if has else 'without'} a stateful loss weighting, "
                f"but loss.weighting={cfg.loss.weighting}; resume with the weighting it was "
                "trained with, or use another run_dir"
            )
        if has:
            ck.strict_load(self.loss, state["loss_weighting"], f"{path} (loss_weighting)")
        try:
            self.opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise ck.CheckpointError(f"{path}: optimiser state does not fit: {err}") from None
        self.batches.load_state_dict(state["data"])
        ck.set_rng_state(state["rng"])
        device = self._device()
        ck.set_rank_rng_state(state, self.rank, device, cfg.train.seed)  # each rank its own streams (dropout)
        note = ck.rng_resume_note(state, self.world, device.type == "cuda")
        if note is not None and self.rank == 0:
            say(note)
        self.step = int(state["step"])
