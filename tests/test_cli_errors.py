"""What every verb says: defaults in --help, `~` expanded, errors that name the fix, logs through the bar."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minsnr.cli import VERBS

ROOT = Path(__file__).resolve().parents[1]


class Parsed(Exception):
    """Raised instead of running a verb once its arguments are parsed."""

    def __init__(self, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        super().__init__(parser.prog)
        self.parser, self.namespace = parser, args


@pytest.fixture
def parse_only(monkeypatch):
    """verb, argv -> (parser, parsed arguments) without running the verb."""
    real = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise Parsed(self, real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)

    def parse(verb: str, argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
        module = importlib.import_module(VERBS[verb][0]) if verb in VERBS else importlib.import_module(verb)
        with pytest.raises(Parsed) as got:
            module.main(argv)
        return got.value.parser, got.value.namespace

    return parse


MINIMAL = {
    "train": ["c.yaml"],
    "sample": ["c.pt"],
    "fid": ["s.npz", "--ref", "r.npz"],
    "train-classifier": ["digits", "--out", "o"],
    "losses": ["c.pt"],
    "plot": ["r"],
    "encode": ["--data", "d", "--out", "o"],
    "pareto": ["c.pt"],
    "conflict": ["c.pt"],
    "export": ["r", "o", "--to", "diffusers"],
    "minsnr.quickcheck": [],
}


@pytest.mark.parametrize("verb", list(MINIMAL))
def test_help_shows_every_default(verb, parse_only):
    parser, _ = parse_only(verb, MINIMAL[verb])
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            continue  # nothing to show: no default, --help itself, or a positional
        text = formatter._get_help_string(action) or ""
        assert "default" in text, f"{verb} {action.option_strings[0]}: help {text!r} hides its default"


HOME_PATHS = {
    "sample": ["~/c.pt", "--out", "~/s.npz", "--png-dir", "~/png", "--grid", "~/g.png", "--latents", "~/lat"],
    "fid": [
        "~/s.npz",
        "--ref",
        "~/r.npz",
        "--classifier",
        "~/cls",
        "--inception-weights",
        "~/w.pth",
        "--json",
        "~/f.json",
        "--cache-dir",
        "~/cache",
    ],
    "train-classifier": ["~/d.npz", "--out", "~/cls"],
    "losses": ["~/a.pt", "~/b.pt", "--data", "~/held", "--out", "~/losses"],
    "plot": ["~/r1", "~/r2", "--out", "~/plot"],
    "encode": ["--data", "~/imgs", "--out", "~/lat", "--vae", "~/vae"],
    "pareto": ["~/c.pt", "--data", "~/d.npz", "--out", "~/p"],
    "conflict": ["~/c.pt", "--data", "~/d.npz", "--out", "~/p"],
    "export": ["~/run", "~/out", "--to", "diffusers"],
    "minsnr.quickcheck": ["~/run"],
}


@pytest.mark.parametrize("verb", list(HOME_PATHS))
def test_tilde_is_expanded_in_every_path_argument(verb, parse_only, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    _, args = parse_only(verb, HOME_PATHS[verb])
    values = [v for value in vars(args).values() for v in (value if isinstance(value, list) else [value])]
    paths = [v for v in values if isinstance(v, str) and "/" in v]
    assert len(paths) == sum(a.startswith("~/") for a in HOME_PATHS[verb])
    assert all(p.startswith(str(tmp_path) + "/") for p in paths), paths


def test_no_ema_on_an_ema_only_export_is_refused(tmp_path, capsys):
    from minsnr.evaluate import losses, sample
    from minsnr.pareto import cli as pareto_cli
    from minsnr.pareto import conflict as conflict_cli

    export = str(tmp_path / "ema.safetensors")  # refused before the file is read
    assert sample.main([export, "--no-ema", "--out", str(tmp_path / "s.npz")]) == 1
    assert "EMA-only export" in capsys.readouterr().err and not (tmp_path / "s.npz").exists()
    assert losses.main([export, "--no-ema", "--out", str(tmp_path / "l")]) == 1
    assert "EMA-only export" in capsys.readouterr().err
    for verb in (pareto_cli, conflict_cli):
        with pytest.raises(SystemExit) as code:
            verb.main([export, "--no-ema"])
        assert code.value.code == 2 and "EMA-only export" in capsys.readouterr().err


def gray_folder(root: Path, classes: tuple[str, ...], per_class: int, broken: int = 0) -> list[Path]:
    """8x8 grayscale PNGs, one sub-folder per class; `broken` files of the first class (every other one)
    are not images. Returns the broken files."""
    from PIL import Image

    rng = np.random.default_rng(0)
    bad = []
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            path = root / c / f"{i:02d}.png"
            if c == classes[0] and i % 2 == 0 and i < 2 * broken:
                path.write_bytes(b"not an image")
                bad.append(path)
            else:
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(path)
    return bad


TINY = [
    "model.args={patch_size: 2, depth: 1, width: 16, num_heads: 2}",
    "train.batch_size=4",
    "train.steps=2",
    "log.tensorboard=false",
    "sample.steps=2",
    "data.hflip=false",
]


def test_model_with_more_classes_than_the_data_is_refused(tmp_path, capsys):
    from minsnr.launch import main as train_main

    gray_folder(tmp_path / "pets", ("cat", "dog"), 4)
    code = train_main(
        [
            str(ROOT / "configs" / "quickstart.yaml"),
            *TINY,
            f"run_dir={tmp_path / 'run'}",
            "data.source=folder",
            f"data.path={tmp_path / 'pets'}",
            "model.num_classes=10",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "data has 2 classes (cat, dog) but model.num_classes=10" in err, err
    assert "set model.num_classes=2" in err and not (tmp_path / "run" / "checkpoints").exists()


def test_too_many_unreadable_images_name_both_fixes(tmp_path):
    from minsnr.data import BadImagesError, Batches, FolderDataset

    bad = gray_folder(tmp_path / "imgs", ("a", "b"), 10, broken=3)
    batches = Batches(FolderDataset(tmp_path / "imgs", max_bad_fraction=0.05), 20, seed=0)
    with pytest.raises(BadImagesError) as err:
        next(batches)
    msg = str(err.value)
    assert all(str(p) in msg for p in bad) and "Remove or repair these files" in msg
    assert "data.max_bad_fraction=0.05" in msg and msg.endswith("data.max_bad_fraction=0.15")
    x, _ = next(Batches(FolderDataset(tmp_path / "imgs", max_bad_fraction=0.15), 20, seed=0))  # the fix works
    assert x.shape == (20, 1, 8, 8)
    (tmp_path / "imgs" / "a" / "01.png").write_bytes(b"")  # now 3 in a row: the dataset stops first
    with pytest.raises(BadImagesError, match="in a row .* remove or repair them, or raise data.max_bad_fraction"):
        next(Batches(FolderDataset(tmp_path / "imgs", max_bad_fraction=0.05), 20, seed=0))


def test_losses_and_encode_name_their_data_flag(tmp_path, capsys):
    from test_eval_sample import make_checkpoint

    from minsnr.data import latent
    from minsnr.evaluate import losses

    ckpt = make_checkpoint(tmp_path / "c.pt")
    (tmp_path / "notes.txt").write_text("not data")
    for data, what in [
        (tmp_path / "nope", "not found"),
        (tmp_path / "notes.txt", "is neither an .npz file nor a folder"),
    ]:
        assert losses.main([str(ckpt), "--data", str(data), "--out", str(tmp_path / "l"), "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert f"--data {data} {what}" in err and "data.path" not in err, err
    with pytest.raises(SystemExit):
        latent.main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "lat")])
    err = capsys.readouterr().err
    assert f"--data {tmp_path / 'nope'} not found" in err and "data.path" not in err, err


def test_fid_checks_the_classifier_shape_before_any_feature(tmp_path, monkeypatch, capsys):
    from minsnr.evaluate import classifier, fid

    x, y, _, _ = classifier.load_labelled("digits")
    clf = classifier.train_classifier(x[:64], y[:64], epochs=1)
    classifier.save_classifier(
        clf, tmp_path / "digits", {"image_shape": [8, 8, 1], "num_classes": 10, "width": 16, "feature_dim": 128}
    )
    np.savez(tmp_path / "ref.npz", arr_0=x[:50])
    np.savez(tmp_path / "big.npz", arr_0=np.zeros((20, 16, 16, 1), np.uint8))
    calls = []

    def compute(batches, fn):
        calls.append(1)
        raise RuntimeError("features computed")

    monkeypatch.setattr(fid, "compute_stats", compute)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    args = ["--features", "classifier", "--classifier", str(tmp_path / "digits")]
    assert fid.main([str(tmp_path / "big.npz"), "--ref", str(tmp_path / "ref.npz"), *args]) == 1
    err = capsys.readouterr().err
    assert "(8, 8, 1)" in err and "big.npz are (16, 16, 1)" in err and "ref.npz" not in err, err
    assert fid.main([str(tmp_path / "ref.npz"), "--ref", str(tmp_path / "big.npz"), *args]) == 1
    assert "reference images" in capsys.readouterr().err
    assert calls == []  # nothing was computed before the error


def test_preview_every_zero_still_writes_the_final_grid(tmp_path):
    from PIL import Image

    from minsnr.config import load_config
    from minsnr.hooks import build_hooks
    from minsnr.train import train

    cfg = load_config(
        ROOT / "configs" / "quickstart.yaml", [*TINY, f"run_dir={tmp_path}", "log.preview_every=0", "train.steps=3"]
    )
    train(cfg, build_hooks(cfg))
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["step_000000003.png"]  # once, at the end
    with Image.open(tmp_path / "samples.png") as im:
        assert im.size[0] >= 320


def test_train_classifier_shows_progress(tmp_path, capsys):
    from minsnr.evaluate import classifier

    assert classifier.main(["digits", "--out", str(tmp_path / "c"), "--epochs", "1", "--limit", "256"]) == 0
    err = capsys.readouterr().err
    assert "training classifier: 100%" in err and "2/2" in err and "test accuracy: 100%" in err, err


def test_training_warnings_go_through_the_progress_bar(tmp_path):
    """A skipped-file warning must start its own line, not follow the bar's text on the same line."""
    gray_folder(tmp_path / "imgs", ("a", "b"), 8, broken=1)
    cmd = [
        sys.executable,
        "-m",
        "minsnr",
        "train",
        str(ROOT / "configs" / "quickstart.yaml"),
        *TINY,
        f"run_dir={tmp_path / 'run'}",
        "data.source=folder",
        f"data.path={tmp_path / 'imgs'}",
        "model.num_classes=2",
        "data.max_bad_fraction=0.2",
        "log.preview_every=0",
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [seg for line in res.stderr.splitlines() for seg in line.split("\r") if "skipping unreadable" in seg]
    assert len(lines) == 1 and lines[0].startswith("WARNING minsnr.data.loader: skipping unreadable image"), res.stderr[
        -3000:
    ]
