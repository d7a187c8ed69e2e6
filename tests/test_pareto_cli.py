"""`minsnr pareto` and `minsnr conflict` end to end on a quickstart-shaped checkpoint (digits, vit_tiny)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minsnr.config import Config, ConfigError, to_dict
from minsnr.models import create_model
from minsnr.pareto import cli as pareto_cli
from minsnr.pareto import conflict as conflict_cli
from minsnr.pareto.common import with_data_overrides
from minsnr.pareto.compare import FIGURE4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint as the trainer writes it; weights perturbed so every layer gets gradients."""
    cfg = Config()  # vit_tiny on 8x8 digits, x0 target, min_snr: the quickstart's shape
    cfg.model.args = {"patch_size": 2}
    cfg.data.hflip = False
    torch.manual_seed(0)
    model = create_model(cfg.model.name, input_size=8, in_channels=1, num_classes=10, patch_size=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("run") / "latest.pt"
    torch.save(
        {"model": model.state_dict(), "ema": model.state_dict(), "step": 0, "config": to_dict(cfg), "version": 1}, path
    )
    return path


def test_pareto_cli_writes_table_json_and_figures(checkpoint, tmp_path, capsys):
    out = tmp_path / "p"
    rc = pareto_cli.main(
        [
            str(checkpoint),
            "--tasks",
            "4",
            "--batch",
            "2",
            "--lambda",
            "0.5",
            "--relative-lambda",
            "--device",
            "cpu",
            "--block",
            "2",
            "--instability",
            "--sizes",
            "1,2",
            "--repeats",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "Min-SNR-5" in text and "ordering (best first)" in text and "conflicting task pairs" in text
    report = json.loads((out / "pareto.json").read_text())
    gram = np.array(report["gram"])
    assert gram.shape == (4, 4) and np.all(np.linalg.eigvalsh(gram) > -1e-9 * np.trace(gram))
    lam = report["lambda"]
    assert lam == pytest.approx(0.5 * np.trace(gram) / 4) and report["lambda_relative"] == pytest.approx(0.5)
    res = report["results"]
    assert set(res) == set(FIGURE4) | {"ugd", "frank_wolfe"}
    for r in res.values():
        w = np.array(r["weights"])
        assert w.sum() == pytest.approx(1.0) and r["objective"] == pytest.approx(w @ gram @ w + lam * w @ w, rel=1e-9)
        assert r["objective"] >= res["frank_wolfe"]["objective"] * (1 - 1e-9)
    assert 0 <= report["neg_cos_frac"] <= 1 and len(report["task_losses"]) == 4
    for name in ("pareto.png", "cosine.png", "instability.png", "instability.json"):
        assert (out / name).stat().st_size > 0
    sizes = json.loads((out / "instability.json").read_text())["sizes"]
    assert [s["samples_per_task"] for s in sizes] == [1, 2]


def test_conflict_cli_fine_tuning_helps_its_own_range(checkpoint, tmp_path, capsys):
    out = tmp_path / "c"
    rc = conflict_cli.main(
        [
            str(checkpoint),
            "--ranges",
            "0:500,500:1000",
            "--steps",
            "15",
            "--lr",
            "3e-3",
            "--batch-size",
            "32",
            "--bins",
            "2",
            "--eval-images",
            "32",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads((out / "conflict.json").read_text())
    change, base, after = (np.array(report[k]) for k in ("change", "base", "after"))
    assert change.shape == (2, 2) and np.allclose(change, after - base[None])
    assert change[0, 0] < 0 and change[1, 1] < 0  # each fine-tune lowers the loss of the bin it trained on
    assert (out / "conflict.png").stat().st_size > 0
    assert "tuned 0-500" in capsys.readouterr().out


def test_bad_inputs_are_named(checkpoint, tmp_path, capsys):
    assert conflict_cli.main([str(checkpoint), "--ranges", "300:200", "--out", str(tmp_path)]) == 2
    assert "300:200" in capsys.readouterr().err
    assert pareto_cli.main([str(checkpoint), "--data", "x.npz", "--out", str(tmp_path)]) == 2
    assert "data.source=npz" in capsys.readouterr().err
    assert pareto_cli.main([str(tmp_path / "missing.pt"), "--out", str(tmp_path)]) == 2
    with pytest.raises(ConfigError, match="data.key=value"):
        with_data_overrides(Config(), None, ["model.name=vit_b"])
    cfg = with_data_overrides(Config(), "some.npz", ["data.source=npz", "data.hflip=false"])
    assert (cfg.data.source, cfg.data.path, cfg.data.hflip) == ("npz", "some.npz", False)
