"""Did the step run as a CUDA graph, and does the graph compute what the eager step computes? (issues 10, 24)

Trains each workload for --steps steps from one seed in each of its variants: the whole step as a CUDA graph
with the data on the device, the same step eagerly (train.cuda_graph=false), and the graph with the host
loader (train.data_on_device=false); latent data has only the host loader, so ViT-B/2 has the graph and the
eager variant. Workloads:
    quickstart  configs/quickstart.yaml as it is (8x8 digits, vit_tiny)
    cifar       the CIFAR-size pixel ViT of gpu_suite.sh's CIFAR run: vit_s, 32x32x3, patch 2, batch 128
                (--smoke: vit_tiny with the same shapes), on train_speed.py's synthetic npz
    vit_b       ViT-B/2 on train_speed.py's random 4x32x32 latents, batch 256 (--smoke: vit_tiny on 4x8x8)
Uncompiled (train.compile=false): train_speed.py measures the compiled step in the real loop.

For every variant it records whether the graph was captured and how many steps replayed it (StaticStep
counts its calls; after its WARMUP eager steps every call replays), and otherwise why not: the capture's
failure line (the StaticStep's log) or the plan's phrase (minsnr.step.plan_step). It prints the largest
difference of weights, EMA weights and optimizer state from the workload's first variant (kernels with
atomics, e.g. the embedding backward, may differ in the last bits) and writes JSON after each workload.
Exit status 1 when a difference is beyond 1e-4 relative, a run failed, or a variant meant to run as a
graph did not replay one ("graph path did not run: <cause>"); --allow-eager accepts the last (the CPU
smoke run, where no graph can run), still saying so.

    python benchmarks/graph_check.py [--device cuda] [--steps 40] [--workloads quickstart,cifar,vit_b]
    python benchmarks/graph_check.py --smoke --allow-eager      # CPU, tiny models: tests this script
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # minsnr, and train_speed.py next to this file

from train_speed import make_data, workload_config  # noqa: E402  (benchmarks/train_speed.py)

from minsnr.step import WARMUP, plan_step  # noqa: E402
from minsnr.train import Trainer  # noqa: E402

WORKLOADS = ("quickstart", "cifar", "vit_b")
TOLERANCE = 1e-4  # relative: beyond rounding and atomics, a real mismatch
ARRAY_VARIANTS = {  # name: (overrides, expects a graph)
    "graph, device data": (["train.data_on_device=true"], True),
    "eager, device data": (["train.data_on_device=true", "train.cuda_graph=false"], False),
    "graph, host loader": (["train.data_on_device=false"], True),
}
LATENT_VARIANTS = {  # a latent folder is always read by the host loader
    "graph, host loader": ([], True),
    "eager, host loader": (["train.cuda_graph=false"], False),
}


def workload_sets(workload: str, smoke: bool, steps: int) -> list[str]:
    """Overrides on train_speed.py's workload config: a short uncompiled run, and for cifar the suite's CIFAR
    model (vit_s, patch 2, its optimiser settings) in place of train_speed's patch-4 ViT."""
    sets = [f"train.steps={steps}", "train.compile=false", "log.every=20"]
    if workload == "cifar":
        tiny = ["model.args={patch_size: 2, depth: 2, width: 32, num_heads: 2}"]  # vit_tiny, as train_speed's
        model = tiny if smoke else ["model.name=vit_s", "model.args={patch_size: 2}"]
        sets += [*model, "optim.lr=2e-4", "optim.betas=[0.99,0.99]", "ema.decay=0.999"]
    return sets


