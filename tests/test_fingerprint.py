"""Behaviour fingerprint: what the quickstart computes on the CPU, recorded before the redesign of issue 22
and required after it. Loss and gradient norm at steps 1, 50 and 200, checksums of the weights, EMA and
optimiser state at steps 50 and 200, the `learned` and `pareto` weightings' state after 200 steps, and
the first images `minsnr sample` draws at a fixed seed.

    python tests/test_fingerprint.py --record     # rewrite tests/fingerprint.json (only on purpose)

Recorded on this project's CPU machine; locally the redesign reproduced every value exactly. The test
allows a relative 1e-4 on the floats (another CPU may round a sum differently over 200 steps; a changed
weighting, order of draws or update moves them far more) and one 8-bit level per pixel in the images.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECORD = Path(__file__).with_name("fingerprint.json")
STEPS = (1, 50, 200)
BASE = [
    "train.steps=200",
    "log.every=1",
    "checkpoint.every=50",
    "checkpoint.keep=10",
    "log.preview_every=0",
    "log.tensorboard=false",
    "train.device=cpu",
    "train.threads=1",
]


def _checksums(tensors: dict[str, torch.Tensor]) -> list[float]:
    """Three float64 sums over every tensor in key order: plain, weighted by position modulo 7, of squares."""
    flat = torch.cat([v.detach().double().flatten() for _, v in sorted(tensors.items()) if v.is_floating_point()])
    return [float(flat.sum()), float((flat * (torch.arange(flat.numel()) % 7)).sum()), float(flat.square().sum())]


def _optimizer_tensors(opt_state: dict) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v for i, s in opt_state["state"].items() for k, v in s.items() if torch.is_tensor(v)}


def _train(run_dir: Path, *extra: str) -> dict:
    from minsnr.config import load_config
    from minsnr.train import train

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [*BASE, f"run_dir={run_dir}", *extra])
    train(cfg)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = {m["step"]: m for m in lines if "loss" in m}
    out = {"loss": [metrics[s]["loss"] for s in STEPS], "grad_norm": [metrics[s]["grad_norm"] for s in STEPS]}
    for s in (50, 200):
        state = torch.load(run_dir / "checkpoints" / f"step_{s:09d}.pt", map_location="cpu", weights_only=True)
        out[f"model@{s}"] = _checksums(state["model"])
        out[f"ema@{s}"] = _checksums(state["ema"])
        out[f"adam@{s}"] = _checksums(_optimizer_tensors(state["optimizer"]))
    return out


def _loss_weight(run_dir: Path) -> list[float]:
    from safetensors.torch import load_file

    return _checksums(load_file(str(run_dir / "loss_weight.safetensors")))


def _sample(run_dir: Path, out: Path) -> list[int]:
    from minsnr.cli import main

    assert (
        main(
            [
                "sample",
                str(run_dir / "ema.safetensors"),
                "--num",
                "12",
                "--batch",
                "5",
                "--seed",
                "3",
                "--steps",
                "4",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    with np.load(out) as z:
        return [int(img.astype(np.int64).sum()) for img in z["arr_0"]]


def fingerprint(tmp: Path) -> dict:
    torch.set_num_threads(1)
    plain = _train(tmp / "plain")
    learned = _train(tmp / "learned", "loss.weighting=learned")
    pareto = _train(tmp / "pareto", "loss.weighting=pareto")
    return {
        "quickstart": plain,
        "sample_pixel_sums": _sample(tmp / "plain", tmp / "s.npz"),
        "learned": {**learned, "loss_weight": _loss_weight(tmp / "learned")},
        "pareto": {**pareto, "loss_weight": _loss_weight(tmp / "pareto")},
    }


def _close(got: object, want: object, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), where
        for k in want:
            _close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{where}[{i}]")
    elif isinstance(want, int):
        assert abs(got - want) <= 8 * 8, where  # an 8x8 image's pixel sum: one level per pixel  # type: ignore[operator]
    else:
        assert got == pytest.approx(want, rel=1e-4, abs=1e-9), where


def test_behaviour_matches_the_recorded_fingerprint(tmp_path):
    want = json.loads(RECORD.read_text())
    got = fingerprint(tmp_path)
    for key in want:
        if key.startswith("_"):
            continue
        _close(got[key], want[key], key)


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_fingerprint.py --record")
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as d:
        RECORD.write_text(
            json.dumps(
                {"_note": "recorded by tests/test_fingerprint.py --record; see its docstring", **fingerprint(Path(d))},
                indent=1,
            )
            + "\n"
        )
    print(f"wrote {RECORD}")
