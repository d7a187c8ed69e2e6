"""What a run writes while it trains: JSONL metrics, TensorBoard scalars, per-timestep-bin losses.

Per-bin statistics accumulate on the device every step (no host sync) and are read every `log.every`
steps; the bins are the tenths of the timesteps of the paper's figure 6 (minsnr.timesteps.bins).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from minsnr.extras import optional
from minsnr.files import WriteError, atomic_write
from minsnr.timesteps import NUM_BINS, bin_index, bin_name, bins


class BinStats:
    """Sums of the weighted loss and of the unweighted x0 MSE per timestep bin, on the device."""

    def __init__(self, num_timesteps: int, device: torch.device):
        ranges = bins(num_timesteps)
        self.names = [bin_name(lo, hi) for lo, hi in ranges]
        self.bin_of_t = bin_index(ranges).to(device)
        self.mse = torch.zeros(NUM_BINS, dtype=torch.float64, device=device)
        self.count = torch.zeros(NUM_BINS, dtype=torch.float64, device=device)
        self.loss = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of batch losses, steps]

    def add(self, t: Tensor, mse_x0: Tensor, loss: Tensor) -> None:
        idx = self.bin_of_t[t]
        self.mse.index_add_(0, idx, mse_x0.detach().to(torch.float64))
        self.count.index_add_(0, idx, torch.ones_like(mse_x0, dtype=torch.float64))
        self.loss += torch.stack(
            [loss.detach().to(torch.float64), torch.ones((), dtype=torch.float64, device=loss.device)]
        )

    def read_and_reset(self) -> dict[str, float]:
        """One host sync; sums over DDP ranks when distributed (every rank must call it)."""
        packed = torch.cat([self.mse, self.count, self.loss])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed)
        mse, count, loss = packed[:NUM_BINS], packed[NUM_BINS : 2 * NUM_BINS], packed[2 * NUM_BINS :]
        out = {"loss": (loss[0] / loss[1].clamp(min=1)).item()}
        for k, (m, c) in enumerate(zip(mse.tolist(), count.tolist())):
            if c > 0:
                out[f"mse_x0/{self.names[k]}"] = m / c
        for buf in (self.mse, self.count, self.loss):
            buf.zero_()
        return out


class MetricsError(ValueError):
    """metrics.jsonl holds a line that is not a JSON record (other than a torn last line)."""


def read_records(path: Path, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file. A torn last line (a write cut short by a kill or a full disk) is
    dropped with a warning; an unparseable line before it is an error naming the file and the line."""
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i == last:
                say(f"warning: {path}: dropped its torn last line {i + 1} ({err.msg}), left by an interrupted write")
                continue
            raise MetricsError(f"{path} line {i + 1} is not JSON ({err.msg}); repair or delete that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step", 0), int):
            raise MetricsError(f"{path} line {i + 1} is not a metrics record with an integer step; repair or delete it")
        records.append(record)
    return records


class MetricsLog:
    """Appends one JSON object per log step to metrics.jsonl, mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool, say: Callable[[str], None] = print):
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():  # drop records past the checkpoint we resume from (they will be redone)
            records = read_records(self.path, say)
            kept = [r for r in records if r.get("step", 0) <= resume_step]
            text = "".join(json.dumps(r) + "\n" for r in kept)
            if len(kept) < len(records):
                say(
                    f"{self.path}: dropped {len(records) - len(kept)} records past step {resume_step} (they are redone)"
                )
            if text != self.path.read_text():
                atomic_write(self.path, lambda f: f.write(text.encode()))
        self.writer: Any = None
        tb = optional("torch.utils.tensorboard", "logging to metrics.jsonl only") if tensorboard else None
        if tb is not None:
            self.writer = tb.SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        try:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        except OSError as err:  # a torn line may stay behind: the next start drops it
            raise WriteError(self.path, err) from err
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