def state(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in trainer.ema.state_dict().items()})
    for i, s in trainer.opt.state_dict()["state"].items():
        out.update({f"opt.{i}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)})
    return {k: v.detach().double().cpu() for k, v in out.items()}


def graph_path(trainer: Trainer, failures: list[str]) -> dict[str, Any]:
    """What ran: the static step's calls, captured or not, replays, and the cause when no graph replayed."""
    t, static = trainer.cfg.train, trainer.static
    _, planned, phrase = plan_step(
        trainer.device.type, trainer.world, t.grad_accum, t.cuda_graph, t.compile, t.compile_mode
    )
    calls = static.calls if static is not None else 0
    captured = static is not None and static.graph is not None
    replays = calls - static.warmup if captured else 0  # the capture's call replays too, and every call after it
    if captured:
        cause = None
    elif failures:
        cause = next((line for line in failures if "capture failed" in line), failures[0])
    elif not planned or static is None:
        cause = phrase
    else:
        cause = f"capture not reached: {calls} steps, and the capture comes after {static.warmup} eager steps"
    return {"planned_graph": planned, "captured": captured, "steps": calls, "replays": replays, "cause": cause}


def watch_capture(trainer: Trainer) -> list[str]:
    """The list that will hold the lines the trainer's StaticStep logs (a failed capture says why there);
    they are still printed as before."""
    lines: list[str] = []
    static = trainer.static
    if static is not None:
        say = static.log

        def keep(msg: str) -> None:
            lines.append(msg)
            say(msg)

        static.log = keep
    return lines


def run_variant(cfg: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Train one variant; its graph-path record and its final state (on the CPU)."""
    start = time.perf_counter()
    trainer = Trainer(cfg)
    failures = watch_capture(trainer)
    trainer.run()
    row = {
        **graph_path(trainer, failures),
        "data": type(trainer.batches).__name__,
        "speed_log": next((n for n in trainer.parts.notes if n.startswith("speed: ")), ""),
        "seconds": time.perf_counter() - start,
    }
    final = state(trainer)
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next variant gets the memory the graph's pool held
    return row, final


def compare(states: dict[str, dict[str, torch.Tensor]], rows: list[dict[str, Any]]) -> None:
    """Add each variant's largest absolute and relative difference from the first variant's state."""
    ref_name, ref = next(iter(states.items()))
    for row in rows:
        st = states.get(row["variant"])
        if st is None:
            continue
        row["reference"] = ref_name
        row["max_abs_diff"] = max(float((st[k] - ref[k]).abs().max()) for k in ref)
        row["max_rel_diff"] = max(
            float((st[k] - ref[k]).abs().max() / ref[k].abs().max().clamp(min=1e-12)) for k in ref
        )
        row["bit_identical"] = all(torch.equal(st[k], ref[k]) for k in ref)


def verdict(rows: list[dict[str, Any]], allow_eager: bool) -> tuple[bool, list[str]]:
    """(pass?, findings). Fails on a failed run, a difference beyond TOLERANCE, and a variant meant to run as
    a CUDA graph that replayed none (then the "graph" variants compared the eager step with itself), unless
    `allow_eager`; an allowed eager fallback is still listed."""
    ok, findings = True, []
    for r in rows:
        name = f"{r['workload']}, {r['variant']}"
        if "error" in r:
            ok = False
            findings.append(f"{name}: run failed ({r['error']})")
            continue
        if r["expects_graph"] and r["replays"] < 1:
            ok &= allow_eager
            allowed = " (allowed by --allow-eager)" if allow_eager else ""
            findings.append(f"{name}: graph path did not run: {r['cause']}{allowed}")
        if r.get("max_rel_diff", 0.0) > TOLERANCE:
            ok = False
            findings.append(f"{name}: MISMATCH, {r['max_rel_diff']:.3g} relative difference (> {TOLERANCE:g})")
    return ok, findings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated of {', '.join(WORKLOADS)}")
    p.add_argument("--smoke", action="store_true", help="tiny models and data (tests this script on the CPU)")
    p.add_argument("--allow-eager", action="store_true", help="pass although no graph ran (say so); the CPU smoke")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "graph_check.json"))
    a = p.parse_args(argv)
    kinds = [k for k in a.workloads.split(",") if k]
    bad = [k for k in kinds if k not in WORKLOADS]
    if bad or not kinds:
        p.error(f"unknown workload(s) {bad}; valid: {', '.join(WORKLOADS)}")
    if a.steps <= WARMUP:
        p.error(f"--steps {a.steps}: needs more than {WARMUP}, the eager steps before the capture")
    out, rows = Path(a.out), []
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        make_data(scratch, a.smoke, kinds)
        for kind in kinds:
            states: dict[str, dict[str, torch.Tensor]] = {}
            mine = []
            for name, (extra, expects) in (LATENT_VARIANTS if kind == "vit_b" else ARRAY_VARIANTS).items():
                row: dict[str, Any] = {"workload": kind, "variant": name, "expects_graph": expects}
                sets = [*workload_sets(kind, a.smoke, a.steps), *extra]
                try:
                    cfg = workload_config(kind, scratch, a.smoke, a.device, sets, scratch / f"{kind}_{len(mine)}")
                    record, states[name] = run_variant(cfg)
                    row.update(record)
                except Exception as err:  # one failed run is a finding; the other workloads still run
                    row["error"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
                mine.append(row)
            if states:
                compare(states, mine)
            for r in mine:
                if "error" in r:
                    print(f"{kind:<10} {r['variant']:<19} FAILED {r['error']}", flush=True)
                    continue
                how = (
                    f"graph replayed {r['replays']}/{r['steps']} steps" if r["captured"] else f"no graph ({r['cause']})"
                )
                print(
                    f"{kind:<10} {r['variant']:<19} {r['data']:<13} max |diff| {r['max_abs_diff']:.3g} "
                    f"(rel {r['max_rel_diff']:.3g}) bit-identical {r['bit_identical']}; {how}; {r['seconds']:.1f} s",
                    flush=True,
                )
            rows += mine
            ok, findings = verdict(rows, a.allow_eager)
            meta = {"device": a.device, "steps": a.steps, "smoke": a.smoke, "allow_eager": a.allow_eager}
            out.write_text(json.dumps({**meta, "ok": ok, "findings": findings, "results": rows}, indent=1))
    for line in findings:
        print(line)
    print(
        f"reference: each workload's first variant; {a.steps} steps on {a.device}; "
        + ("OK" if ok else "FAILED")
        + (" (graph variants ran eagerly: allowed by --allow-eager)" if ok and findings else "")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
