"""Does the captured step compute what the eager step computes? The GPU half of the CPU twin tests (issue 10).

Trains the quickstart for --steps steps three times from the same seed: the whole step as a CUDA graph
with the data on the device, the same step eagerly (train.cuda_graph=false), and the graph with the host
loader (train.data_on_device=false); prints the largest difference of weights, EMA weights and optimizer
state from the first run and whether they are bit-identical (kernels with atomics, e.g. the embedding
backward, may differ in the last bits), and writes JSON. Exit status 1 when a difference is beyond 1e-4
relative (a real mismatch, not rounding).

    python benchmarks/graph_check.py [--device cuda] [--steps 60] [--out benchmarks/results/graph_check.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minsnr.config import load_config  # noqa: E402
from minsnr.train import Trainer  # noqa: E402

VARIANTS = {
    "graph, device data": ["train.data_on_device=true"],
    "eager, device data": ["train.data_on_device=true", "train.cuda_graph=false"],
    "graph, host loader": ["train.data_on_device=false"],
}


def state(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in trainer.ema.state_dict().items()})
    for i, s in trainer.opt.state_dict()["state"].items():
        out.update({f"opt.{i}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)})
    return {k: v.detach().double().cpu() for k, v in out.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "graph_check.json"))
    a = p.parse_args()
    states, paths = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in VARIANTS.items():
            cfg = load_config(
                ROOT / "configs" / "quickstart.yaml",
                [
                    f"run_dir={tmp}/{len(states)}",
                    "resume=never",
                    f"train.device={a.device}",
                    f"train.steps={a.steps}",
                    "log.every=20",
                    "log.preview_every=0",
                    "log.tensorboard=false",
                    "checkpoint.every=0",
                    *extra,
                ],
            )
            trainer = Trainer(cfg)
            trainer.run()
            static = trainer.static
            paths[name] = (
                f"{type(trainer.batches).__name__}, graph replayed: {static is not None and static.graph is not None}"
            )
            states[name] = state(trainer)
    ref_name, ref = next(iter(states.items()))
    rows, ok = [], True
    for name, st in states.items():
        diff = max(float((st[k] - ref[k]).abs().max()) for k in ref)
        rel = max(float((st[k] - ref[k]).abs().max() / ref[k].abs().max().clamp(min=1e-12)) for k in ref)
        same = all(torch.equal(st[k], ref[k]) for k in ref)
        ok &= rel <= 1e-4
        rows.append(
            {"variant": name, "path": paths[name], "max_abs_diff": diff, "max_rel_diff": rel, "bit_identical": same}
        )
        print(f"{name:<20} {paths[name]:<40} max |diff| {diff:.3g} (rel {rel:.3g}) bit-identical {same}")
    print(f"reference: {ref_name}; {a.steps} steps on {a.device}; " + ("OK" if ok else "MISMATCH beyond 1e-4 relative"))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"device": a.device, "steps": a.steps, "ok": ok, "results": rows}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
