"""The training loop: exact resume, kill -9, NaN stop, config errors, DDP equivalence."""

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import torchrun

import minsnr.train as train_mod
from minsnr.checkpoint import load_checkpoint
from minsnr.config import load_config
from minsnr.launch import main as train_main
from minsnr.loss import TrainingLoss
from minsnr.train import NonFiniteLoss, train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.args={patch_size: 2, depth: 2, width: 32, num_heads: 2}",
    "train.batch_size=16",
    "log.every=2",
    "log.preview_every=0",
    "log.tensorboard=false",
    "checkpoint.every=2",
    "checkpoint.keep=10",
    "optim.warmup_steps=2",
    "ema.decay=0.9",
]


def tiny_cfg(run_dir: Path, *extra: str, model_args: dict | None = None):
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [*TINY, f"run_dir={run_dir}", *extra])
    if model_args is not None:  # replace (YAML overrides merge into) the architecture arguments
        cfg.model.args = model_args
    return cfg


def states_equal(a: dict, b: dict) -> None:
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    oa, ob = a["optimizer"]["state"], b["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for k in oa[i]:
            assert torch.equal(oa[i][k], ob[i][k]), f"optimizer state {i}.{k} differs"
    assert a["step"] == b["step"] and a["data"] == b["data"]


def straight_and_resumed(tmp_path: Path, *extra: str) -> tuple[dict, dict]:
    """The final checkpoints of a 6-step run and of the same run stopped at step 3 and resumed."""
    train(tiny_cfg(tmp_path / "one", "train.steps=6", *extra))
    train(tiny_cfg(tmp_path / "two", "train.steps=3", "checkpoint.every=3", *extra))
    train(tiny_cfg(tmp_path / "two", "train.steps=6", "checkpoint.every=3", *extra))
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "latest.pt") for run in ("one", "two"))
    states_equal(a, b)
    return a, b


UNET_DROPOUT = dict(extra=["model.name=unet_tiny", "data.num_workers=1"], model_args={"dropout": 0.3})


@pytest.mark.parametrize(
    "variant", [dict(extra=[], model_args=None), UNET_DROPOUT], ids=["vit", "unet_dropout_workers"]
)
def test_resume_is_bit_exact(tmp_path, variant):
    """Dropout draws from the global RNG and workers are restarted: both must resume exactly."""
    extra, args = variant["extra"], variant["model_args"]
    train(tiny_cfg(tmp_path / "one", "train.steps=6", *extra, model_args=args))
    train(tiny_cfg(tmp_path / "two", "train.steps=3", "checkpoint.every=3", *extra, model_args=args))
    out = train(tiny_cfg(tmp_path / "two", "train.steps=6", "checkpoint.every=3", *extra, model_args=args))
    assert out["step"] == 6
    a = load_checkpoint(tmp_path / "one" / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "two" / "checkpoints" / "latest.pt")
    states_equal(a, b)
    assert a["step"] == 6
    earlier = load_checkpoint(tmp_path / "one" / "checkpoints" / "step_000000002.pt")  # training did move the weights
    assert any(not torch.equal(earlier["model"][k], a["model"][k]) for k in a["model"])


