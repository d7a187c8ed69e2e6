"""`minsnr plot` (threshold crossing, speed-up) and `minsnr losses` (per-bin unweighted x0 MSE)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from minsnr.config import load_config
from minsnr.evaluate import losses, plots
from minsnr.schedule import make_schedule

ROOT = Path(__file__).resolve().parents[1]


def write_run(path: Path, steps: list[int], fids: list[float], key: str = "fid_cls") -> str:
    path.mkdir(parents=True)
    lines = []
    for s, f in zip(steps, fids):
        lines.append(json.dumps({"step": s, "loss": 0.1}))  # training records without the metric
        lines.append(json.dumps({"step": s, key: f, "cls_acc": 0.5}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return str(path)


def test_plot_reads_crossings_on_smoothed_curves(tmp_path, capsys):
    """Log-linear curves: the running mean of three log scores is the middle one inside the curve, so the
    smoothed crossings have closed forms (interpolated in log score); the ends are geometric means of two."""
    steps = [0, 100, 200, 300, 400]
    base = write_run(tmp_path / "const", steps, [80, 40, 20, 10, 5])  # halves every 100 steps
    fast = write_run(tmp_path / "min_snr", steps, [80, 20, 5, 1.25, 0.3125])  # quarters every 100 steps
    never = write_run(tmp_path / "snr", [0, 100], [60, 40])
    assert plots.main([base, fast, never, "--threshold", "15", "--out", str(tmp_path / "fig")]) == 0
    result = json.loads((tmp_path / "fig.json").read_text())
    runs = {r["label"]: r for r in result["runs"]}
    at = lambda s0, hi, lo, level: s0 + 100 * math.log(hi / level) / math.log(hi / lo)
    assert runs["const"]["reach_step"] == pytest.approx(at(200, 20, 10, 15))
    assert runs["min_snr"]["reach_step"] == pytest.approx(at(100, 20, 5, 15))
    assert runs["min_snr"]["speedup"] == pytest.approx(2.0)  # twice the log-rate: twice as fast at any level
    assert runs["snr"]["reach_step"] is None and runs["snr"]["speedup"] is None
    assert runs["const"]["smoothed"][-1] == pytest.approx(math.sqrt(10 * 5))
    assert (tmp_path / "fig.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "2.00x" in out and "--seeds 3" in out
    # default level: the first run's smoothed final score, sqrt(10 * 5), which it reaches at its last step
    result = plots.compare([base, fast], "fid_cls")
    assert result["threshold"] == pytest.approx(math.sqrt(50))
    assert result["runs"][0]["reach_step"] == pytest.approx(400)
    assert result["runs"][1]["reach_step"] == pytest.approx(at(100, 20, 5, math.sqrt(50)))


def test_one_lucky_evaluation_does_not_make_a_run_reach_a_level(tmp_path):
    """The old rule read raw curves: one evaluation at 5 on a plateau at 20 'reached' 10 (the faces 10.65x)."""
    lucky = write_run(tmp_path / "lucky", [0, 100, 200, 300, 400], [20, 20, 5, 20, 20])
    result = plots.compare([lucky], "fid_cls", threshold=10)
    assert result["runs"][0]["best"] == 5 and result["runs"][0]["reach_step"] is None
    with pytest.raises(ValueError, match="> 0"):
        plots.compare([write_run(tmp_path / "zero", [0, 1], [1.0, 0.0])], "fid_cls")


def test_first_reach_edge_cases():
    s, v = np.array([10.0, 20.0, 30.0]), np.array([5.0, 8.0, 2.0])
    assert plots.first_reach(s, v, 6) == 10  # already below at the first evaluation
    assert plots.first_reach(s, v, 1) is None
    assert plots.first_reach(s, v, 4) == pytest.approx(20 + (8 - 4) / 6 * 10)


def test_plot_names_missing_metrics(tmp_path):
    run = write_run(tmp_path / "a", [1], [3.0], key="other")
    with pytest.raises(ValueError, match="--metric"):
        plots.pick_metric([run])
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plots.read_metric(tmp_path / "nope", "fid")


class Zero(nn.Module):
    """Predicts 0 for every input: closed-form x0 errors."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return torch.zeros_like(x)


def test_bin_losses_closed_forms():
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [])
    x = torch.rand(500, 1, 8, 8) * 2 - 1
    # x0 model predicting 0: ||x0 - 0||^2, whatever t
    cfg.loss.target = "x0"
    mse = losses.bin_losses(Zero(), cfg, x, None, bins=10)
    np.testing.assert_allclose(mse, x.square().mean().item(), rtol=1e-6)
    # eps model predicting 0: x0_hat = x_t / alpha, error = (sigma / alpha) eps, E = mean over the bin of 1/SNR(t)
    cfg.loss.target = "eps"
    mse = losses.bin_losses(Zero(), cfg, x, None, bins=4)
    snr = make_schedule("cosine").snr(torch.arange(1000))
    expect = [(1 / snr[lo : lo + 250]).mean().item() for lo in (0, 250, 500, 750)]
    np.testing.assert_allclose(mse[:3], expect[:3], rtol=0.03)
    assert mse[3] > mse[2] * 10  # the last bin's 1/SNR grows without bound


def test_losses_cli_same_inputs_for_every_checkpoint(tmp_path):
    from test_eval_sample import make_checkpoint

    a = make_checkpoint(tmp_path / "a.pt")
    ck = torch.load(a, weights_only=True)
    ck["step"] = 500
    torch.save(ck, tmp_path / "b.pt")  # same weights, later step
    ck["ema"] = {k: v * 0.5 for k, v in ck["ema"].items()}
    ck["step"] = 1000
    torch.save(ck, tmp_path / "c.pt")
    paths = [str(tmp_path / n) for n in ("a.pt", "b.pt", "c.pt")]
    assert losses.main([*paths, "--data", "digits", "--num", "100", "--out", str(tmp_path / "l")]) == 0
    res = json.loads((tmp_path / "l.json").read_text())
    assert res["bins"][0] == [0, 100] and res["bins"][-1] == [900, 1000] and res["num_images"] == 100
    mse = [r["mse"] for r in res["checkpoints"]]
    assert [r["step"] for r in res["checkpoints"]] == [0, 500, 1000] and len(mse[0]) == 10
    assert mse[0] == mse[1] and mse[0] != mse[2]  # fixed images, timesteps and noise
    assert (tmp_path / "l.png").stat().st_size > 1000
