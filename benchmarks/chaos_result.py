"""Result adapter for benchmarks/chaos.sh: one line that fingerprints what a finished run holds.

ckpt-chaos compares this line with the fault-free run's, so it names the weights and state rather than
file bytes: model, EMA and optimiser tensors, step and data position of checkpoints/latest.pt, and the
tensors and step of the shared ema.safetensors export. A run resumed to the same state prints the same line.

    python benchmarks/chaos_result.py RUN_DIR
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def main(run: Path) -> str:
    state = torch.load(run / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    opt = {
        f"{i}.{k}": v
        for i, s in state["optimizer"]["state"].items()
        for k, v in s.items()
        if isinstance(v, torch.Tensor)
    }
    with safe_open(str(run / "ema.safetensors"), framework="pt") as f:
        export = {k: f.get_tensor(k) for k in f.keys()}
        export_step = (f.metadata() or {}).get("step", "-")
    return (
        f"step={state['step']} data={state['data']} model={digest(state['model'])} ema={digest(state['ema'])} "
        f"opt={digest(opt)} export={digest(export)} export_step={export_step}"
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/chaos_result.py RUN_DIR")
    print(main(Path(sys.argv[1])))
