"""`minsnr plot` (threshold crossing, speed-up) and `minsnr losses` (per-bin unweighted x0 MSE)."""

from __future__ import annotations

import json
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


def test_plot_threshold_crossings_and_speedup(tmp_path, capsys):
    base = write_run(tmp_path / "const", [0, 100, 200, 300], [50, 30, 20, 10])
    fast = write_run(tmp_path / "min_snr", [0, 100, 200, 300], [50, 20, 10, 5])
    never = write_run(tmp_path / "snr", [0, 100], [60, 40])
    # threshold 15: const crosses between (200, 20) and (300, 10) at 250, min_snr at 150 -> 1.67x faster
    assert plots.main([base, fast, never, "--threshold", "15", "--out", str(tmp_path / "fig")]) == 0
    result = json.loads((tmp_path / "fig.json").read_text())
    runs = {r["label"]: r for r in result["runs"]}
    assert result["metric"] == "fid_cls" and runs["const"]["steps"] == [0, 100, 200, 300]
    assert runs["const"]["reach_step"] == pytest.approx(250) and runs["min_snr"]["reach_step"] == pytest.approx(150)
    assert runs["min_snr"]["speedup"] == pytest.approx(250 / 150) and runs["const"]["speedup"] == pytest.approx(1)
    assert runs["snr"]["reach_step"] is None and runs["snr"]["speedup"] is None
    assert (tmp_path / "fig.png").stat().st_size > 1000
    assert "1.67x" in capsys.readouterr().out
    # default threshold: the worst run's best value, reached by every run
    result = plots.compare([base, fast], "fid_cls")
    assert result["threshold"] == 10 and [r["reach_step"] for r in result["runs"]] == [300, 200]
    assert result["runs"][1]["speedup"] == pytest.approx(1.5)


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