def test_sigkill_then_resume(tmp_path):
    run = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "minsnr",
        "train",
        str(ROOT / "configs" / "quickstart.yaml"),
        *TINY,
        f"run_dir={run}",
        "train.steps=400",
        "checkpoint.every=1",
    ]
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        latest = run / "checkpoints" / "latest.pt"
        deadline = time.time() + 300
        while not latest.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 1.5))  # land anywhere: mid-step, mid-write, mid-rename
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert latest.exists(), log.read_text()[-3000:]
    state = load_checkpoint(latest)  # the last checkpoint always loads
    assert 1 <= state["step"] < 400
    leftovers = [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    out = train(tiny_cfg(run, f"train.steps={state['step'] + 2}", "checkpoint.every=1"))
    assert out["step"] == state["step"] + 2
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp") and p not in leftovers]


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = TrainingLoss.__call__
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:  # the 5th optimiser step
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(TrainingLoss, "__call__", poisoned)
    with pytest.raises(NonFiniteLoss, match="at step 5"):
        train(tiny_cfg(tmp_path, "train.steps=10", "log.every=1"))
    state = load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss.weightin=min_snr", "loss.weightin"),
        ("train.steps=many", "train.steps"),
        ("loss.weighting=minsnr", "const, snr, max_snr, min_snr, soft_min_snr"),
        ("data.source=folder", "data.path"),
    ],
)
def test_bad_config_fails_early(tmp_path, capsys, override, message):
    code = train_main([str(ROOT / "configs" / "quickstart.yaml"), f"run_dir={tmp_path}", override])
    err = capsys.readouterr().err
    assert code != 0 and message in err, err
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_key_lists_valid_keys(tmp_path, capsys):
    train_main([str(ROOT / "configs" / "quickstart.yaml"), "loss.weightin=min_snr"])
    err = capsys.readouterr().err
    assert "valid keys in loss: target, weighting, gamma, timesteps, timestep_args, label_dropout" in err
    assert "(did you mean 'weighting'?)" in err and "command-line override" in err


def test_missing_data_path(tmp_path, capsys):
    code = train_main(
        [
            str(ROOT / "configs" / "quickstart.yaml"),
            f"run_dir={tmp_path}",
            "data.source=folder",
            f"data.path={tmp_path / 'nope'}",
        ]
    )
    err = capsys.readouterr().err
    assert code != 0 and "nope" in err, err


def test_wrong_model_for_checkpoint(tmp_path):
    train(tiny_cfg(tmp_path, "train.steps=2"))
    with pytest.raises(Exception, match="trained with model"):
        train(tiny_cfg(tmp_path, "train.steps=4", "model.args={patch_size: 2, depth: 3, width: 32, num_heads: 2}"))


def test_torchrun_two_ranks_match_one(tmp_path):
    common = [*TINY, "train.steps=4", "checkpoint.every=4", "data.num_workers=0"]
    res = torchrun(
        "train", str(ROOT / "configs" / "quickstart.yaml"), *common, "train.batch_size=8", f"run_dir={tmp_path / 'ddp'}"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    train(
        load_config(
            ROOT / "configs" / "quickstart.yaml", [*common, "train.batch_size=16", f"run_dir={tmp_path / 'one'}"]
        )
    )
    a = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "one" / "checkpoints" / "latest.pt")
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=1e-4, atol=1e-5, msg=name)
    assert a["data"] == {"epoch": b["data"]["epoch"], "batch": b["data"]["batch"]}


def test_preview_grid_has_a_row_per_class(tmp_path):
    from PIL import Image

    from minsnr.hooks import build_hooks

    cfg = tiny_cfg(tmp_path, "train.steps=2", "log.preview_every=2", "sample.steps=2")
    train(cfg, build_hooks(cfg))
    with Image.open(tmp_path / "samples.png") as im:
        width, height = im.size
    cell = width // 8  # 8 columns of (8 + 2 padding) px, enlarged to >= 320 px wide
    assert width >= 320 and (tmp_path / "previews" / "step_000000002.png").exists()
    assert abs(height - 10 * cell) <= cell  # 10 rows, one per digit


def test_a_failing_hook_is_reported_and_costs_no_checkpoint(tmp_path, capsys):
    """A preview or evaluation that raises (e.g. a VAE that cannot be downloaded) warns and training goes on
    to its final checkpoint, instead of ending the run without it."""

    def broken_preview(ctx):
        raise OSError("cannot reach the hub")

    out = train(tiny_cfg(tmp_path, "train.steps=4"), (train_mod.Hook(2, broken_preview),))
    assert out["step"] == 4
    assert load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["step"] == 4
    err = capsys.readouterr()
    assert "broken_preview failed at step 2 (OSError: cannot reach the hub)" in err.out + err.err
    assert "failed at step 4" in err.out + err.err
